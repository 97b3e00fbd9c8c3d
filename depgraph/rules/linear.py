"""Linear maps and lookups: linear, mm, addmm, matmul, bmm, baddbmm, embedding."""
from __future__ import annotations

from . import rule
from .attention import eager_attention, einsum_attention
from .elementwise import broadcast

_VIEWS = {"t", "transpose", "permute", "view", "reshape", "_to_copy", "to", "alias", "detach", "contiguous",
          "expand", "unsqueeze", "_unsafe_view", "numpy_T", "clone",
          "index", "index_select"}  # rows of a parameter gathered (per-expert weights): still a parameter


@rule("linear")
def linear(ctx):
    """out[..., o] = sum_i x[..., i] W[o, i] + b[o]"""
    x, w, b = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
    xl, wl = ctx.lay(x), ctx.lay(w)
    ctx.unify(xl[-1], wl[1] if len(wl) > 1 else None)
    if ctx.is_tensor(b):
        ctx.unify(ctx.lay(b)[0], wl[0])
    return tuple(xl[:-1]) + (wl[0],)


def from_parameter(ctx, node, depth=0) -> bool:
    """Does ``node`` come from a parameter through view-like ops only?"""
    from . import op_name

    if node.op == "placeholder":
        return ctx.is_parameter(node)
    if node.op != "call_function" or depth > 8 or op_name(node.target) not in _VIEWS:
        return False
    return from_parameter(ctx, node.args[0], depth + 1)


def _contract(ctx, a, b, ka, kb):
    """Couple the contracted dims; between two activations (attention scores) block them."""
    la, lb = ctx.lay(a)[ka], ctx.lay(b)[kb]
    ctx.unify(la, lb)
    if not (from_parameter(ctx, a) or from_parameter(ctx, b)):
        ctx.block(la, "contracted between two activations (attention head_dim)")


@rule("mm")
def mm(ctx):
    a, b = ctx.arg(0, "self"), ctx.arg(1, "mat2")
    _contract(ctx, a, b, 1, 0)
    return (ctx.lay(a)[0], ctx.lay(b)[1])


@rule("addmm")
def addmm(ctx):
    bias, a, b = ctx.arg(0, "self"), ctx.arg(1, "mat1"), ctx.arg(2, "mat2")
    _contract(ctx, a, b, 1, 0)
    prod = (ctx.lay(a)[0], ctx.lay(b)[1])
    if ctx.is_tensor(bias):
        shp, lay = ctx.shape(bias), ctx.lay(bias)
        for d, n in enumerate(shp):
            od = 2 - len(shp) + d
            if n > 1:
                ctx.unify(lay[d], prod[od])
    return prod


def _batched(ctx, a, b):
    sa, sb = ctx.shape(a), ctx.shape(b)
    la, lb = ctx.lay(a), ctx.lay(b)
    if len(sa) == 1 and len(sb) == 1:
        _contract(ctx, a, b, 0, 0)
        return ()
    if len(sa) == 1:  # (k) @ (..., k, n)
        _contract(ctx, a, b, 0, -2)
        return tuple(lb[:-2]) + (lb[-1],)
    if len(sb) == 1:  # (..., m, k) @ (k)
        _contract(ctx, a, b, -1, 0)
        return tuple(la[:-1])
    _contract(ctx, a, b, -1, -2)
    out_shape = ctx.out_shape
    nb = len(out_shape) - 2
    batch = [None] * nb
    for shp, lay in ((sa, la), (sb, lb)):
        off = nb - (len(shp) - 2)
        for d in range(len(shp) - 2):
            if shp[d] > 1 and lay[d] is not None:
                if batch[off + d] is None:
                    batch[off + d] = lay[d]
                else:
                    ctx.unify(batch[off + d], lay[d])
    return tuple(batch) + (la[-2], lb[-1])


@rule("matmul", "bmm")
def matmul(ctx):
    a, b = ctx.arg(0, "self"), ctx.arg(1, "mat2" if ctx.op == "bmm" else "other")
    out = _batched(ctx, a, b)
    eager_attention(ctx, a, b, out)
    return out


@rule("baddbmm")
def baddbmm(ctx):
    a, b = ctx.arg(1, "batch1"), ctx.arg(2, "batch2")
    out = _batched(ctx, a, b)
    bias = ctx.arg(0, "self")
    if ctx.is_tensor(bias):
        shp, lay = ctx.shape(bias), ctx.lay(bias)
        off = len(out) - len(shp)
        for d, n in enumerate(shp):
            if n > 1:
                ctx.unify(lay[d], out[off + d])
    return out


@rule("embedding")
def embedding(ctx):
    """out[..., :] = W[ids[...], :]: rows are chosen by data, columns are a channel space."""
    w, ids = ctx.arg(0, "weight"), ctx.arg(1, "indices")
    wl = ctx.lay(w)
    ctx.block(wl[0], "embedding rows are selected by token ids")
    return tuple(ctx.lay(ids)) + (wl[1],)


def einsum_terms(equation: str, ndims: list) -> tuple:
    """Letters per operand dim and for the output, with ``...`` expanded (right-aligned broadcasting)."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ndims):
        raise ValueError(f"einsum {equation!r} has {len(terms)} operands, got {len(ndims)}")
    used = set(eq) - set(",->.")
    free = (c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in used)
    n_ell = max((n - len(t.replace("...", "")) for t, n in zip(terms, ndims) if "..." in t), default=0)
    ell = "".join(next(free) for _ in range(n_ell))
    out_terms = []
    for t, n in zip(terms, ndims):
        k = n - len(t.replace("...", ""))
        out_terms.append(t.replace("...", ell[n_ell - k:] if k else ""))
    if arrow:
        out = rhs.replace("...", ell)
    else:  # implicit output: ellipsis dims then the letters seen once, sorted
        once = sorted(c for c in set("".join(terms)) - set(".") if "".join(terms).count(c) == 1)
        out = ell + "".join(once)
    for t, n in zip(out_terms, ndims):
        if len(t) != n:
            raise ValueError(f"einsum term {t!r} does not match a {n}-d operand")
    return out_terms, out


@rule("einsum")
def einsum(ctx):
    """By the equation: dims sharing a letter are one space; a letter missing from the output is
    contracted (blocked between two activations, like attention's q.k) or summed (inexact)."""
    eq, tensors = ctx.arg(0, "equation"), list(ctx.arg(1, "tensors"))
    terms, out = einsum_terms(eq, [len(ctx.shape(t)) for t in tensors])
    by_letter: dict = {}
    for t, term in zip(tensors, terms):
        for d, c in enumerate(term):
            if ctx.shape(t)[d] > 1:
                by_letter.setdefault(c, []).append((t, ctx.lay(t)[d]))
    for c, uses in by_letter.items():
        for _, lay in uses[1:]:
            ctx.unify(uses[0][1], lay)
        if c in out:
            continue
        operands = {id(t): t for t, _ in uses}
        if len(operands) > 1:
            if not any(from_parameter(ctx, t) for t in operands.values()):
                ctx.block(uses[0][1], "contracted between two activations by aten.einsum")
        else:
            ctx.inexact(uses[0][1], "summed over by aten.einsum")
    out_shape = ctx.out_shape
    lays = tuple(by_letter[c][0][1] if c in by_letter and n > 1 else
                 (ctx.fresh((n,), "einsum output dim without a source")[0] if n > 1 else None)
                 for c, n in zip(out, out_shape))
    einsum_attention(ctx, terms, out, tensors, lays)
    return lays
