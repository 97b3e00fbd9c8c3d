"""Shape ops: reshape/view split and merge, transpose/permute, expand, slice/cat/split, selection."""
from __future__ import annotations

from ..layout import make_cat, make_prod
from . import RuleError, rule
from .elementwise import broadcast


@rule("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
      "reshape_as", "squeeze_", "unsqueeze_")
def reshape(ctx):
    """Row-major reshape: split and merge dims chunk by chunk (size-1 dims carry nothing)."""
    src = ctx.arg(0, "self")
    sizes = None
    for name in ("size", "shape"):
        if ctx.has_arg(name):
            sizes = list(ctx.arg(1, name))
    if ctx.op == "unflatten":  # the new sizes replace dim ``dim``
        dim = ctx.arg(1, "dim") % len(ctx.shape(src))
        sizes = [None] * dim + list(ctx.arg(2, "sizes")) + [None] * (len(ctx.shape(src)) - dim - 1)
    return reshape_layouts(ctx, ctx.shape(src), ctx.lay(src), ctx.out_shape, sizes)


_SIZED = ("view", "reshape", "_unsafe_view")  # ops whose int arguments are the output sizes, in order


def reshape_layouts(ctx, in_shape, in_lay, out_shape, literals=None) -> tuple:
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
            if literals is not None and d < len(literals):
                # a split into fixed factors must be owned; a merge's size (or a dim kept whole) is mostly read
                # off the tensor: each is proved by graph.read_attributes, or it blocks
                ctx.literal(p, literals[d], strict=len(co) > 1, at=d if ctx.op in _SIZED else None)
    return tuple(out)


@rule("transpose", "swapaxes", "t", "numpy_T", "transpose_")
def transpose(ctx):
    lay = list(ctx.lay(ctx.arg(0, "self")))
    if len(lay) < 2:
        return tuple(lay)
    if ctx.op in ("t", "numpy_T"):
        d0, d1 = 0, len(lay) - 1
    elif ctx.has_arg("axis0"):
        d0, d1 = ctx.arg(1, "axis0"), ctx.arg(2, "axis1")
    else:
        d0, d1 = ctx.arg(1, "dim0", 0), ctx.arg(2, "dim1", 1)
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
    sizes = list(ctx.arg(1, "size")) if ctx.op == "expand" else None
    off = len(out_shape) - len(shp)
    out = []
    for d, n in enumerate(out_shape):
        if d >= off and shp[d - off] == n:
            out.append(lay[d - off])
            if sizes is not None and n > 1 and d < len(sizes):  # a kept dim by a fixed size (not -1): proved
                ctx.literal(lay[d - off], sizes[d])  # read off that dim, or it blocks (graph.read_attributes)
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
    if not (isinstance(start, int) and isinstance(end, int)):  # symbolic bounds (fx Nodes, SymInts)
        return start, end
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
        start, length = ctx.arg(2, "start"), ctx.arg(3, "length")
        end = start + length if isinstance(start, int) and isinstance(length, int) else None
        start, end = _norm_range(start, end, n) if end is not None else (start, length)
        step = 1
    else:
        start, end = _norm_range(ctx.arg(2, "start"), ctx.arg(3, "end"), n)
        step = ctx.arg(4, "step", 1)
    out_n = ctx.out_shape[dim]
    if not all(isinstance(v, int) for v in (start, end, step)):
        ctx.block(lay[dim], "slice with symbolic bounds")
        lay[dim] = ctx.fresh((out_n,), "slice with symbolic bounds")[0]
    elif step != 1:
        lay[dim] = _strided(ctx, lay[dim], n, start, step, out_n)
    elif (start, end) != (0, n):
        whole = lay[dim]
        lay[dim] = _sub(ctx, whole, start, end, out_n) if out_n > 0 else None
        _slice_literals(ctx, whole, lay[dim], start, end, n)
    return tuple(lay)


def _slice_literals(ctx, whole, piece, start, end, n) -> None:
    """A slice at fixed offsets: an offset counted from the start must follow the pruned sizes of what lies before
    it. One counted from the end (``x[..., :-2]``, ``x[..., -2:]``) is read off the dim's size when the model runs,
    so it follows whatever is pruned before it; what lies after it must keep its size: that tail is blocked."""
    raw_start, raw_end = ctx.arg(2, "start"), ctx.arg(3, "end" if ctx.op == "slice" else "length")
    from_end = [ctx.op == "slice" and isinstance(raw, int) and raw < 0 for raw in (raw_start, raw_end)]
    for back, at in zip(from_end, (start, end)):
        if back and at < n and whole is not None:
            ctx.block(ctx.slice(whole, at, n), "fixed-size tail after a slice bound counted from the end")
    if start > 0 and whole is not None and not from_end[0]:
        before = ctx.slice(whole, 0, start)
        ctx.literal(before, raw_start if isinstance(raw_start, int) else start, strict=True)
    if end < n and not from_end[1]:
        ctx.literal(piece, raw_end if isinstance(raw_end, int) else end, strict=True)


def _pieces(ctx, src, sizes, dim):
    lay = ctx.lay(src)
    out, off = [], 0
    for n in sizes:
        piece = list(lay)
        piece[dim] = _sub(ctx, lay[dim], off, off + n, n) if (off, off + n) != (0, ctx.shape(src)[dim]) else lay[dim]
        out.append(tuple(piece))
        off += n
    return out


def _strided(ctx, lay, n, start, step, out_n):
    """x[start::step] over a whole residue class (interleaved gate/up halves): the dim is (n/step x step) and
    the slice keeps the first factor at one index of the second; any other strided slice is blocked."""
    if lay is not None and n % step == 0 and 0 <= start < step and out_n == n // step:
        parts = ctx.split(lay, [n // step, step])
        if parts is not None:
            outer, inner = (parts + [None, None])[:2]
            ctx.block(inner, "one index of a strided slice's step selected")
            return outer
    ctx.block(lay, "strided slice")
    return ctx.fresh((out_n,), "strided slice")[0]


@rule("split", "split_with_sizes", "chunk", "tensor_split")
def split(ctx):
    src = ctx.arg(0, "self")
    shp = ctx.shape(src)
    dim = ctx.arg(2, "dim", 0) % len(shp)
    sizes = [int(v.shape[dim]) for v in ctx.out_val]
    out = _pieces(ctx, src, sizes, dim)
    if ctx.op in ("split", "split_with_sizes") or (ctx.op == "tensor_split" and ctx.has_arg("indices")):
        for i, (piece, n) in enumerate(zip(out, sizes)):  # fixed split sizes (chunk/sections: nothing fixed)
            if n != shp[dim]:
                ctx.literal(piece[dim], n, strict=True, at=i if ctx.op == "split_with_sizes" else None)
    return out


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


# ops that move data along some dims: op -> the schema argument naming those dims
MOVES_ALONG = {
    "index_select": "dim", "flip": "dims", "roll": "dims", "sort": "dim", "argsort": "dim",
    "cumsum": "dim", "cumprod": "dim", "cummax": "dim", "cummin": "dim", "logcumsumexp": "dim", "diff": "dim",
    "index_add": "dim", "index_copy": "dim", "index_fill": "dim", "kthvalue": "dim", "msort": None,
    "take_along_dim": "dim", "index_reduce": "dim",
}


def _moved_dims(ctx, ndim) -> list:
    """Dims an op moves data along, read by its schema; ``roll``/``take_along_dim`` without dims act on
    the flattened tensor (every dim)."""
    name = MOVES_ALONG[ctx.op]
    dims = 0 if name is None else ctx.arg(1, name)
    if dims is None or (ctx.op in ("roll",) and list(dims) == []):
        return list(range(ndim))
    dims = [dims] if isinstance(dims, int) else list(dims)
    if any(not isinstance(d, int) for d in dims):
        raise RuleError(f"symbolic dims {dims}")
    return sorted({d % ndim for d in dims}) if ndim else []


@rule(*MOVES_ALONG)
def along_dim(ctx):
    """Ops that move data along dims: those dims are unprunable; the others pass through."""
    import torch

    src = ctx.arg(0, "self")
    lay, shp = list(ctx.lay(src)), ctx.shape(src)
    moved = _moved_dims(ctx, len(lay))
    why = f"data moved along the dim by aten.{ctx.op}"
    for d in moved:
        ctx.block(lay[d], why)
    for a in ctx.node.all_input_nodes[1:]:  # index tensors, sources, prepend/append: coupled where aligned
        if ctx.is_tensor(a):
            al, ash = ctx.lay(a), ctx.shape(a)
            for d, n in enumerate(ash):
                if len(ash) == len(shp) and d not in moved and n == shp[d]:
                    ctx.unify(al[d], lay[d])
                else:
                    ctx.block(al[d], why)

    def like(v):
        out_shp = tuple(int(s) for s in v.shape)
        if len(out_shp) != len(lay):
            return ctx.fresh(out_shp, f"aten.{ctx.op} output")
        return tuple(lay[d] if out_shp[d] == shp[d] and d not in moved
                     else ctx.fresh((out_shp[d],), f"aten.{ctx.op} output")[0] for d in range(len(out_shp)))

    val = ctx.out_val
    if isinstance(val, torch.Tensor):
        return like(val)
    return [like(v) for v in val]


@rule("gather")
def gather(ctx):
    """out[..., i, ...] = self[..., index[..., i, ...], ...] along ``dim``: out has index's shape."""
    src, index = ctx.arg(0, "self"), ctx.arg(2, "index")
    lay, shp = ctx.lay(src), ctx.shape(src)
    il, ish = ctx.lay(index), ctx.shape(index)
    dim = ctx.arg(1, "dim") % len(shp)
    why = "data moved along the dim by aten.gather"
    ctx.block(lay[dim], why)
    for d, n in enumerate(ish):
        if d != dim:
            if n == shp[d]:
                ctx.unify(il[d], lay[d])
            else:
                ctx.block(lay[d], "aten.gather reads part of the dim")
    return tuple(il)


@rule("scatter", "scatter_add", "scatter_reduce", "scatter_", "scatter_add_", "scatter_reduce_")
def scatter(ctx):
    """out = self with src written along ``dim`` at index: self's dims, ``dim`` unprunable."""
    src = ctx.arg(0, "self")
    lay, shp = ctx.lay(src), ctx.shape(src)
    dim = ctx.arg(1, "dim") % len(shp)
    why = f"data moved along the dim by aten.{ctx.op}"
    ctx.block(lay[dim], why)
    for a in ctx.node.all_input_nodes[1:]:
        if ctx.is_tensor(a):
            al, ash = ctx.lay(a), ctx.shape(a)
            for d, n in enumerate(ash):
                if len(ash) == len(shp) and d != dim and n == shp[d]:
                    ctx.unify(al[d], lay[d])
                else:
                    ctx.block(al[d], why)
                    if len(ash) == len(shp) and d != dim:
                        ctx.block(lay[d], f"aten.{ctx.op} writes part of the dim")
    return tuple(lay)


def _index_positions(ctx, indices) -> tuple:
    """(self dims consumed by each index, their tensors): a bool mask consumes as many dims as it has."""
    consumed, tensors, d = [], [], 0
    for ix in indices:
        if ix is None:
            d += 1
            continue
        if not ctx.is_tensor(ix):
            raise RuleError(f"index {ix!r} is not a tensor")
        k = ix.meta["val"].dim() if ix.meta["val"].dtype == __import__("torch").bool else 1
        consumed.append(list(range(d, d + k)))
        tensors.append(ix)
        d += k
    return consumed, tensors


@rule("index", "_unsafe_index")
def index(ctx):
    """Advanced indexing: indexed dims are unprunable; the index tensors' broadcast dims come from the
    index tensors; untouched dims pass through (placed as PyTorch places them)."""
    import torch

    src = ctx.arg(0, "self")
    lay, out_shape = ctx.lay(src), ctx.out_shape
    consumed, tensors = _index_positions(ctx, list(ctx.arg(1, "indices")))
    flat = [d for c in consumed for d in c]
    if len(tensors) == 1 and len(flat) == 1 and _constant_positions(ctx, tensors[0], lay[flat[0]]):
        pass  # fixed positions: only the part of the dim they read is blocked (depgraph.indices)
    else:
        for d in flat:
            ctx.block(lay[d], "dim indexed by a tensor")
    rest = [d for d in range(len(lay)) if d not in flat]
    bool_mask = any(t.meta["val"].dtype == torch.bool for t in tensors)
    nb = len(out_shape) - len(rest)
    if bool_mask or nb < 0:
        bdims = list(ctx.fresh(out_shape[:max(nb, 0)], "result of a boolean-mask index"))
    else:
        bdims = list(broadcast(ctx, tensors, tuple(out_shape[:nb]) if flat and flat[0] == 0 or
                               not _adjacent(consumed) else _bshape(ctx, tensors)))
    if len(bdims) != nb:
        raise RuleError("advanced-index result rank")
    if _adjacent(consumed) and flat:
        first = flat[0]
        before = [d for d in rest if d < first]
        after = [d for d in rest if d > first]
        out = [lay[d] for d in before] + bdims + [lay[d] for d in after]
    else:
        out = bdims + [lay[d] for d in rest]
    return tuple(out)


def _constant_positions(ctx, ix, lay) -> bool:
    """An index by a 1-D integer constant: block the head/tail of ``lay`` it reads (its values known), or leave
    that to :func:`depgraph.indices.prove` (a constant made on the meta twin); False for any other index."""
    import torch

    from ..indices import ConstIndex, block_parts, constant_of, fixed_parts

    t = constant_of(ctx.flow.cap, ix)
    if t is None or t.dim() != 1 or t.dtype not in (torch.int64, torch.int32) or lay is None:
        return False
    n, why = ctx.store.expand(lay).size, ctx.reason("dim indexed by a tensor")
    if t.device.type == "meta":
        ctx.flow.const_index.append(ConstIndex(lay, n, ctx.node, why))
    else:
        block_parts(ctx.store, lay, fixed_parts([int(v) for v in t.tolist()], n), why)
    return True


def _adjacent(consumed) -> bool:
    flat = [d for c in consumed for d in c]
    return flat == list(range(flat[0], flat[0] + len(flat))) if flat else True


def _bshape(ctx, tensors) -> tuple:
    import torch

    return tuple(torch.broadcast_shapes(*[tuple(int(s) for s in t.meta["val"].shape) for t in tensors]))


@rule("index_put", "index_put_", "_unsafe_index_put")
def index_put(ctx):
    """self[indices] = values: indexed dims unprunable; values' trailing dims align with self's trailing
    non-indexed dims."""
    src, vals = ctx.arg(0, "self"), ctx.arg(2, "values")
    lay, shp = ctx.lay(src), ctx.shape(src)
    consumed, tensors = _index_positions(ctx, list(ctx.arg(1, "indices")))
    flat = [d for c in consumed for d in c]
    for d in flat:
        ctx.block(lay[d], "dim written through a tensor index")
    for t in tensors:
        for lo in ctx.lay(t):
            ctx.block(lo, "index tensor")
    if ctx.is_tensor(vals):
        vl, vs = ctx.lay(vals), ctx.shape(vals)
        trailing = [d for d in range(len(shp)) if d > (max(flat) if flat else -1)]
        for k in range(1, len(vs) + 1):
            if k <= len(trailing) and vs[-k] == shp[trailing[-k]]:
                ctx.unify(vl[-k], lay[trailing[-k]])
            else:
                ctx.block(vl[-k], "values of an index_put")
    return tuple(lay)


@rule("view_as_complex")
def view_as_complex(ctx):
    """[..., 2] real -> [...] complex: the (real, imag) pair dim disappears."""
    lay = ctx.lay(ctx.arg(0, "self"))
    ctx.block(lay[-1], "real/imaginary pair of view_as_complex")
    return tuple(lay[:-1])


@rule("view_as_real")
def view_as_real(ctx):
    """[...] complex -> [..., 2] real."""
    lay = ctx.lay(ctx.arg(0, "self"))
    return tuple(lay) + ctx.fresh((2,), "real/imaginary pair of view_as_real")


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
