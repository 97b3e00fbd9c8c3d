"""Does a size read off a tensor follow the space it sizes? (the proof behind a literal size read at run time)

The trace's tagged export (:mod:`depgraph.reads`) names, for each int a torch call was passed, the tensor dims it is the
product of (``self:D``: dim D of the call's own input; ``node:NAME:D:SHAPE:OP``: dim D of the graph node NAME)
and the attributes among its factors. The size follows the pruning exactly when those dims' channel spaces are
the spaces of the output dim it sizes, as a multiset of product factors (leaf spaces, or a concatenation of them
taken whole: each shrinks by the same units everywhere), with at most one factor an attention count attribute
the shrinker rewrites, sizing exactly the leaves left over.
"""
from __future__ import annotations

from collections import Counter
from math import prod

from .layout import Cat, Prod
from .dimflow import module_path
from .reads import op_name_of


class SizeSpaces:
    """Leaf spaces of the dims of ``nodes`` (by name, from one trace's ``flow``) for :func:`reads.follows_call`."""

    def __init__(self, flow, nodes: dict, root=None):
        self.flow, self.nodes, self.root = flow, nodes, root

    def _leaves(self, lay) -> list:
        """The factors of a layout's row-major product: leaf spaces, and each concatenation whole (the same
        concatenation of the same spaces shrinks alike; its parts are sizes summed, not multiplied)."""
        if lay is None:
            return []
        expanded = self.flow.store.expand(lay)
        return list(expanded.parts) if isinstance(expanded, Prod) else [expanded]

    def _dim(self, node, d: int) -> list | None:
        lays = self.flow.env.get(node)
        val = node.meta.get("val") if hasattr(node, "meta") else None
        if not isinstance(lays, tuple) or not hasattr(val, "shape") or not 0 <= d < len(lays):
            return None
        return self._leaves(lays[d])

    def _source(self, node, f: str):
        """(graph node, dim) a ``self:D`` / ``node:NAME:D:SHAPE:OP`` factor names; None if unknown here."""
        if f.startswith("self:"):
            src = node.args[0] if node.args else None
            return (src, int(f[5:])) if hasattr(src, "meta") else None
        _, name, d, shape, op = f.split(":")
        other = self.nodes.get(name)
        val = other.meta.get("val") if other is not None else None
        if not hasattr(val, "shape") or "x".join(str(int(n)) for n in val.shape) != shape or \
                op_name_of(other) != op:
            return None  # not the tensor the export saw: proves nothing
        return other, int(d)

    def _factor(self, node, f: str) -> list | None:
        """Factors of the tensor dim a ``self:D`` / ``node:...`` factor names; None if unknown here."""
        src = self._source(node, f)
        return self._dim(*src) if src is not None else None

    def follows(self, node, i: int, tag: str) -> bool:
        """Whether size ``tag`` at position ``i`` of ``node``'s sizes (its output dim ``i``) follows that dim."""
        target = self._dim(node, i)
        if target is None or "/" in tag:
            return False
        got, named = Counter(), []
        for f in tag.split("*"):
            if f.startswith(("self:", "node:")):
                lv = self._factor(node, f)
                if lv is None:
                    return False
                got.update(lv)
            else:
                named.append(f)
        want = Counter(target)
        if got - want:  # a factor read off a dim in another space
            return False
        rest = list((want - got).elements())
        if not named:
            return not rest
        return len(named) == 1 and self._count(node, named[0], rest)

    def _count(self, node, name: str, rest: list) -> bool:
        """``name`` is a head (or kv head, without GQA) count of ``node``'s module that the shrinker rewrites, and
        ``rest`` are exactly the leaves of that module's query heads (their kept sizes multiply to the new count)."""
        from .shrink import ATTENTION_ATTRIBUTES

        kind = ATTENTION_ATTRIBUTES.get(name)
        path = module_path(node)
        try:
            value = getattr(self.root.get_submodule(path), name) if self.root is not None else None
        except AttributeError:
            return False
        if kind not in ("heads", "kv") or not isinstance(value, int) or not rest or \
                prod(leaf.size for leaf in rest) != value:
            return False
        for site in self.flow.attention:  # all of the heads: a kv count only where every head is its own kv head
            counts = (site.num_heads,) if kind == "heads" else (site.num_kv_heads, site.num_heads)
            heads = self._leaves(site.heads)
            if site.module == path and set(counts) == {value} and heads and Counter(rest) == Counter(heads):
                return True
        return False


    def sizes_part(self, node, tag: str, part) -> bool:
        """Whether size ``tag`` (a split size or slice bound of ``node``) follows ``part``, the layout it sizes: a
        product of tensor dims whose factors are exactly ``part``'s, or one dim's size over ``k`` where that dim is
        ``k`` copies of ``part`` concatenated (``h.split(h.size(-1) // 2, -1)`` over gate ++ up, one space): after
        pruning, each copy keeps the same units, so the quotient is the pruned part's size."""
        size, _, k = tag.partition("/")
        factors = size.split("*")
        if not all(f.startswith(("self:", "node:")) for f in factors):
            return False
        mine = self.flow.store.expand(part)
        if not k:
            got = []
            for f in factors:
                lv = self._factor(node, f)
                if lv is None:
                    return False
                got += lv
            return bool(got) and Counter(got) == Counter(self._leaves(part))
        whole = self._layout(node, size) if len(factors) == 1 and k.isdigit() else None
        if whole is None or int(k) < 2:
            return False
        parts = mine.parts if isinstance(mine, Cat) else (mine,)
        return isinstance(whole, Cat) and whole.parts == parts * int(k)

    def _layout(self, node, f: str):
        """The expanded layout of the one tensor dim a ``self:D`` / ``node:...`` factor names, or None."""
        src = self._source(node, f)
        lays = self.flow.env.get(src[0]) if src is not None else None
        if not isinstance(lays, tuple) or not 0 <= src[1] < len(lays) or lays[src[1]] is None:
            return None
        return self.flow.store.expand(lays[src[1]])
