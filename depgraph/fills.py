"""Tensors created filled with one value whose sizes are read off the tensors they meet.

``torch.zeros(b * h, t, s)`` added to (or used as the ``input`` of ``baddbmm`` with) a product sized ``[b * h, t, s]``
has dims of fixed size in the exported graph. Such a dim may join a prunable space only when its size follows that
space: the rule in :mod:`depgraph.rules.creation` gives it a *pending* space (:class:`Pending`), and :func:`prove`
settles it after the propagation from what :class:`Recorder` saw in the trace's export, with every size a tensor
reports tagged (:class:`depgraph.tags.Tagged`).
A dim is proved when, at every call of its model line, its size is the product of the very tensor dims that size the
dim it meets in each of its consumers (the output dim of ``baddbmm``/``addmm``, the aligned dim of an elementwise
operand), so after any shrink both are computed from the same shrunk sizes; values need nothing, since a tensor
filled with one value is the same tensor of the smaller size once sliced. Anything else (a consumer outside the
table, a size computed otherwise, a creation whose output escapes into another op) leaves the dim blocked.

Symbols: a dim's symbol is a sorted tuple of ``(tensor id, dim)`` factors, the base dims whose sizes multiply to it;
a reshape's or a creation's output dim sized by a tagged product takes that product's symbol, a same-shape copy
(``contiguous``, ``to``, ``float``, ``clone``) its input's symbols; any other tensor's dim is its own base.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .callargs import leaves, size_ints
from .reads import source_line
from .tags import name
from .watch import watched

FILLS = ("zeros", "ones", "full", "new_zeros", "new_ones", "new_full")  # aten ops filling with one value
_RESHAPES = ("view", "reshape")
_COPIES = ("contiguous", "to", "float", "clone", "type_as")
_ADDMM = {"baddbmm": ((1, 0), (1, 1), (2, 2)), "addmm": ((1, 0), (2, 1)), "addbmm": ((1, 1), (2, 2))}
_ELEMENTWISE = ("add", "sub", "mul", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__")


@dataclass
class Pending:
    """A created dim that joins a space only if :func:`prove` shows its size follows: the layout, the fx node, the
    dim, and the reason it is blocked with otherwise."""

    layout: object
    node: torch.fx.Node
    dim: int
    reason: object


class Recorder:
    """Over one watched export (:func:`depgraph.watch.watched`, sizes tagged): follows dims' symbols and checks
    every consumer of a created tensor."""

    def __init__(self):
        self.keep: dict = {}  # id -> tensor (kept alive: no id is reused)
        self.syms: dict = {}  # id -> per-dim symbols
        self.created: dict = {}  # id -> [line, shape, per-dim proved, consumers seen]
        self.calls: list = []  # the ``created`` entries, in call order

    def sym(self, t, d):
        s = self.syms.get(id(t))
        if s is not None and self.keep.get(id(t)) is t and s[d] is not None:
            return s[d]
        self.keep[id(t)] = t
        return ((id(t), d),)

    def _of_tag(self, v):
        """The symbol of a tagged size (a product of reported dims), None for any other int (attributes are not
        tagged here: an int made from one is plain)."""
        tag = name(v)
        if tag is None:
            return None
        out = []
        for f in tag.split("*"):
            if not f.startswith("@") or "/" in f:  # not a product of reported dims (a quotient of one)
                return None
            key, _, d = f[1:].partition(":")
            t = self.keep.get(int(key))
            if t is None:
                return None
            out.extend(self.sym(t, int(d)))
        return tuple(sorted(out))

    def sized(self, t):
        self.keep[id(t)] = t

    def before(self, call):
        if not self.created:  # nothing filled yet: no argument can be one (most calls of an export)
            return
        created, keep = self.created, self.keep
        for t, in_slice in call.walked:  # a kept created tensor is that tensor: no type check needed first
            if not in_slice and id(t) in created and keep.get(id(t)) is t:
                self._consumed(call.name, t, call.args)

    def after(self, call, out):
        if not isinstance(out, torch.Tensor):
            return
        args, name_ = call.args, call.name
        self.keep[id(out)] = out
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name_ in FILLS:
            self._create(out, args[1:] if first is not None else args, call.frames)
        elif name_ in _RESHAPES and first is not None:
            sizes = size_ints(leaves(args[1:]))
            if len(sizes) == out.dim():
                self.syms[id(out)] = tuple(self._of_tag(v) for v in sizes)
        elif name_ in _COPIES and first is not None and tuple(first.shape) == tuple(out.shape):
            self.syms[id(out)] = tuple(self.sym(first, d) for d in range(out.dim()))

    def _create(self, out, args, frames):
        sizes = size_ints(leaves(args))[:out.dim()]
        if len(sizes) != out.dim() or not frames:
            return
        self.syms[id(out)] = syms = tuple(self._of_tag(v) for v in sizes)
        entry = [tuple(dict.fromkeys(frames)), tuple(out.shape), [s is not None for s in syms], 0]
        self.created[id(out)] = entry
        self.calls.append(entry)

    def _consumed(self, name, t, args):
        """A created tensor ``t`` enters the call ``name(*args)``: keep the dims whose size the call's other
        operands size the same way; a call outside the table proves nothing."""
        entry = self.created[id(t)]
        entry[3] += 1
        mine = self.syms[id(t)]
        if name in _ADDMM and args and args[0] is t:
            wants = _ADDMM[name]
            if not all(len(args) > i and isinstance(args[i], torch.Tensor) for i, _ in wants):
                entry[2] = [False] * len(mine)
                return
            out = [self.sym(args[i], d) for i, d in wants]
            off = len(out) - len(mine)
            entry[2] = [ok and off + d >= 0 and mine[d] == out[off + d] for d, ok in enumerate(entry[2])]
        elif name in _ELEMENTWISE:
            others = [a for a in args[:2] if isinstance(a, torch.Tensor) and a is not t]
            keep = []
            for d, ok in enumerate(entry[2]):
                k = d - len(mine)
                keep.append(ok and any(o.dim() >= -k and o.shape[k] == t.shape[d] and self.sym(o, o.dim() + k) == mine[d]
                                       for o in others))
            entry[2] = keep
        else:
            entry[2] = [False] * len(mine)

    def proved(self) -> dict:
        """{(model line, shape): [per-dim proved, one list per call]}, filed under every model line of the call's
        stack (the exported node names only its forward's line)."""
        out: dict = {}
        for lines, shape, dims, consumers in self.calls:
            for line in lines:
                out.setdefault((line, shape), []).append(dims if consumers else [False] * len(dims))
        return out


def proved_dims(model, example_inputs) -> dict | None:
    """:meth:`Recorder.proved` over an export of ``model`` of its own (reported sizes tagged, no attribute); None
    when that export fails."""
    rec = Recorder()
    return rec.proved() if watched(model, example_inputs, [rec], attributes=None) is not None else None


def prove(flow, proved) -> None:
    """Block every pending created dim of ``flow`` whose size is not proved to follow the space it joined;
    ``proved()`` gives what the export saw (:meth:`Recorder.proved`, None without evidence), asked only when a
    dim is pending."""
    store = flow.store
    open_ = [p for p in flow.pending if p.layout is not None and
             any(not s.blocked for s in store.leaves(p.layout))]
    seen = proved() if open_ else None
    for p in open_:
        shape = tuple(int(s) for s in p.node.meta["val"].shape)
        calls = (seen or {}).get((source_line(p.node), shape))
        if not calls or not all(c[p.dim] for c in calls):
            store.block(p.layout, p.reason)
