"""Which module attributes the forward passes, unchanged, to which line of model code.

The trace's one export (:func:`depgraph.watch.watched`) runs with the int attributes of the meta twin's modules and
the sizes tensors report (``x.size(-1)``) replaced by :class:`depgraph.tags.Tagged` ints (same value, same
behaviour, a provenance attached); :class:`Recorder` keeps, for every torch call whose arguments hold an int, the
model-code line making the call and the ints it passed. :meth:`Recorder.reads` names them as an export tagging
only the attributes of the modules asked about would have (:func:`depgraph.tags.name`): a literal size in the
exported graph is then known to *be* that attribute when its op's line shows the pair; arithmetic on a tagged int
gives a plain int (except a product, which names its factors: ``num_heads*head_dim``, and an attribute plus fixed
slots: ``num_heads+2``), so a value computed otherwise or read off a tensor's shape shows nothing.

A size passed through a helper method (``self._merge_heads(x, self.num_heads, self.head_dim)``) is recorded on
every model-code line of the call's stack, with the call's int arguments: the exported node names only the
forward's line, so the op is found again there by its sizes (:func:`follows_call`). A reported size names the
tensor dim it was read off: a merge sized by the product of the very dims of the tensor it reshapes
(``x.view(*x.size()[:-2], x.size(-2) * x.size(-1))``) follows that tensor when it shrinks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from math import prod

import torch
from torch.fx.experimental import proxy_tensor

from .callargs import leaves, size_ints
from .tags import Tagged, name, sizes_in
from .watch import watched

_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def signature(args) -> tuple:
    """The ints of an fx node's (or a torch call's) arguments, in order."""
    return tuple(int(v) for v in size_ints(leaves(args)))


_RESHAPES = ("view", "reshape", "_unsafe_view")


@dataclass
class Reads:
    """What one tagged export saw. ``lines``: {(file, line): {(attribute, value)}} at the innermost model line of
    each call; ``calls``: {(file, line): [(ints, tags, own)]} for every call with int arguments, on every model
    line of its stack, ``tags`` naming per int the attribute (product) it is or ``self:D`` /
    ``node:NAME:D:SHAPE:OP`` / ``other`` for a size a tensor reported (``self``: dim D of the call's own first
    tensor; ``node``: dim D of the graph node NAME, of that shape and op), ``own`` the graph node of that first
    tensor (with sizes tagged, else None). ``slices``: the same for the slices of every index with a tagged bound,
    as ``aten.slice`` takes them (``x[..., :self.d]`` on a 4-D ``x``: ints ``(3, 0, d)``, :func:`slice_calls`)."""

    lines: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)
    slices: dict = field(default_factory=dict)

    def get(self, key, default=()):
        return self.lines.get(key, default)


class Recorder:
    """What :class:`Reads` holds, recorded over one watched export (:func:`depgraph.watch.watched`, sizes tagged)
    for any set of tagged modules: the tagged ints themselves are kept and named by :meth:`reads`."""

    def __init__(self):
        self.lines: dict = {}  # (file, line) -> tagged ints passed at that innermost model line
        self.calls: dict = {}  # (file, line) -> [(ints, the int objects, {size name: what it reads}, own node)]
        self.slices: dict = {}  # (file, line) -> the same for the slices of indices with a tagged bound
        self.kept: dict = {}  # id -> tensor whose sizes were tagged (kept alive: no id is reused)
        self.nodes: dict = {}  # id -> (name, shape, op) of the exported graph's node that tensor is, when traced
        self.origin: dict = {}  # id(out) -> (out, its input, {out dim: input dim}) of dim-keeping views

    def sized(self, t):
        if self.kept.get(id(t)) is t:  # seen before: its node is known
            return
        self.kept[id(t)] = t
        node = _traced_node(t)
        if node is not None:
            self.nodes[id(t)] = (node.name, tuple(t.shape), op_name_of(node))

    def before(self, call):
        tagged, ints = [], []  # one pass over the walk for the tags and the size signature (:func:`size_ints`)
        for v, in_slice in call.walked:
            if isinstance(v, int) and not isinstance(v, bool):
                if isinstance(v, Tagged):
                    tagged.append(v)
                if not in_slice:
                    ints.append(v)
        if not (tagged or ints) or not call.frames:
            return
        if tagged:
            self.lines.setdefault(call.frames[0], []).extend(tagged)
        if tagged and call.name == "__getitem__" and len(call.args) > 1 and isinstance(call.args[0], torch.Tensor):
            own = call.args[0]
            node = _traced_node(own)
            for values in slice_calls(own.dim(), call.args[1]):
                where = {f: self._read_off(f, own) for v in values for f in sizes_in(v)}
                entry = (tuple(int(v) for v in values), values, where, node.name if node is not None else None)
                for frame in dict.fromkeys(call.frames):
                    self.slices.setdefault(frame, []).append(entry)
        if ints:
            own = next((a for a in call.args if isinstance(a, torch.Tensor)), None)
            node = _traced_node(own) if own is not None else None
            where = {f: self._read_off(f, own) for v in ints for f in sizes_in(v)}
            entry = (tuple(int(v) for v in ints), tuple(ints), where, node.name if node is not None else None)
            for frame in dict.fromkeys(call.frames):
                self.calls.setdefault(frame, []).append(entry)

    def after(self, call, out):
        args = call.args
        if call.name in _KEEPING and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            dims = _kept_dims(call.func, args, out)
            if dims:
                self.origin[id(out)] = (out, args[0], dims)

    def reads(self, paths) -> Reads:
        """What an export with the int attributes of the modules at ``paths`` tagged (and every reported size)
        passed to torch."""
        modules = frozenset(paths)
        out = Reads()
        for frame, vs in self.lines.items():
            found = {(n, int(v)) for v in vs if (n := name(v, modules)) is not None}
            if found:
                out.lines[frame] = found
        done: dict = {}
        for mine, theirs in ((self.calls, out.calls), (self.slices, out.slices)):
            for frame, entries in mine.items():
                theirs[frame] = [done[id(e)] if id(e) in done else done.setdefault(id(e), _named(e, modules))
                                 for e in entries]
        return out

    def _read_off(self, size: str, own) -> str:
        """What the reported size ``@ID:D`` is: ``self:E`` (dim E of ``own``, the call's first tensor, or a view
        of it), ``node:NAME:D:SHAPE:OP`` (dim D of a traced graph node), else ``other``."""
        key, _, d = size[1:].partition(":")
        mine = self._dims_from(own, int(key)) if own is not None else None
        e = [o for o, a in (mine or {}).items() if a == int(d)]
        node = self.nodes.get(int(key))
        shape = "x".join(map(str, node[1])) if node else ""
        return f"self:{e[0]}" if e else f"node:{node[0]}:{d}:{shape}:{node[2]}" if node else "other"

    def _dims_from(self, t, key):
        """{dim of ``t``: dim of the tensor with id ``key``} when that tensor is ``t`` or one it was viewed from
        through dim-keeping views (indexing with ``None``/full slices, ``expand``, ``unsqueeze``), else None."""
        dims = {d: d for d in range(t.dim())}
        for _ in range(16):
            if id(t) == key:
                return dims
            step = self.origin.get(id(t))
            if step is None or step[0] is not t:
                return None
            _, t, kept = step
            dims = {o: kept[a] for o, a in dims.items() if a in kept}
        return None


def _named(entry, modules) -> tuple:
    """A recorded call's (ints, tags, own) with the tags named as ``modules`` alone being tagged shows them."""
    ints, values, where, own = entry

    def tag(v):
        n = name(v, modules)
        if n is None or "@" not in n:
            return n
        if "/" in n:  # a reported size's quotient: what it was read off, over the same divisor
            size, _, k = n.partition("/")
            return f"{where.get(size, 'other')}/{k}"
        return "*".join(where.get(f, "other") if f.startswith("@") else f for f in n.split("*"))
    return ints, tuple(tag(v) for v in values), own


_END = 2 ** 63 - 1  # the end ``aten.slice`` gets for an open slice


def slice_calls(ndim: int, index) -> list:
    """[(dim, start, end)] per slice of ``tensor[index]`` on an ``ndim``-D tensor, as the ``aten.slice`` nodes it
    makes take them (an open bound as 0 / :data:`_END`; a dim counted after the ``None`` axes before it), the bound
    objects themselves (tagged or not); [] for an
    index of another kind (an int, a tensor, a step, two ellipses) and for a full slice (no node)."""
    idx = index if isinstance(index, tuple) else (index,)
    if sum(e is Ellipsis for e in idx) > 1 or \
            any(not (e is None or e is Ellipsis or isinstance(e, slice) and e.step is None) for e in idx):
        return []
    taken = sum(isinstance(e, slice) for e in idx)
    out, d = [], 0  # d: the dim of the tensor each slice is taken of (a ``None`` before it unsqueezed one)
    for e in idx:
        if e is Ellipsis:
            d += ndim - taken
            continue
        if e is not None and not (e.start is None and e.stop is None):
            out.append((d, 0 if e.start is None else e.start, _END if e.stop is None else e.stop))
        d += 1
    return out


def _traced_node(t):
    """The fx node the export is recording for tensor ``t`` (None outside the export's proxy tracing)."""
    try:
        mode = proxy_tensor.get_proxy_mode()
        slot = proxy_tensor.get_proxy_slot(t, mode.tracer, None) if mode is not None else None
        return getattr(getattr(slot, "proxy", None), "node", None)
    except Exception:  # noqa: BLE001 - no tracer to ask: the size stays "other" (proves nothing)
        return None


def op_name_of(node) -> str:
    """A graph node's op, to check a node found again by name is the one a size was read off."""
    return getattr(node.target, "__name__", str(node.target)).replace(":", "").replace("*", "")


_SAME_DIMS = ("expand", "expand_as", "broadcast_to", "contiguous", "clone", "to", "float", "type_as")
_KEEPING = frozenset(_SAME_DIMS + ("unsqueeze", "__getitem__"))  # the calls :func:`_kept_dims` reads


def _kept_dims(func, args, out) -> dict | None:
    """{out dim: input dim} for the dims a view-like call keeps whole from its first argument, or None."""
    src = args[0]
    n, m = src.dim(), out.dim()
    name = getattr(func, "__name__", "")
    if name in _SAME_DIMS:
        off = m - n
        return {d + off: d for d in range(n) if d + off >= 0 and src.shape[d] == out.shape[d + off]} if off >= 0 \
            else None
    if name == "unsqueeze" and len(args) > 1 and isinstance(args[1], int):
        k = args[1] % m
        return {d + (d >= k): d for d in range(n)}
    if name == "__getitem__" and len(args) > 1:
        idx = args[1] if isinstance(args[1], tuple) else (args[1],)
        if not all(e is None or e is Ellipsis or (isinstance(e, slice) and e == slice(None)) for e in idx):
            return None
        if sum(e is Ellipsis for e in idx) > 1:
            return None
        taken = sum(isinstance(e, slice) for e in idx)
        dims, i, o = {}, 0, 0
        for e in idx:
            if e is None:
                o += 1
            elif e is Ellipsis:
                for _ in range(n - taken):
                    dims[o], i, o = i, i + 1, o + 1
            else:
                dims[o], i, o = i, i + 1, o + 1
        for _ in range(n - i):
            dims[o], i, o = i, i + 1, o + 1
        return dims if o == m else None
    return None


def tagged_reads(model, example_inputs, paths) -> Reads | None:
    """What one export of ``model`` passes to torch with every int attribute of the modules at ``paths`` tagged,
    and every size a tensor reports; None when that export fails."""
    rec = Recorder()
    return rec.reads(paths) if watched(model, example_inputs, [rec], attributes=set(paths)) is not None else None


def merged_dims(in_shape, out_shape, i: int) -> set | None:
    """The input dims (of size > 1) a reshape from ``in_shape`` merges into output dim ``i``; None when that dim
    is not a whole run of input dims (a split)."""
    lo, hi = prod(out_shape[:i]), prod(out_shape[:i + 1])
    bounds = [prod(in_shape[:d]) for d in range(len(in_shape) + 1)]
    if lo not in bounds or hi not in bounds:
        return None
    return {d for d, n in enumerate(in_shape) if n > 1 and bounds[d] >= lo and bounds[d + 1] <= hi}


def follows_call(reads: Reads, node, value: int, accept, repeated=None, spaces=None, part=None,
                 at=None) -> bool:
    """Whether every torch call on ``node``'s model line with the node's int arguments had, at each position the
    literal ``value`` holds, a size that follows the pruned space: an attribute (product) ``accept`` takes, or,
    for a reshape, the product of the very input dims it merges into that position (read off its own input, or
    a tensor it was viewed from), times at most one attribute ``repeated(name, dim)`` says sizes the one
    remaining merged dim (``repeat_kv``: ``reshape(b, kv * self.num_key_value_groups, t, d)``); or, with
    ``spaces`` (:class:`depgraph.graph.SizeSpaces`), a product of tensor dims read anywhere whose spaces are
    exactly those of the output dim it sizes (``view(bsz * self.num_heads, -1, d)``, ``bsz`` off the input), or,
    for a split size or slice bound sizing the layout ``part``, tensor dims that size exactly ``part``
    (:meth:`depgraph.sizes.SizeSpaces.sizes_part`). ``at``: the one position the literal holds, when known."""
    line = source_line(node)
    sig = signature(node.args)
    where = [i for i, v in enumerate(sig) if v == value and (at is None or i == at)]
    calls = [tags for ints, tags, _ in reads.calls.get(line, ()) if ints == sig] if line else []
    src = node.args[0] if node.args else None
    mine = [tags for ints, tags, own in reads.calls.get(line, ()) if ints == sig and own == getattr(src, "name", 0)]
    if spaces is not None and mine:  # the export named the tensor each call made the op on: only this node's
        calls = mine
    if not where or not calls:
        return False
    in_shape = tuple(src.meta["val"].shape) if hasattr(src, "meta") and "val" in src.meta else None
    out_val = node.meta.get("val")
    out_shape = tuple(out_val.shape) if hasattr(out_val, "shape") else None
    schema = getattr(node.target, "_schema", None)
    if schema is None or schema.name.partition("::")[2] not in _RESHAPES or in_shape is None or \
            out_shape is None or prod(in_shape) != prod(out_shape) or len(sig) != len(out_shape):
        in_shape = None  # not a reshape of its first argument: only attributes can own the literal

    def ok(tag, i):
        if tag is None:
            return False
        if accept(tag) or spaces is not None and len(sig) == len(out_shape or ()) and spaces.follows(node, i, tag):
            return True
        if part is not None and spaces is not None and spaces.sizes_part(node, tag, part):
            return True
        if "/" in tag:  # a quotient follows only the part it halves (above)
            return False
        factors = tag.split("*")
        own = [int(f[5:]) for f in factors if f.startswith("self:")]
        named = [f for f in factors if not f.startswith("self:")]
        merged = merged_dims(in_shape, out_shape, i) if in_shape is not None else None
        if merged is None or len(set(own)) != len(own) or not own:
            return False
        rest = merged - {d for d in own if in_shape[d] > 1}
        if not named:
            return not rest and set(own) <= merged | {d for d in own if in_shape[d] == 1}
        return len(named) == 1 and len(rest) == 1 and repeated is not None and \
            set(own) <= merged | {d for d in own if in_shape[d] == 1} and \
            repeated(named[0], next(iter(rest)))
    return all(ok(tags[i], i) for tags in calls for i in where)


def source_line(node):
    """(file, line) of the model code that emitted the fx ``node`` (its innermost recorded frame), or None."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    return (frames[-1][0], int(frames[-1][1])) if frames else None
