"""Channel spaces and index maps: the algebra the dimension flow runs on.

Every dim of every tensor in the traced graph is described by a *layout*: how its indices map onto
channel *spaces*. A layout is a tree:

- a :class:`Space` (a leaf: indices 0..n-1 of one space),
- ``Prod(a, b, ...)``: row-major product (index = ((i_a * |b|) + i_b) ...), e.g. ``(heads, head_dim)``,
- ``Cat(a, b, ...)``: concatenation with offsets, e.g. a fused ``qkv`` projection.

Coupling two dims (an elementwise add, a linear's input and its weight, ...) *unifies* their layouts.
Spaces live in a union-find; when one side needs structure the other side lacks (a reshape splits a
space into heads, a slice cuts it) the space is *refined* globally into a Prod or Cat of new spaces, so
every tensor that uses it sees the refinement. Groups, unit index maps, masks and slices are all
derived from these layouts, so the mask and the shrink can never disagree.

Flags on spaces: ``blocked`` (never prunable, with reasons), ``inexact`` (a normalisation reduces over
it, so removal is not equal to zeroing), ``broadcast`` (created by ``expand``; no parameter behind it).
A reason a rule gives is a :class:`Reason`: the text, and the same as data (op, module path, kind).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod as _prod

import numpy as np


class Reason(str):
    """Why a space is blocked or inexact: the text ``"MESSAGE (OP at MODULE)"`` (it is that string, so it prints,
    compares and serialises as one) and the same as data: ``message``, ``op`` (the aten op), ``module`` (the module
    path that ran it, "" for the root) and ``kind`` ("blocked", "inexact" or "origin")."""

    def __new__(cls, message: str, op: str | None = None, module: str | None = None, kind: str = "blocked"):
        text = message if op is None else f"{message} ({op} at {module or '<root>'})"
        self = super().__new__(cls, text)
        self.message, self.op, self.module, self.kind = message, op, module, kind
        return self


class Space:
    """A leaf channel space of ``size`` indices; a node of the union-find."""

    __slots__ = ("id", "size", "parent", "refined", "blocked", "inexact", "broadcast", "origin")

    def __init__(self, id: int, size: int, origin: str):
        self.id = id
        self.size = size
        self.parent: Space = self
        self.refined = None  # a layout (Prod/Cat) once this space has been refined
        self.blocked: list[str] = []
        self.inexact: list[str] = []
        self.broadcast = False
        self.origin = origin

    def __repr__(self) -> str:
        return f"S{self.id}({self.size})"


@dataclass(frozen=True)
class Prod:
    parts: tuple

    @property
    def size(self) -> int:
        return _prod(p.size for p in self.parts)


@dataclass(frozen=True)
class Cat:
    parts: tuple

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)


def make_prod(parts) -> object:
    """Prod of layouts, flattening nested Prods and dropping size-1 factors."""
    flat = []
    for p in parts:
        if p is None or p.size == 1:
            continue
        flat.extend(p.parts if isinstance(p, Prod) else [p])
    if not flat:
        return None
    return flat[0] if len(flat) == 1 else Prod(tuple(flat))


def make_cat(parts) -> object:
    flat = []
    for p in parts:
        flat.extend(p.parts if isinstance(p, Cat) else [p])
    return flat[0] if len(flat) == 1 else Cat(tuple(flat))


class Unifiable(Exception):
    """Internal: two layouts cannot be aligned (callers block the spaces instead)."""


@dataclass
class SpaceStore:
    """Owns every space; union-find with refinement."""

    spaces: list = field(default_factory=list)

    # -- creation and lookup -------------------------------------------------------------
    def new(self, size: int, origin: str, blocked: str | None = None, broadcast: bool = False):
        if size <= 1:
            return None
        s = Space(len(self.spaces), size, origin)
        if blocked:
            s.blocked.append(blocked)
        s.broadcast = broadcast
        self.spaces.append(s)
        return s

    def single(self, origin: str, blocked: str | None = None) -> Space:
        """A new space of size 1 (``new`` returns None for those): a lone channel that a rule must track,
        e.g. a size-1 slice concatenated along a channel dim."""
        s = Space(len(self.spaces), 1, origin)
        if blocked:
            s.blocked.append(blocked)
        self.spaces.append(s)
        return s

    def find(self, s: Space) -> Space:
        root = s
        while root.parent is not root:
            root = root.parent
        while s.parent is not root:
            s.parent, s = root, s.parent
        return root

    def expand(self, layout):
        """The layout with every space replaced by its representative's refinement, recursively."""
        if layout is None:
            return None
        if isinstance(layout, Space):
            r = self.find(layout)
            return r if r.refined is None else self.expand(r.refined)
        parts = tuple(self.expand(p) for p in layout.parts)
        return make_prod(parts) if isinstance(layout, Prod) else make_cat(parts)

    def leaves(self, layout) -> list:
        """Representative leaf spaces of a layout, in order (with repeats)."""
        layout = self.expand(layout)
        if layout is None:
            return []
        if isinstance(layout, Space):
            return [layout]
        out = []
        for p in layout.parts:
            out.extend(self.leaves(p))
        return out

    # -- flags ----------------------------------------------------------------------------
    def block(self, layout, reason: str) -> None:
        for s in self.leaves(layout):
            if reason not in s.blocked:
                s.blocked.append(reason)

    def mark_inexact(self, layout, reason: str) -> None:
        """Recorded on blocked spaces too: a block can be lifted (a routed expert dim, by its experts group)."""
        for s in self.leaves(layout):
            if reason not in s.inexact:
                s.inexact.append(reason)

    # -- refinement -----------------------------------------------------------------------
    def _refine(self, space: Space, layout) -> None:
        """Set ``space``'s refinement; its flags move onto the new leaves."""
        space = self.find(space)
        assert space.refined is None and layout.size == space.size
        space.refined = layout
        for leaf in self.leaves(layout):
            if leaf is space:
                raise Unifiable("cyclic refinement")
            for r in space.blocked:
                if r not in leaf.blocked:
                    leaf.blocked.append(r)
            for r in space.inexact:
                if r not in leaf.inexact:
                    leaf.inexact.append(r)
            leaf.broadcast = leaf.broadcast or space.broadcast

    def _fresh_parts(self, space: Space, sizes) -> list:
        parts = []
        for k, n in enumerate(sizes):
            if n == 1:
                # a single index: keep it addressable as a size-1 space only inside Cats
                s = Space(len(self.spaces), 1, f"{space.origin}[{k}]")
                self.spaces.append(s)
                parts.append(s)
            else:
                parts.append(self.new(n, f"{space.origin}[{k}]"))
        return parts

    def split(self, layout, sizes) -> list:
        """Express ``layout`` as Prod of factors of the given sizes (a reshape split). Raises Unifiable."""
        sizes = [n for n in sizes if n != 1]
        layout = self.expand(layout)
        if layout is None:
            if sizes:
                raise Unifiable("size mismatch")
            return []
        if _prod(sizes) != layout.size:
            raise Unifiable("size mismatch")
        factors = list(layout.parts) if isinstance(layout, Prod) else [layout]
        out = []
        for target in sizes:
            acc, accsize = [], 1
            while accsize < target:
                if not factors:
                    raise Unifiable("reshape does not align with the channel structure")
                f = factors.pop(0)
                if target % (accsize * f.size) == 0:
                    acc.append(f)
                    accsize *= f.size
                    continue
                need = target // accsize
                if target % accsize or f.size % need:
                    raise Unifiable("reshape does not align with the channel structure")
                head, tail = self._split_factor(f, need, f.size // need)
                acc.append(head)
                accsize *= need
                factors.insert(0, tail)
            out.append(make_prod(acc))
        if factors:
            raise Unifiable("size mismatch")
        return out

    def _split_factor(self, f, a: int, b: int):
        if isinstance(f, Space):
            pa, pb = self._fresh_parts(f, [a, b])
            self._refine(f, Prod((pa, pb)))
            return pa, pb
        if isinstance(f, Prod):
            return tuple(self.split(f, [a, b]))
        raise Unifiable("cannot split a concatenation into a product")

    def slice(self, layout, start: int, stop: int):
        """Sub-range [start, stop) of a layout, refining spaces at the cut points. Raises Unifiable."""
        layout = self.expand(layout)
        n = layout.size
        if start == 0 and stop == n:
            return layout
        if not 0 <= start < stop <= n:
            raise Unifiable("empty slice")
        if isinstance(layout, Space):
            bounds = sorted({0, start, stop, n})
            parts = self._fresh_parts(layout, [hi - lo for lo, hi in zip(bounds, bounds[1:])])
            self._refine(layout, make_cat(parts))
            return parts[bounds.index(start)]
        if isinstance(layout, Cat):
            pieces, off = [], 0
            for p in layout.parts:
                lo, hi = max(start, off), min(stop, off + p.size)
                if lo < hi:
                    pieces.append(self.slice(p, lo - off, hi - off))
                off += p.size
            return make_cat(pieces)
        # Prod: slice along the leading factor, in whole blocks of the trailing ones
        first, rest = layout.parts[0], make_prod(layout.parts[1:])
        r = rest.size
        if start % r == 0 and stop % r == 0:
            return make_prod([self.slice(first, start // r, stop // r), rest])
        raise Unifiable("slice cuts through a product of channel spaces")

    def segments(self, layout) -> list:
        """Top-level concatenation segments, distributing a leading Cat factor over a Prod."""
        layout = self.expand(layout)
        if isinstance(layout, Cat):
            out = []
            for p in layout.parts:
                out.extend(self.segments(p))
            return out
        if isinstance(layout, Prod) and isinstance(layout.parts[0], Cat):
            rest = layout.parts[1:]
            out = []
            for p in layout.parts[0].parts:
                out.extend(self.segments(make_prod([p, *rest])))
            return out
        return [layout]

    # -- unification ----------------------------------------------------------------------
    def unify(self, a, b) -> None:
        """Couple two layouts index by index. Raises Unifiable when their structures cannot align."""
        a, b = self.expand(a), self.expand(b)
        if a is None or b is None:
            if (a is None) != (b is None):
                raise Unifiable("size mismatch")
            return
        if a.size != b.size:
            raise Unifiable("size mismatch")
        if a is b:
            return
        if isinstance(a, Space) and isinstance(b, Space):
            self._union(a, b)
        elif isinstance(a, Space):
            self._refine(a, b)
        elif isinstance(b, Space):
            self._refine(b, a)
        elif isinstance(a, Prod) and isinstance(b, Prod):
            self._unify_factors(list(a.parts), list(b.parts))
        else:
            self._unify_segments(a, b)

    def _union(self, a: Space, b: Space) -> None:
        a, b = self.find(a), self.find(b)
        if a is b:
            return
        b.parent = a
        a.blocked.extend(r for r in b.blocked if r not in a.blocked)
        a.inexact.extend(r for r in b.inexact if r not in a.inexact)
        a.broadcast = a.broadcast or b.broadcast

    def _unify_factors(self, fa: list, fb: list) -> None:
        while fa and fb:
            x, y = self.expand(fa.pop(0)), self.expand(fb.pop(0))
            if x.size == y.size:
                self.unify(x, y)
            elif x.size % y.size == 0:
                head, tail = self._split_factor(x, y.size, x.size // y.size)
                self.unify(head, y)
                fa.insert(0, tail)
            elif y.size % x.size == 0:
                head, tail = self._split_factor(y, x.size, y.size // x.size)
                self.unify(x, head)
                fb.insert(0, tail)
            else:
                raise Unifiable("products do not align")
        if fa or fb:
            raise Unifiable("products do not align")

    def _unify_segments(self, a, b) -> None:
        cuts = sorted(set(_offsets(self.segments(a))) | set(_offsets(self.segments(b))))
        for lo, hi in zip(cuts, cuts[1:]):
            self.unify(self.slice(a, lo, hi), self.slice(b, lo, hi))

    # -- index maps -----------------------------------------------------------------------
    def positions(self, layout) -> dict:
        """For each representative leaf space in ``layout``: an int array over the layout's indices
        giving that space's index at each position, or -1 where the space does not appear."""
        layout = self.expand(layout)
        out: dict = {}
        if layout is not None:
            idx = np.arange(layout.size, dtype=np.int64)
            self._fill(layout, idx, idx, out, layout.size)
        return out

    def _fill(self, layout, global_idx, local_idx, out, total):
        """global_idx: positions (in the top layout) of this sub-layout's indices; local_idx: their
        index within this sub-layout."""
        if isinstance(layout, Space):
            arr = out.get(layout)
            if arr is None:
                arr = out[layout] = np.full(total, -1, dtype=np.int64)
            arr[global_idx] = local_idx
            return
        if isinstance(layout, Cat):
            off = 0
            for p in layout.parts:
                sel = (local_idx >= off) & (local_idx < off + p.size)
                self._fill(p, global_idx[sel], local_idx[sel] - off, out, total)
                off += p.size
            return
        inner = layout.size
        for p in layout.parts:
            inner //= p.size
            self._fill(p, global_idx, (local_idx // inner) % p.size, out, total)

    def describe(self, layout, names: dict | None = None) -> str:
        """Human-readable layout, e.g. ``(kv:3 x rep:3 x S12:64)``."""
        layout = self.expand(layout)
        names = names or {}
        if layout is None:
            return "1"
        if isinstance(layout, Space):
            return f"{names.get(layout.id, 'S%d' % layout.id)}:{layout.size}"
        sep = " x " if isinstance(layout, Prod) else " ++ "
        return "(" + sep.join(self.describe(p, names) for p in layout.parts) + ")"


def _offsets(segments) -> list:
    out, off = [0], 0
    for s in segments:
        off += s.size
        out.append(off)
    return out
