"""Reductions and normalisations: a dim they reduce over is marked *inexact* (removing a channel
changes the mean, so removal is not equal to zeroing)."""
from __future__ import annotations

import torch

from . import rule


def _arg_or(ctx, name, default):
    """An argument the op's overload may not have (``max.default`` has no ``dim``)."""
    if getattr(ctx.node.target, "_schema", None) is None or ctx.has_arg(name):
        return ctx.arg(1, name, default)
    return default


def _dims(arg, ndim):
    if arg is None or arg == []:
        return list(range(ndim))
    if isinstance(arg, int):
        return [arg % ndim]
    return [d % ndim for d in arg]


@rule("mean", "amax", "amin", "var", "std", "var_mean", "std_mean", "linalg_vector_norm", "norm",
      "logsumexp", "prod", "argmax", "argmin", "min", "any", "all", "nansum", "nanmean")  # max, sum: rules.moe
def reduce(ctx):
    if ctx.has_arg("other"):  # max.other / min.other are elementwise
        from .elementwise import broadcast
        return broadcast(ctx, [ctx.arg(0, "self"), ctx.arg(1, "other")], ctx.out_shape)
    src = ctx.arg(0, "self")
    lay = ctx.lay(src)
    ndim = len(lay)
    dim_arg = _arg_or(ctx, "dim", None)
    keep_arg = _arg_or(ctx, "keepdim", False)
    if isinstance(dim_arg, torch.fx.Node) or (isinstance(dim_arg, (list, tuple)) and
                                             any(not isinstance(d, int) for d in dim_arg)):
        dim_arg = None  # a symbolic dim: treat as a reduction over every dim (the conservative reading)
    dims = _dims(dim_arg, ndim)
    for d in dims:
        ctx.inexact(lay[d], f"reduced over by aten.{ctx.op}")
    keep = [None if d in dims else lay[d] for d in range(ndim)] if keep_arg else \
        [lay[d] for d in range(ndim) if d not in dims]
    val = ctx.out_val
    if isinstance(val, (list, tuple)):
        return [tuple(keep) for _ in val]
    return tuple(keep)


@rule("softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax")
def softmax(ctx):
    src = ctx.arg(0, "self")
    lay = ctx.lay(src)
    ctx.inexact(lay[ctx.arg(1, "dim") % len(lay)], "normalised over by softmax")
    return tuple(lay)


def _affine_norm(ctx, src, weight, bias, k):
    lay = ctx.lay(src)
    for lo in lay[-k:]:
        ctx.inexact(lo, f"normalised over by aten.{ctx.op}")
    for p in (weight, bias):
        if ctx.is_tensor(p):
            for d, lo in enumerate(ctx.lay(p)):
                ctx.unify(lo, lay[len(lay) - k + d])
    return tuple(lay)


def _fixed_shape(ctx, src, weight, shape) -> None:
    """Without a weight nothing the shrinker slices holds ``normalized_shape``: it is a fixed size."""
    if not ctx.is_tensor(weight):
        for lay, n in zip(ctx.lay(src)[-len(shape):], shape):
            ctx.literal(lay, n, strict=True)


@rule("layer_norm", "native_layer_norm")
def layer_norm(ctx):
    src, shape = ctx.arg(0, "input"), ctx.arg(1, "normalized_shape")
    _fixed_shape(ctx, src, ctx.arg(2, "weight"), shape)
    out = _affine_norm(ctx, src, ctx.arg(2, "weight"), ctx.arg(3, "bias"), len(shape))
    if ctx.op == "native_layer_norm":
        stats = tuple(out[:-len(shape)]) + (None,) * len(shape)
        return [out, stats, stats]
    return out


@rule("rms_norm", "_fused_rms_norm")
def rms_norm(ctx):
    src, shape = ctx.arg(0, "input"), ctx.arg(1, "normalized_shape")
    _fixed_shape(ctx, src, ctx.arg(2, "weight"), shape)
    out = _affine_norm(ctx, src, ctx.arg(2, "weight"), None, len(shape))
    if isinstance(ctx.out_val, (list, tuple)):
        return [out] + [tuple(out[:-len(shape)]) + (None,) * len(shape)] * (len(ctx.out_val) - 1)
    return out


@rule("_native_batch_norm_legit_no_training", "batch_norm", "_native_batch_norm_legit", "native_batch_norm",
      "_batch_norm_with_update", "_batch_norm_no_update")
def batch_norm(ctx):
    """Eval-mode batch norm is a per-channel affine map over dim 1: exact."""
    src = ctx.arg(0, "input")
    lay = ctx.lay(src)
    for a in ctx.node.args[1:5]:
        if ctx.is_tensor(a):
            ctx.unify(ctx.lay(a)[0], lay[1])
    val = ctx.out_val
    if isinstance(val, (list, tuple)):
        return [tuple(lay)] + [ctx.fresh(tuple(int(s) for s in v.shape), "batch-norm statistics")
                               for v in val[1:]]
    return tuple(lay)


@rule("group_norm", "native_group_norm")
def group_norm(ctx):
    src = ctx.arg(0, "input")
    lay = ctx.lay(src)
    ctx.block(lay[1], "group norm groups channels")
    for a in (ctx.arg(1, "weight"), ctx.arg(2, "bias")):
        if ctx.is_tensor(a):
            ctx.unify(ctx.lay(a)[0], lay[1])
    if isinstance(ctx.out_val, (list, tuple)):
        return [tuple(lay)] + [ctx.fresh(tuple(int(s) for s in v.shape), "group-norm statistics")
                               for v in ctx.out_val[1:]]
    return tuple(lay)
