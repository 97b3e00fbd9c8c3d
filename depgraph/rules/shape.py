"""Shape ops: reshape/view split and merge, transpose/permute, expand, slice/cat/split, selection."""
from __future__ import annotations

from ..layout import make_cat, make_prod
from . import rule


@rule("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
      "reshape_as", "squeeze_", "unsqueeze_")
def reshape(ctx):
    """Row-major reshape: split and merge dims chunk by chunk (size-1 dims carry nothing)."""
    src = ctx.arg(0, "self")
    return reshape_layouts(ctx, ctx.shape(src), ctx.lay(src), ctx.out_shape)


def reshape_layouts(ctx, in_shape, in_lay, out_shape) -> tuple:
    ins = [(d, n) for d, n in enumerate(in_shape) if n != 1]
    outs = [(d, n) for d, n in enumerate(out_shape) if n != 1]
    out = [None] * len(out_shape)
    i = j = 0
    while i < len(ins) and j < len(outs):
        ci, co = [ins[i]], [outs[j]]
        pi, po = ins[i][1], outs[j][1]
        i, j = i + 1, j + 1
        while pi != po:
            if pi < po:
                ci.append(ins[i])
                pi *= ins[i][1]
                i += 1
            else:
                co.append(outs[j])
                po *= outs[j][1]
                j += 1
        merged = make_prod([in_lay[d] for d, _ in ci])
        parts = ctx.split(merged, [n for _, n in co])
        if parts is None:
            parts = ctx.fresh([n for _, n in co], "reshape that does not align with the channel structure")
        for (d, _), p in zip(co, parts):
            out[d] = p
    return tuple(out)


@rule("transpose", "swapaxes", "t", "numpy_T", "transpose_")
def transpose(ctx):
    lay = list(ctx.lay(ctx.arg(0, "self")))
    if len(lay) < 2:
        return tuple(lay)
    d0, d1 = ctx.arg(1, "dim0", 0), ctx.arg(2, "dim1", 1)
    if ctx.op in ("t", "numpy_T"):
        d0, d1 = 0, len(lay) - 1
    lay[d0], lay[d1] = lay[d1], lay[d0]
    return tuple(lay)


@rule("permute")
def permute(ctx):
    lay = ctx.lay(ctx.arg(0, "self"))
    return tuple(lay[d] for d in ctx.arg(1, "dims"))


@rule("movedim")
def movedim(ctx):
    lay = list(ctx.lay(ctx.arg(0, "self")))
    src, dst = ctx.arg(1, "source"), ctx.arg(2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    n = len(lay)
    src, dst = [s % n for s in src], [d % n for d in dst]
    order = [d for d in range(n) if d not in src]
    for s, d in sorted(zip(dst, src)):
        order.insert(s, d)
    return tuple(lay[d] for d in order)


@rule("expand", "expand_as", "broadcast_to")
def expand(ctx):
    """Dims grown from size 1 are new *broadcast* spaces: no parameter stands behind them."""
    src = ctx.arg(0, "self")
    shp, lay, out_shape = ctx.shape(src), ctx.lay(src), ctx.out_shape
    off = len(out_shape) - len(shp)
    out = []
    for d, n in enumerate(out_shape):
        if d >= off and shp[d - off] == n:
            out.append(lay[d - off])
        else:
            out.append(ctx.fresh((n,), broadcast=True)[0])
    return tuple(out)


@rule("repeat")
def repeat(ctx):
    src = ctx.arg(0, "self")
    shp, lay, reps = ctx.shape(src), ctx.lay(src), list(ctx.arg(1, "repeats"))
    off = len(reps) - len(shp)
    out = []
    for d, r in enumerate(reps):
        inner = lay[d - off] if d >= off else None
        rep = ctx.fresh((r,), broadcast=True)[0] if r > 1 else None
        out.append(make_prod([rep, inner]))  # tile: index = k * n + i
    return tuple(out)


@rule("repeat_interleave")
def repeat_interleave(ctx):
    src = ctx.arg(0, "self")
    reps, dim = ctx.arg(1, "repeats"), ctx.arg(2, "dim")
    if not isinstance(reps, int) or dim is None:
        return _block_all(ctx, src, "repeat_interleave with tensor repeats or no dim")
    lay = list(ctx.lay(src))
    dim %= len(lay)
    lay[dim] = make_prod([lay[dim], ctx.fresh((reps,), broadcast=True)[0]])
    return tuple(lay)


def _norm_range(start, end, n):
    start = 0 if start is None else start
    end = n if end is None else end
    start = start + n if start < 0 else start
    end = end + n if end < 0 else end
    return max(0, min(start, n)), max(0, min(end, n))


def _sub(ctx, lay, start, stop, out_size):
    """Layout of a sub-range of ``lay``; a single selected channel is never prunable on its own."""
    if lay is None:
        return None
    piece = ctx.slice(lay, start, stop)
    if piece is None:
        return ctx.fresh((out_size,), "slice that does not align with the channel structure")[0]
    if out_size == 1:
        ctx.block(piece, "single channel selected by a slice")
        return None
    return piece


@rule("slice", "narrow")
def slice_(ctx):
    src = ctx.arg(0, "self")
    lay, shp = list(ctx.lay(src)), ctx.shape(src)
    dim = ctx.arg(1, "dim", 0) % len(shp)
    n = shp[dim]
    if ctx.op == "narrow":
        start = ctx.arg(2, "start")
        start, end = _norm_range(start, start + ctx.arg(3, "length"), n)
        step = 1
    else:
        start, end = _norm_range(ctx.arg(2, "start"), ctx.arg(3, "end"), n)
        step = ctx.arg(4, "step", 1)
    out_n = ctx.out_shape[dim]
    if step != 1:
        ctx.block(lay[dim], "strided slice")
        lay[dim] = ctx.fresh((out_n,), "strided slice")[0]
    elif (start, end) != (0, n):
        lay[dim] = _sub(ctx, lay[dim], start, end, out_n) if out_n > 0 else None
    return tuple(lay)


def _pieces(ctx, src, sizes, dim):
    lay = ctx.lay(src)
    out, off = [], 0
    for n in sizes:
        piece = list(lay)
        piece[dim] = _sub(ctx, lay[dim], off, off + n, n) if (off, off + n) != (0, ctx.shape(src)[dim]) else lay[dim]
        out.append(tuple(piece))
        off += n
    return out


@rule("split", "split_with_sizes", "chunk", "tensor_split")
def split(ctx):
    src = ctx.arg(0, "self")
    shp = ctx.shape(src)
    dim = ctx.arg(2, "dim", 0) % len(shp)
    sizes = [int(v.shape[dim]) for v in ctx.out_val]
    return _pieces(ctx, src, sizes, dim)


@rule("unbind")
def unbind(ctx):
    src = ctx.arg(0, "self")
    lay = list(ctx.lay(src))
    dim = ctx.arg(1, "dim", 0) % len(lay)
    ctx.block(lay[dim], "dim unbound into separate tensors")
    rest = tuple(lay[:dim] + lay[dim + 1:])
    return [rest for _ in ctx.out_val]


@rule("select")
def select(ctx):
    src = ctx.arg(0, "self")
    lay = list(ctx.lay(src))
    dim = ctx.arg(1, "dim") % len(lay)
    ctx.block(lay[dim], "single index selected by aten.select")
    return tuple(lay[:dim] + lay[dim + 1:])


@rule("cat", "concat", "concatenate")
def cat(ctx):
    tensors = [t for t in ctx.arg(0, "tensors") if ctx.is_tensor(t) and 0 not in ctx.shape(t)]
    out_shape = ctx.out_shape
    dim = ctx.arg(1, "dim", 0) % len(out_shape)
    out = [None] * len(out_shape)
    parts = []
    for t in tensors:
        lay, shp = ctx.lay(t), ctx.shape(t)
        if shp[dim] == 1:
            parts.append(ctx.store.single(ctx.reason("single channel"), ctx.reason("single channel concatenated")))
        else:
            parts.append(lay[dim])
        for d, n in enumerate(shp):
            if d == dim or n == 1:
                continue
            if out[d] is None:
                out[d] = lay[d]
            else:
                ctx.unify(out[d], lay[d])
    out[dim] = make_cat(parts) if out_shape[dim] > 1 else None
    for d, n in enumerate(out_shape):
        if n > 1 and out[d] is None:
            out[d] = ctx.fresh((n,), "broadcast dim without a source")[0]
    return tuple(out)


@rule("stack")
def stack(ctx):
    tensors = [t for t in ctx.arg(0, "tensors") if ctx.is_tensor(t)]
    out_shape = ctx.out_shape
    dim = ctx.arg(1, "dim", 0) % len(out_shape)
    inner = [None] * (len(out_shape) - 1)
    for t in tensors:
        for d, lay in enumerate(ctx.lay(t)):
            if lay is None:
                continue
            if inner[d] is None:
                inner[d] = lay
            else:
                ctx.unify(inner[d], lay)
    new = ctx.fresh((out_shape[dim],), "stacked dim")[0]
    return tuple(inner[:dim]) + (new,) + tuple(inner[dim:])


def _block_all(ctx, src, why):
    for lay in ctx.lay(src):
        ctx.block(lay, why)
    return ctx.fresh(ctx.out_shape, why)


@rule("index_select", "gather", "flip", "roll", "index_add", "scatter", "scatter_add", "sort", "argsort",
      "topk", "cumsum", "cumprod", "diff")
def along_dim(ctx):
    """Ops that move data along one dim: that dim is unprunable, the others pass through."""
    src = ctx.arg(0, "self")
    lay = list(ctx.lay(src))
    dims = ctx.arg(1, "dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    for d in dims:
        ctx.block(lay[d % len(lay)], f"data moved along the dim by aten.{ctx.op}")
    val = ctx.out_val
    import torch

    def like(v):
        shp = tuple(int(s) for s in v.shape)
        if len(shp) != len(lay):
            return ctx.fresh(shp, f"aten.{ctx.op} output")
        return tuple(lay[d] if shp[d] == ctx.shape(src)[d] and d not in [x % len(lay) for x in dims]
                     else ctx.fresh((shp[d],), f"aten.{ctx.op} output")[0] for d in range(len(shp)))

    if isinstance(val, torch.Tensor):
        return like(val)
    return [like(v) for v in val]


@rule("index")
def index(ctx):
    """Advanced indexing: indexed dims are unprunable; leading untouched dims pass through."""
    src = ctx.arg(0, "self")
    lay = ctx.lay(src)
    indices = ctx.arg(1, "indices")
    lead = 0
    while lead < len(indices) and indices[lead] is None:
        lead += 1
    for d, ix in enumerate(indices):
        if ix is not None:
            ctx.block(lay[d], "dim indexed by a tensor")
    out_shape = ctx.out_shape
    n_idx = len(indices)
    tail = list(lay[n_idx:])
    out = list(lay[:lead]) if indices and all(i is None for i in indices[:lead]) else []
    middle = len(out_shape) - len(out) - len(tail)
    out += list(ctx.fresh(out_shape[len(out):len(out) + middle], "result of advanced indexing"))
    out += tail
    if len(out) != len(out_shape):
        return _block_all(ctx, src, "advanced indexing")
    return tuple(out)


@rule("constant_pad_nd", "pad")
def pad(ctx):
    src = ctx.arg(0, "self")
    lay, pads = list(ctx.lay(src)), list(ctx.arg(1, "pad"))
    for k in range(len(pads) // 2):
        d = len(lay) - 1 - k
        if pads[2 * k] or pads[2 * k + 1]:
            ctx.block(lay[d], "padded dim")
            lay[d] = ctx.fresh((ctx.out_shape[d],), "padded dim")[0]
    return tuple(lay)
