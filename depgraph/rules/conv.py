"""Convolutions and pooling (channels-first): weight (out, in/groups, *kernel)."""
from __future__ import annotations

import torch

from . import rule


@rule("conv1d", "conv2d", "conv3d", "convolution", "_convolution")
def conv(ctx):
    x, w, b = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
    groups = ctx.arg(6, "groups", 1) if ctx.op.startswith("conv") and ctx.op[-1] == "d" else ctx.arg(8, "groups", 1)
    if ctx.op in ("convolution", "_convolution") and ctx.arg(6, "transposed", False):
        return _block(ctx, x, "transposed convolution")
    xl, wl = ctx.lay(x), ctx.lay(w)
    for lo in wl[2:]:
        ctx.block(lo, "convolution kernel dim")
    cin, cout = ctx.shape(x)[1], ctx.shape(w)[0]
    if groups == 1:
        ctx.unify(xl[1], wl[1])
    elif groups == cin == cout:  # depthwise: channel c only sees input channel c
        ctx.unify(xl[1], wl[0])
    else:
        return _block(ctx, x, "grouped convolution")
    if ctx.is_tensor(b):
        ctx.unify(ctx.lay(b)[0], wl[0])
    out_shape = ctx.out_shape
    spatial = ctx.fresh(out_shape[2:], "spatial dim")
    return (xl[0], wl[0]) + tuple(spatial)


def _block(ctx, x, why):
    for lo in ctx.lay(x):
        ctx.block(lo, why)
    for a in ctx.node.args[1:3]:
        if ctx.is_tensor(a):
            for lo in ctx.lay(a):
                ctx.block(lo, why)
    return ctx.fresh(ctx.out_shape, why)


@rule("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
      "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool2d",
      "max_pool2d_with_indices", "_adaptive_avg_pool2d")
def pool(ctx):
    """Pooling acts on the spatial dims only: batch and channel dims pass through."""
    x = ctx.arg(0, "self")
    xl = ctx.lay(x)
    val = ctx.out_val

    def like(v):
        shp = tuple(int(s) for s in v.shape)
        lead = len(shp) - (len(xl) - 2) if len(xl) > 2 else len(shp)
        keep = tuple(xl[:lead]) if lead <= 2 else tuple(xl[:2])
        return keep + ctx.fresh(shp[len(keep):], "spatial dim")

    if isinstance(val, torch.Tensor):
        return like(val)
    return [like(v) for v in val]
