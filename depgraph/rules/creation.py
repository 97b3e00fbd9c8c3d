"""Ops that create tensors from sizes: their dims are fixed by the model code, never prunable."""
from __future__ import annotations

from . import rule


@rule("arange", "zeros", "ones", "full", "empty", "scalar_tensor", "rand", "randn", "randint", "linspace",
      "eye", "new_zeros", "new_ones", "new_full", "new_empty", "empty_strided", "tensor", "randperm")
def create(ctx):
    return ctx.fresh(ctx.out_shape, "tensor created from a fixed size")


@rule("_assert_scalar", "sym_constrain_range_for_size", "_local_scalar_dense", "item", "sym_size",
      "_assert_async", "sym_numel", "sym_stride")
def no_tensor(ctx):
    return None
