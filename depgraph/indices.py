"""A dim indexed by fixed positions: ``qkv[..., [-2], :]`` reads the same channels however much is pruned elsewhere
in that dim, as long as what it reads keeps its place.

Positions counted from the end (negative) read a fixed tail, the others a fixed head of the dim; that tail or head is
blocked and the rest of the dim stays prunable. The positions live in a constant index tensor: one with values
(a tensor the model holds) is read directly; one made on the meta twin from Python data (a list index, ``torch.tensor
([...])``) has none, so :func:`prove` reads the data every call on the op's model line passed, in the trace's export
(:class:`Recorder`); a line that passed anything else as an index (a tensor, an array), or none, leaves the whole
dim blocked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reads import source_line
from .tags import Tagged
from .watch import watched

_DATA_CALLS = ("tensor", "as_tensor", "new_tensor")


@dataclass
class ConstIndex:
    """A dim indexed by a constant without values on the meta twin: its layout, size, fx node, and the reason it
    is blocked with when the positions stay unknown."""

    layout: object
    size: int
    node: torch.fx.Node
    reason: object


def constant_of(cap, node):
    """The value of the lifted constant behind placeholder ``node`` (None: not a constant; a meta tensor: no value)."""
    name = cap.program.graph_signature.inputs_to_lifted_tensor_constants.get(getattr(node, "name", None))
    return cap.program.constants.get(name) if name is not None else None


def fixed_parts(positions, n: int) -> list | None:
    """[(start, stop)] of the dim of size ``n`` that the integer ``positions`` read: the tail from the furthest
    negative position, the head up to the furthest other one; None when a position is out of range."""
    if any(not -n <= p < n for p in positions):
        return None
    neg = [p for p in positions if p < 0]
    pos = [p for p in positions if p >= 0]
    return ([(n + min(neg), n)] if neg else []) + ([(0, max(pos) + 1)] if pos else [])


def block_parts(store, layout, parts, reason) -> None:
    """Block the sub-ranges ``parts`` of ``layout`` (all of it when ``parts`` is None or a cut does not align)."""
    from .layout import Unifiable

    if parts is None:
        store.block(layout, reason)
        return
    for start, stop in parts:
        try:
            store.block(store.slice(layout, start, stop), reason)
        except Unifiable:
            store.block(layout, reason)


def _data(obj):
    """The flat list of ints in a list/tuple of ints (tagged or not: nothing is tagged as far as positions go),
    else None."""
    if isinstance(obj, (list, tuple)) and obj and all(type(v) in (int, Tagged) for v in obj):
        return [int(v) for v in obj]
    return None


class Recorder:
    """Over one watched export (:func:`depgraph.watch.watched`): {(file, line): [int lists]} passed as index data
    on every model line of each call's stack; lines that passed an index of another kind (a tensor, an array,
    nested data) are in ``unknown``."""

    def __init__(self):
        self.data: dict = {}
        self.unknown: set = set()

    def sized(self, t):
        pass

    def before(self, call):
        args, kwargs, name = call.args, call.kwargs, call.name
        if name != "__getitem__" and name not in _DATA_CALLS:
            return
        found, odd = [], False
        if name == "__getitem__" and len(args) > 1:
            for ix in (args[1] if isinstance(args[1], tuple) else (args[1],)):
                if ix is None or ix is Ellipsis or isinstance(ix, (slice, int)):
                    continue
                d = _data(ix)
                found, odd = (found + [d], odd) if d is not None else (found, True)
        elif name in _DATA_CALLS:
            d = _data(args[1] if name == "new_tensor" and len(args) > 1 else (args[0] if args else kwargs.get("data")))
            found, odd = ([d], odd) if d is not None else (found, True)
        if found or odd:
            for frame in dict.fromkeys(call.frames):
                self.data.setdefault(frame, []).extend(found)
                if odd:
                    self.unknown.add(frame)

    def after(self, call, out):
        pass


def index_data(model, example_inputs) -> Recorder | None:
    """What :class:`Recorder` sees over an export of ``model`` of its own (nothing tagged); None when it fails."""
    rec = Recorder()
    return rec if watched(model, example_inputs, [rec], sizes=False, attributes=None) is not None else None


def prove(flow, seen) -> None:
    """Block, for every pending constant index of ``flow``, the parts of its dim the index data seen on its model
    line reads (the whole dim when that data is unknown); ``seen()`` gives what the export saw (a :class:`Recorder`,
    None without evidence), asked only when an index is pending."""
    store = flow.store
    open_ = [c for c in flow.const_index if c.layout is not None and
             any(not s.blocked for s in store.leaves(c.layout))]
    if not open_:
        return
    rec = seen()
    for c in open_:
        line = source_line(c.node)
        data = rec.data.get(line) if rec is not None and line not in rec.unknown else None
        parts = fixed_parts([p for d in data for p in d], c.size) if data else None
        block_parts(store, c.layout, parts, c.reason)
