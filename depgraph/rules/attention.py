"""Attention: heads are coupled across q, k, v and the output; GQA heads are (kv_head x q_per_kv); head_dim is
never prunable (it is contracted and sets the softmax scale). ``scaled_dot_product_attention`` by its rule, eager
attention (matmul -> softmax -> matmul) by the pattern the batched matmul rules report here."""
from __future__ import annotations

from math import prod

from ..layout import Prod, Space, make_prod
from . import rule


@rule("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
      "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention")
def sdpa(ctx):
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    ql, kl, vl = ctx.lay(q), ctx.lay(k), ctx.lay(v)
    qs, ks = ctx.shape(q), ctx.shape(k)
    out_val = ctx.out_val
    out_shape = tuple(int(s) for s in (out_val[0] if isinstance(out_val, (list, tuple)) else out_val).shape)
    nb = len(qs) - 3
    out = [None] * len(out_shape)
    for d in range(nb):  # batch dims
        for lo in (kl[d], vl[d]):
            if ql[d] is not None and lo is not None:
                ctx.unify(ql[d], lo)
        out[d] = ql[d]
    # head_dim: contracted (q.k) and carried (v -> out); never prunable
    ctx.unify(ql[-1], kl[-1])
    ctx.block(ql[-1], "attention head_dim (contracted in q.k, sets the softmax scale)")
    ctx.block(vl[-1], "attention head_dim of the values")
    out[-1] = vl[-1]
    # sequence dims
    out[-2] = ql[-2]
    ctx.unify(kl[-2], vl[-2])
    # heads
    hq, hk = (qs[-3], ks[-3]) if len(qs) >= 3 else (1, 1)
    heads = ql[-3] if len(qs) >= 3 else None
    ctx.unify(kl[-3], vl[-3])
    if hq == hk:
        ctx.unify(heads, kl[-3])
    elif hk > 0 and hq % hk == 0:  # enable_gqa: q head h reads kv head h // (hq // hk)
        rep = ctx.fresh((hq // hk,), broadcast=True)[0]
        ctx.unify(heads, make_prod([kl[-3], rep]))
    else:
        ctx.block(heads, "query heads are not a multiple of key/value heads")
    out[-3] = heads
    mask = next((ctx.arg(3, n) for n in ("attn_mask", "attn_bias") if ctx.has_arg(n)), None)
    if ctx.is_tensor(mask):  # a per-head mask (e.g. ALiBi) couples its head dim
        ms, ml = ctx.shape(mask), ctx.lay(mask)
        off = len(out_shape) - len(ms)
        for d, n in enumerate(ms):
            if n > 1 and off + d == len(out_shape) - 3:
                ctx.unify(ml[d], heads)
    if heads is not None:
        rep = shared_kv_factor(ctx, v) if hq == hk else 1  # values repeated before the call (repeat_kv)
        ctx.attention_site(heads, hq, hk // rep if rep > 1 and hk % rep == 0 else hk, qs[-1])
    if isinstance(out_val, (list, tuple)):
        return [tuple(out)] + [ctx.fresh(tuple(int(s) for s in v.shape), "attention statistics")
                               for v in out_val[1:]]
    return tuple(out)


# -- eager attention: matmul(q, k^T) -> [scale, soft-cap, bias, mask] -> softmax -> [dropout] -> matmul(p, v) --
# The generic rules already couple heads across q, k, v and the output (they are matmul batch dims) and block
# the q.k contraction; this pattern adds what SDPA's rule knows: the values' head_dim is blocked too, GQA heads
# shared through broadcasting are (kv_head x q_per_kv), and the heads are recorded as an attention site.
SCORE_OPS = ("matmul", "bmm", "baddbmm", "einsum")
SOFTMAX_OPS = ("softmax", "_softmax", "_safe_softmax")
SCORE_CHAIN_OPS = frozenset((  # elementwise on the scores or probabilities: scale, soft-cap, bias, mask, dropout
    "mul", "div", "true_divide", "add", "sub", "neg", "tanh", "where", "masked_fill", "clamp", "clamp_min",
    "clamp_max", "maximum", "minimum", "to", "_to_copy", "type_as", "clone", "contiguous", "alias", "detach",
    "dropout", "native_dropout", "feature_dropout", "getitem", "view", "reshape", "_unsafe_view", "unsqueeze",
    "squeeze", "lift_fresh_copy", "slice", "narrow", "cat", "amax", "max", "logsumexp",  # sinks, stable softmax
))
SCORE_CHAIN_OPS = SCORE_CHAIN_OPS | {f"{op}_" for op in SCORE_CHAIN_OPS}  # in-place forms (scores /= scale)
_MAX_CHAIN = 32


def _operands(node):
    """(left, right) operands of a batched matmul-family node."""
    from . import op_name

    args = node.args[1:3] if op_name(node.target) == "baddbmm" else node.args[:2]
    return tuple(args)


def _score_operands(node):
    """The two operands of a q.k^T candidate: a batched matmul's, or a two-tensor ``einsum``'s."""
    from . import op_name

    if op_name(node.target) == "einsum":
        ops = node.args[1] if len(node.args) > 1 else ()
        return tuple(ops) if isinstance(ops, (list, tuple)) else ()
    return _operands(node)


def _between_activations(ctx, node) -> bool:
    from .linear import from_parameter

    ops = _score_operands(node)
    return len(ops) == 2 and all(ctx.is_tensor(a) and len(ctx.shape(a)) >= 3 and not from_parameter(ctx, a)
                                 for a in ops)


def scores_behind(ctx, node, softmaxed=False, seen=None):
    """The q.k^T matmul node whose softmax over the last dim (through elementwise ops) gives ``node``, or None."""
    from . import op_name

    seen = set() if seen is None else seen
    if not ctx.is_tensor(node) or node.op != "call_function" or node in seen or len(seen) > _MAX_CHAIN:
        return None
    seen.add(node)
    name = op_name(node.target)
    if softmaxed and name in SCORE_OPS and _between_activations(ctx, node):
        return node
    if name in SOFTMAX_OPS:
        ndim = node.meta["val"].dim()
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if softmaxed or not isinstance(dim, int) or dim % ndim != ndim - 1:
            return None
        return scores_behind(ctx, node.args[0], True, seen)
    if name in SCORE_CHAIN_OPS:
        for a in node.all_input_nodes:
            found = scores_behind(ctx, a, softmaxed, seen)
            if found is not None:
                return found
    return None


def _input_leaves(ctx) -> set:
    return {leaf for s in ctx.flow.input_spaces for leaf in ctx.store.leaves(s)}


def _heads(ctx, batch):
    """Product of the batch dims' layouts without the model input's own (batch) spaces."""
    store = ctx.store
    inputs = _input_leaves(ctx)
    parts = []
    for lay in batch:
        e = store.expand(lay)
        for p in (e.parts if isinstance(e, Prod) else (e,)):
            if p is not None and not (isinstance(p, Space) and p in inputs):
                parts.append(p)
    return make_prod(parts)


def eager_attention(ctx, probs, values, out) -> None:
    """Called by the batched matmul rules with ``out = probs @ values``: record the attention site when
    ``probs`` is a softmax of a q.k^T contraction between two activations."""
    if len(out) < 3 or not (ctx.is_tensor(probs) and ctx.is_tensor(values)) or len(ctx.shape(values)) < 3:
        return
    scores = scores_behind(ctx, probs)
    if scores is None:
        return
    vs, vl = ctx.shape(values), ctx.lay(values)
    ctx.block(vl[-1], "attention head_dim of the values")
    out = list(out)
    nb = len(out) - 2
    rep = shared_kv_factor(ctx, values)
    for d in range(nb):  # values shared by several query heads (GQA through broadcasting): kv x q_per_kv
        vd = d - (nb - (len(vs) - 2))
        if out[d] is not None and (vd < 0 or vs[vd] == 1):
            ctx.unify(out[d], ctx.fresh((ctx.out_shape[d],), broadcast=True)[0])
            rep *= ctx.out_shape[d]
    heads = _heads(ctx, out[:-2])
    if heads is None:
        return
    q = _operands(scores)[0]
    n = ctx.store.expand(heads).size
    ctx.attention_site(heads, n, n // rep if n % rep == 0 else n, ctx.shape(q)[-1])


def einsum_attention(ctx, terms, out, tensors, out_lays) -> None:
    """Called by the einsum rule: ``einsum("bnij,jbnd->ibnd", probs, values)`` (XLNet) is attention when ``probs``
    is a softmax over its last letter, the one letter contracted with the values, of a q.k^T einsum between two
    activations; the letters probs, values and the output share (less the batch) are the heads, the values' own
    letter kept in the output their head_dim. Heads shared through broadcasting (GQA) are not read here."""
    if len(tensors) != 2 or not all(ctx.is_tensor(t) for t in tensors):
        return
    (tp, tv), (probs, values) = terms, tensors
    contracted = [c for c in tp if c in tv and c not in out]
    carried = [c for c in tv if c in out and c not in tp]
    if len(contracted) != 1 or tp[-1] != contracted[0] or len(carried) != 1:
        return
    scores = scores_behind(ctx, probs)
    if scores is None:
        return
    ps, vs = ctx.shape(probs), ctx.shape(values)
    shared = [c for c in tp if c in tv and c in out]
    if any(ps[tp.index(c)] != vs[tv.index(c)] for c in shared):
        return
    ctx.block(ctx.lay(values)[tv.index(carried[0])], "attention head_dim of the values")
    heads = _heads(ctx, [out_lays[out.index(c)] for c in shared])
    if heads is None:
        return
    n = ctx.store.expand(heads).size
    ctx.attention_site(heads, n, n, _contracted_size(ctx, scores) or vs[tv.index(carried[0])])


def _contracted_size(ctx, scores):
    """The size q.k^T contracts (the queries' head_dim): a matmul's last query dim, an einsum's contracted letter."""
    from . import op_name
    from .linear import einsum_terms

    q = _score_operands(scores)[0]
    if op_name(scores.target) != "einsum":
        return ctx.shape(q)[-1]
    ops = _score_operands(scores)
    try:
        (ta, tb), to = einsum_terms(scores.args[0], [len(ctx.shape(t)) for t in ops])
    except ValueError:
        return None
    sizes = [ctx.shape(q)[ta.index(c)] for c in ta if c in tb and c not in to]
    return prod(sizes) if sizes else None


_VIEW_OPS = frozenset(("view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone", "to",
                       "_to_copy", "alias", "detach", "unsqueeze", "squeeze", "flatten", "unflatten", "lift_fresh_copy"))


def shared_kv_factor(ctx, node) -> int:
    """Query heads per key/value head made by repeating the values (``repeat_kv``: unsqueeze, expand, reshape):
    the growth of the ``expand`` reached from ``node`` through view-like ops; 1 when there is none."""
    from . import op_name

    for _ in range(16):
        if not ctx.is_tensor(node) or node.op != "call_function":
            return 1
        name = op_name(node.target)
        if name in ("expand", "expand_as", "broadcast_to"):  # dims grown from 1, but not the batch
            ins, outs, lay = ctx.shape(node.args[0]), ctx.shape(node), ctx.lay(node)
            off = len(outs) - len(ins)
            inputs = _input_leaves(ctx)
            grown = [m for d, m in enumerate(outs) if (d < off or ins[d - off] != m)
                     and not any(leaf in inputs for leaf in ctx.store.leaves(lay[d]))]
            return prod(grown)
        if name == "repeat_interleave" and isinstance(node.args[1] if len(node.args) > 1 else None, int):
            return node.args[1]
        if name not in _VIEW_OPS:
            return 1
        node = node.args[0]
    return 1
