"""Linear maps and lookups: linear, mm, addmm, matmul, bmm, baddbmm, embedding."""
from __future__ import annotations

from . import rule
from .elementwise import broadcast

_VIEWS = {"t", "transpose", "permute", "view", "reshape", "_to_copy", "to", "alias", "detach", "contiguous",
          "expand", "unsqueeze", "_unsafe_view", "numpy_T", "clone"}


@rule("linear")
def linear(ctx):
    """out[..., o] = sum_i x[..., i] W[o, i] + b[o]"""
    x, w, b = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
    xl, wl = ctx.lay(x), ctx.lay(w)
    ctx.unify(xl[-1], wl[1] if len(wl) > 1 else None)
    if ctx.is_tensor(b):
        ctx.unify(ctx.lay(b)[0], wl[0])
    return tuple(xl[:-1]) + (wl[0],)


def _from_parameter(ctx, node, depth=0) -> bool:
    """Does ``node`` come from a parameter through view-like ops only?"""
    from . import op_name

    if node.op == "placeholder":
        return ctx.is_parameter(node)
    if node.op != "call_function" or depth > 8 or op_name(node.target) not in _VIEWS:
        return False
    return _from_parameter(ctx, node.args[0], depth + 1)


def _contract(ctx, a, b, ka, kb):
    """Couple the contracted dims; between two activations (attention scores) block them."""
    la, lb = ctx.lay(a)[ka], ctx.lay(b)[kb]
    ctx.unify(la, lb)
    if not (_from_parameter(ctx, a) or _from_parameter(ctx, b)):
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
    return _batched(ctx, ctx.arg(0, "self"), ctx.arg(1, "other"))


@rule("baddbmm")
def baddbmm(ctx):
    out = _batched(ctx, ctx.arg(1, "batch1"), ctx.arg(2, "batch2"))
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
