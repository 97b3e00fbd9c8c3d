"""Elementwise ops with broadcasting: aligned dims of equal size are the same channel space."""
from __future__ import annotations

from . import rule

_UNARY_AND_BINARY = (
    "add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "remainder", "neg", "pow", "rsqrt",
    "sqrt", "exp", "log", "log1p", "expm1", "silu", "gelu", "relu", "relu6", "tanh", "sigmoid", "sin", "cos",
    "erf", "abs", "reciprocal", "square", "sign", "floor", "ceil", "round", "clamp", "clamp_min", "clamp_max",
    "minimum", "maximum", "hardtanh", "leaky_relu", "elu", "softplus", "mish", "hardswish", "hardsigmoid",
    "gelu_", "relu_", "silu_", "add_", "mul_", "div_", "sub_", "where", "masked_fill", "lerp", "addcmul",
    "addcdiv", "eq", "ne", "lt", "le", "gt", "ge", "__and__", "__or__", "bitwise_and", "bitwise_or",
    "bitwise_not", "logical_and", "logical_or", "logical_not", "isnan", "isinf", "nan_to_num",
    "clone", "contiguous", "alias", "detach", "to", "_to_copy", "type_as", "dropout", "lift_fresh_copy",
    "zeros_like", "ones_like", "full_like", "empty_like", "fill", "copy", "_assert_tensor_metadata",
    "feature_dropout", "alpha_dropout", "native_dropout",
    "copy_", "fill_", "zero_", "masked_fill_", "clamp_", "neg_", "exp_", "tanh_", "sigmoid_", "pow_", "rsqrt_",
    "where_", "sqrt_", "abs_", "sign_", "log_", "erf_", "square_", "reciprocal_",
)


def broadcast(ctx, inputs, out_shape) -> tuple:
    """Couple the right-aligned dims of every tensor in ``inputs`` with the output's dims."""
    out = [None] * len(out_shape)
    for a in inputs:
        if not ctx.is_tensor(a):
            continue
        shp, lay = ctx.shape(a), ctx.lay(a)
        off = len(out_shape) - len(shp)
        for d, n in enumerate(shp):
            if n == 1 or lay[d] is None or off + d < 0 or out_shape[off + d] != n:
                continue
            if out[off + d] is None:
                out[off + d] = lay[d]
            else:
                ctx.unify(out[off + d], lay[d])
    for d, n in enumerate(out_shape):
        if n > 1 and out[d] is None:
            out[d] = ctx.fresh((n,), "broadcast dim without a source")[0]
    return tuple(out)


def _tensor_args(ctx):
    out = []
    for a in list(ctx.node.args) + list(ctx.node.kwargs.values()):
        if isinstance(a, (list, tuple)):
            out.extend(x for x in a if ctx.is_tensor(x))
        elif ctx.is_tensor(a):
            out.append(a)
    return out


@rule(*_UNARY_AND_BINARY)
def elementwise(ctx):
    import torch

    val = ctx.out_val
    if not isinstance(val, torch.Tensor):
        if isinstance(val, (list, tuple)):  # e.g. native_dropout -> (out, mask)
            lays = broadcast(ctx, _tensor_args(ctx), tuple(int(s) for s in val[0].shape))
            return [lays for _ in val]
        return None
    return broadcast(ctx, _tensor_args(ctx), ctx.out_shape)


@rule("tril", "triu")
def triangular(ctx):
    """Position-dependent over the last two dims: those spaces cannot be pruned."""
    out = broadcast(ctx, [ctx.arg(0, "self")], ctx.out_shape)
    for lay in out[-2:]:
        ctx.block(lay, "position-dependent mask")
    return out
