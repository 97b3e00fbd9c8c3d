"""Ops that create tensors from sizes: their dims are fixed by the model code, never prunable."""
from __future__ import annotations

from ..fills import FILLS, Pending
from . import rule


@rule("arange", "empty", "scalar_tensor", "rand", "randn", "randint", "linspace", "eye", "empty_strided",
      "new_empty_strided", "tensor", "randperm")
def create(ctx):
    return ctx.fresh(ctx.out_shape, "tensor created from a fixed size")


@rule(*FILLS)
def fill(ctx):
    """A tensor filled with one value: its dims may join the spaces they meet, pending the proof in
    :mod:`depgraph.fills` that each size is read off the dims it meets (blocked otherwise)."""
    out = ctx.fresh(ctx.out_shape)
    for d, lay in enumerate(out):
        if lay is not None:
            ctx.flow.pending.append(Pending(lay, ctx.node, d, ctx.reason("tensor created from a fixed size")))
    return out


@rule("new_empty")
def new_empty(ctx):
    """``x.new_empty(*x.shape[:-1], n)``, to be written into (MLA builds its keys by ``copy_`` into slices): a dim
    the size of ``x``'s dim at the same position is taken to be read from ``x`` (a literal the tagged export must
    prove, see :func:`depgraph.graph.read_attributes`); the others are fixed sizes. Uninitialised memory carries no
    values of its own, so only sizes can differ."""
    src = ctx.arg(0, "self")
    shp, lay = ctx.shape(src), ctx.lay(src)
    out = list(ctx.fresh(ctx.out_shape, "tensor created from a fixed size"))
    for d, n in enumerate(ctx.out_shape):
        if d < len(shp) and shp[d] == n and n > 1 and lay[d] is not None:
            out[d] = lay[d]
            ctx.literal(lay[d], n)  # equal by value: graph.read_attributes proves it was read off that dim
    return tuple(out)
