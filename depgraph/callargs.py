"""The leaves of a torch call's arguments, walked once per call of a watched export (:mod:`depgraph.watch`)."""
from __future__ import annotations

__all__ = ["call_leaves", "leaves", "size_ints"]

_NESTED = (list, tuple, dict, slice)


def leaves(obj, in_slice: bool = False) -> list:
    """[(value, inside a slice)] for every leaf of a call's arguments, in order (lists, tuples, dict values,
    slices). An explicit stack: called on every torch call of a watched export, so no generator recursion."""
    out, todo = [], [(obj, in_slice)]
    while todo:
        o, s = todo.pop()
        if isinstance(o, (list, tuple)):
            todo.extend([(x, s) for x in reversed(o)])
        elif isinstance(o, dict):
            todo.extend([(x, s) for x in reversed(list(o.values()))])
        elif isinstance(o, slice):
            todo += ((o.step, True), (o.stop, True), (o.start, True))
        else:
            out.append((o, s))
    return out


def call_leaves(args: tuple, kwargs: dict) -> list:
    """:func:`leaves` of ``(args, kwargs)``; a flat call (no kwargs, no nested argument: most calls of an export,
    ``x.dtype``, ``x.stride()``) without the walk."""
    if not kwargs:
        for a in args:
            if isinstance(a, _NESTED):
                break
        else:
            return [(a, False) for a in args]
    return leaves((args, kwargs))


def size_ints(walked) -> list:
    """The ints among ``walked`` (:func:`leaves`) outside slices, in order (bools skipped): a call's size signature."""
    return [v for v, in_slice in walked if not in_slice and isinstance(v, int) and not isinstance(v, bool)]
