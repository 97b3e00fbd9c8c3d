"""scaled_dot_product_attention: heads are coupled across q, k, v and the output; GQA heads are
(kv_head x q_per_kv); head_dim is never prunable (it is contracted and sets the softmax scale)."""
from __future__ import annotations

from ..layout import make_prod
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
        ctx.attention_site(heads, hq, hk, qs[-1])
    if isinstance(out_val, (list, tuple)):
        return [tuple(out)] + [ctx.fresh(tuple(int(s) for s in v.shape), "attention statistics")
                               for v in out_val[1:]]
    return tuple(out)
