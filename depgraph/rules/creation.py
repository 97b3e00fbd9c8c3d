"""Ops that create tensors from sizes: their dims are fixed by the model code, never prunable."""
from __future__ import annotations

from . import rule


@rule("arange", "zeros", "ones", "full", "empty", "scalar_tensor", "rand", "randn", "randint", "linspace",
      "eye", "empty_strided", "tensor", "randperm")
def create(ctx):
    return ctx.fresh(ctx.out_shape, "tensor created from a fixed size")


@rule("new_zeros", "new_ones", "new_full", "new_empty")
def create_from(ctx):
    """``x.new_empty(*x.shape[:-1], n)``: a dim the size of ``x``'s dim at the same position is read from ``x``
    (it follows ``x`` when ``x`` shrinks); the others are fixed sizes. The values are constant (or written
    later, e.g. by ``copy_`` into slices, as MLA builds its keys), so only sizes can differ."""
    src = ctx.arg(0, "self")
    shp, lay = ctx.shape(src), ctx.lay(src)
    out = list(ctx.fresh(ctx.out_shape, "tensor created from a fixed size"))
    for d, n in enumerate(ctx.out_shape):
        if d < len(shp) and shp[d] == n and n > 1 and lay[d] is not None:
            out[d] = lay[d]
    return tuple(out)


@rule("_assert_scalar", "sym_constrain_range_for_size", "_local_scalar_dense", "item", "sym_size",
      "_assert_async", "sym_numel", "sym_stride")
def no_tensor(ctx):
    return None
