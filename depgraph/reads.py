"""Which module attributes the forward passes, unchanged, to which line of model code.

Chosen int attributes of the meta twin are replaced by :class:`Tagged` ints (same value, same behaviour, a name
attached); a torch-function mode active during one export records, for every torch call whose arguments hold a
tagged int, the model-code line making the call and the ``(name, value)`` pairs it passed. A literal size in the
exported graph is then known to *be* that attribute when its op's line shows the pair; arithmetic on a tagged int
gives a plain int (except a product, which names its factors: ``num_heads*head_dim``), so a value computed
otherwise or read off a tensor's shape shows nothing.

A size passed through a helper method (``self._merge_heads(x, self.num_heads, self.head_dim)``) is recorded on
every model-code line of the call's stack, with the call's int arguments: the exported node names only the
forward's line, so the op is found again there by its sizes (:func:`follows_call`). A second export can also tag
the sizes tensors report (``x.size(-1)``): a merge sized by the product of the very dims of the tensor it reshapes
(``x.view(*x.size()[:-2], x.size(-2) * x.size(-1))``) follows that tensor when it shrinks.
"""
from __future__ import annotations

import inspect
import logging
import os
import re
from dataclasses import dataclass, field
from math import prod

import torch
from torch.overrides import TorchFunctionMode

from .capture import capture

_TORCH_DIR = os.path.dirname(torch.__file__)
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


class Tagged(int):
    """An int that remembers the attribute it was read from."""

    def __new__(cls, value: int, name: str):
        out = super().__new__(cls, value)
        out.attribute = name
        return out

    def __mul__(self, other):  # ``self.num_heads * self.head_dim``: the product remembers its factors
        if isinstance(other, int) and not isinstance(other, bool) and "+" not in self.attribute + \
                getattr(other, "attribute", ""):
            return Tagged(int(self) * int(other), f"{self.attribute}*{getattr(other, 'attribute', int(other))}")
        return int(self) * other

    __rmul__ = __mul__

    def __add__(self, other):  # ``self.num_heads + 2``: an attribute plus fixed slots remembers both
        if type(other) is int and other > 0 and self.attribute.isidentifier():
            return Tagged(int(self) + other, f"{self.attribute}+{other}")
        return int(self) + other

    __radd__ = __add__

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (Tagged, (int(self), self.attribute))


def _leaves(obj, in_slice: bool = False):
    """(value, inside a slice) for every leaf of a call's arguments, in order (lists, tuples, dict values, slices)."""
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _leaves(o, in_slice)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _leaves(o, in_slice)
    elif isinstance(obj, slice):
        yield from _leaves((obj.start, obj.stop, obj.step), True)
    else:
        yield obj, in_slice


def _tags(leaves) -> set:
    """(attribute, value) of every tagged size among ``leaves`` (slice bounds included)."""
    return {(v.attribute, int(v)) for v, _ in leaves if isinstance(v, Tagged)}


def _ints(leaves) -> list:
    """The ints among ``leaves`` outside slices, in order (bools skipped): a call's size signature."""
    return [v for v, in_slice in leaves if not in_slice and isinstance(v, int) and not isinstance(v, bool)]


def model_frames(*own: str) -> list:
    """(file, line) of every frame outside torch, this module and the files ``own`` (a recorder's), innermost
    first: the model code making a call."""
    skip = {__file__, *own}
    out = []
    f = inspect.currentframe().f_back
    while f is not None:
        name = f.f_code.co_filename
        if not name.startswith(_TORCH_DIR) and name not in skip:
            out.append((name, f.f_lineno))
        f = f.f_back
    return out


def tag_size(t: torch.Tensor, out, args, kwargs):
    """``t.size(...)`` / ``t.shape``'s result ``out`` with every size tagged ``@id(t):dim`` (:class:`Tagged`)."""
    if isinstance(out, int):
        d = (args[0] if args else kwargs.get("dim", 0)) % t.dim()
        return Tagged(out, f"@{id(t)}:{d}")
    return torch.Size([Tagged(int(n), f"@{id(t)}:{d}") for d, n in enumerate(out)])


def recorded(mode, model, example_inputs, prepare=None) -> bool:
    """Run one export of ``model`` (``prepare`` applied to its twin) under the torch-function ``mode`` (a recorder);
    False when that export fails: no evidence, so whatever it was to prove stays unproved."""
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the forward may break under tagged sizes; torch logs that loudly
    try:
        with mode:
            capture(model, example_inputs, prepare=prepare)
        return True
    except Exception:  # noqa: BLE001 - no evidence
        return False
    finally:
        quiet.setLevel(level)


def signature(args) -> tuple:
    """The ints of an fx node's (or a torch call's) arguments, in order."""
    return tuple(int(v) for v in _ints(list(_leaves(args))))


_SIZE_GETTERS = (torch.Tensor.size, torch.Tensor.shape.__get__)
_RESHAPES = ("view", "reshape", "_unsafe_view")


@dataclass
class Reads:
    """What one tagged export saw. ``lines``: {(file, line): {(attribute, value)}} at the innermost model line of
    each call; ``calls``: {(file, line): [(ints, tags, own)]} for every call with int arguments, on every model
    line of its stack, ``tags`` naming per int the attribute (product) it is or ``self:D`` /
    ``node:NAME:D:SHAPE:OP`` / ``other`` for a size a tensor reported (``self``: dim D of the call's own first
    tensor; ``node``: dim D of the graph node NAME, of that shape and op), ``own`` the graph node of that first
    tensor (with sizes tagged, else None)."""

    lines: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)

    def get(self, key, default=()):
        return self.lines.get(key, default)


class _Recorder(TorchFunctionMode):
    def __init__(self, sizes: bool = False):
        super().__init__()
        self.reads = Reads()
        self.sizes = sizes
        self.sized: dict = {}  # id -> tensor whose sizes were tagged (kept alive: no id is reused)
        self.nodes: dict = {}  # id -> (name, shape) of the exported graph's node that tensor is, when traced
        self.origin: dict = {}  # id(out) -> (out, its input, {out dim: input dim}) of dim-keeping views

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.sizes and func in _SIZE_GETTERS and args and isinstance(args[0], torch.Tensor):
            return self._tag_sizes(args[0], func(*args, **kwargs), args[1:], kwargs)
        leaves = list(_leaves((args, kwargs)))  # one walk for the tags and the size signature
        found = _tags(leaves)
        frames = model_frames()
        if found and frames:
            self.reads.lines.setdefault(frames[0], set()).update(found)
        ints = _ints(leaves)
        if ints and frames:
            own = next((a for a in args if isinstance(a, torch.Tensor)), None)
            node = _traced_node(own) if self.sizes and own is not None else None
            entry = (tuple(int(v) for v in ints), tuple(self._tag_of(v, own) for v in ints),
                     node.name if node is not None else None)
            for frame in dict.fromkeys(frames):
                self.reads.calls.setdefault(frame, []).append(entry)
        out = func(*args, **kwargs)
        if self.sizes and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            dims = _kept_dims(func, args, out)
            if dims:
                self.origin[id(out)] = (out, args[0], dims)
        return out

    def _tag_sizes(self, t, out, args, kwargs):
        self.sized[id(t)] = t
        node = _traced_node(t)
        if node is not None:
            self.nodes[id(t)] = (node.name, tuple(t.shape), op_name_of(node))
        return tag_size(t, out, args, kwargs)

    def _tag_of(self, v, own):
        name = getattr(v, "attribute", None)
        if name is None or "@" not in name:
            return name
        parts = []
        for f in name.split("*"):
            if f.startswith("@"):
                key, _, d = f[1:].partition(":")
                mine = self._dims_from(own, int(key)) if own is not None else None
                e = [o for o, a in (mine or {}).items() if a == int(d)]
                node = self.nodes.get(int(key))
                shape = "x".join(map(str, node[1])) if node else ""
                f = f"self:{e[0]}" if e else f"node:{node[0]}:{d}:{shape}:{node[2]}" if node else "other"
            parts.append(f)
        return "*".join(parts)

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


def _traced_node(t):
    """The fx node the export is recording for tensor ``t`` (None outside the export's proxy tracing)."""
    try:
        from torch.fx.experimental import proxy_tensor

        mode = proxy_tensor.get_proxy_mode()
        slot = proxy_tensor.get_proxy_slot(t, mode.tracer, None) if mode is not None else None
        return getattr(getattr(slot, "proxy", None), "node", None)
    except Exception:  # noqa: BLE001 - no tracer to ask: the size stays "other" (proves nothing)
        return None


def op_name_of(node) -> str:
    """A graph node's op, to check a node found again by name is the one a size was read off."""
    return getattr(node.target, "__name__", str(node.target)).replace(":", "").replace("*", "")


def _kept_dims(func, args, out) -> dict | None:
    """{out dim: input dim} for the dims a view-like call keeps whole from its first argument, or None."""
    src = args[0]
    n, m = src.dim(), out.dim()
    name = getattr(func, "__name__", "")
    if name in ("expand", "expand_as", "broadcast_to", "contiguous", "clone", "to", "float", "type_as"):
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


def tagged_reads(model, example_inputs, paths, sizes: bool = False) -> Reads | None:
    """What one export of ``model`` passes to torch with every int attribute of the modules at ``paths`` tagged
    (and, with ``sizes``, every size a tensor reports); None when that export fails."""
    def tag(twin):
        for path, mod in twin.named_modules():
            if path in paths:
                for name, v in list(vars(mod).items()):
                    if type(v) is int:
                        setattr(mod, name, Tagged(v, name))
    rec = _Recorder(sizes)
    return rec.reads if recorded(rec, model, example_inputs, prepare=tag) else None


def merged_dims(in_shape, out_shape, i: int) -> set | None:
    """The input dims (of size > 1) a reshape from ``in_shape`` merges into output dim ``i``; None when that dim
    is not a whole run of input dims (a split)."""
    lo, hi = prod(out_shape[:i]), prod(out_shape[:i + 1])
    bounds = [prod(in_shape[:d]) for d in range(len(in_shape) + 1)]
    if lo not in bounds or hi not in bounds:
        return None
    return {d for d, n in enumerate(in_shape) if n > 1 and bounds[d] >= lo and bounds[d + 1] <= hi}


def follows_call(reads: Reads, node, value: int, accept, repeated=None, spaces=None) -> bool:
    """Whether every torch call on ``node``'s model line with the node's int arguments had, at each position the
    literal ``value`` holds, a size that follows the pruned space: an attribute (product) ``accept`` takes, or,
    for a reshape, the product of the very input dims it merges into that position (read off its own input, or
    a tensor it was viewed from), times at most one attribute ``repeated(name, dim)`` says sizes the one
    remaining merged dim (``repeat_kv``: ``reshape(b, kv * self.num_key_value_groups, t, d)``); or, with
    ``spaces`` (:class:`depgraph.graph.SizeSpaces`), a product of tensor dims read anywhere whose spaces are
    exactly those of the output dim it sizes (``view(bsz * self.num_heads, -1, d)``, ``bsz`` off the input)."""
    line = source_line(node)
    sig = signature(node.args)
    where = [i for i, v in enumerate(sig) if v == value]
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
        factors = tag.split("*")
        own = [int(f[5:]) for f in factors if f.startswith("self:")]
        named = [f for f in factors if not f.startswith("self:")]
        merged = merged_dims(in_shape, out_shape, i) if in_shape is not None else None
        if merged is None or len(set(own)) != len(own) or not own:
            return False
        rest = merged - {d for d in own if in_shape[d] > 1}
        if not named:
            return not rest and set(own) <= merged | {d for d in own if in_shape[d] == 1}
        return len(named) == 1 and len(rest) == 1 and repeated is not None and set(own) <= merged and \
            repeated(named[0], next(iter(rest)))
    return all(ok(tags[i], i) for tags in calls for i in where)


def source_line(node):
    """(file, line) of the model code that emitted the fx ``node`` (its innermost recorded frame), or None."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    return (frames[-1][0], int(frames[-1][1])) if frames else None
