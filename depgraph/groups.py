"""Groups: sets of parameter channels that must be removed together, with their index maps."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import PlanError


@dataclass
class Member:
    """One parameter dim of a group. ``unit_of_index[i]`` is the unit that index ``i`` belongs to
    (-1: not part of this group). With ``level="kv"`` (GQA key/value rows) it is the kv group."""

    param: str
    dim: int
    unit_of_index: np.ndarray
    level: str = "unit"
    layout: str = ""
    numel: int = 0  # elements of the whole parameter

    def indices(self, units) -> np.ndarray:
        """Sorted indices of this dim that belong to ``units`` (kv ids for kv-level members)."""
        return np.flatnonzero(np.isin(self.unit_of_index, np.asarray(list(units), dtype=np.int64)))

    def __repr__(self) -> str:
        return f"Member({self.param}, dim={self.dim}, {self.layout or len(self.unit_of_index)}, {self.level})"


@dataclass
class Group:
    """Channels coupled across parameters. ``units`` are heads (attention), neurons (mlp) or channels.

    ``gqa = (num_kv_heads, q_per_kv)`` for grouped-query attention: a plan removes whole kv groups
    and/or the same number of query heads from every remaining kv group.

    ``kind="experts"``: one unit is one routed expert of a mixture-of-experts layer: its router row (and
    router bias), its slices of the fused expert weights ``[E, ...]`` and every per-expert bias or scale.
    ``routing`` holds ``top_k`` (a plan must leave at least that many experts), the router's parameter
    names (``router``), the module calling the router's linear (``router_module``) and the modules whose
    expert counts the shrinker rewrites (``modules``). *Masking* an expert means zeroing its parameters
    and giving it a router logit of ``-inf`` (depgraph.routing): it is never selected and takes no
    softmax mass, which is exactly what the model without it computes, whether the routing is
    softmax-then-top-k (renormalised or not), top-k-then-softmax or sigmoid scores. Zeroing the router
    row alone would not do: a zero logit still takes softmax mass and can still be selected.
    """

    id: str
    kind: str
    layer: int | None
    num_units: int
    unit_size: int
    members: list
    exact: bool
    inexact_reasons: list = field(default_factory=list)
    gqa: tuple | None = None
    module: str | None = None
    head_dim: int | None = None
    modules: list = field(default_factory=list)  # every attention module whose heads these are (shared heads)
    routing: dict | None = None
    align: int = 1  # widths a plan may leave are multiples of it (fused experts run through grouped_mm)
    width_modules: list = field(default_factory=list)  # modules whose width attributes follow this group (MoE)
    block: dict | None = None  # kind "block": a residual branch or a whole layer (depgraph.blocks)

    @property
    def min_units(self) -> int:
        """Units a plan must leave: ``top_k`` experts for a routed-experts group, else one."""
        return int(self.routing["top_k"]) if self.routing else 1

    @property
    def params_per_unit(self) -> float:
        """Parameters removed per unit (GQA: a q head's share of its kv group's key/value rows)."""
        if self.block is not None:
            return float(self.block["numel"])
        total = 0.0
        for m in self.members:
            n = len(m.unit_of_index)
            per_index = m.numel // n
            covered = int((m.unit_of_index >= 0).sum())
            total += covered * per_index / self.num_units
        return total

    def validate(self, units) -> list:
        """Sorted unique units after checks; raises PlanError naming the problem."""
        units = sorted({int(u) for u in units})
        if self.block is not None:
            if units not in ([], [0]):
                raise PlanError(f"group {self.id}: a block has the one unit 0 (remove it or not), got {units}")
            return units
        if units and (units[0] < 0 or units[-1] >= self.num_units):
            raise PlanError(f"group {self.id}: unit index out of range 0..{self.num_units - 1}: "
                            f"{[u for u in units if not 0 <= u < self.num_units]}")
        if len(units) >= self.num_units:
            raise PlanError(f"group {self.id}: the plan removes all {self.num_units} {self.unit_name}"
                            f" of layer {self.layer}; at least one must stay")
        if self.align > 1 and self.num_units % self.align == 0 and (self.num_units - len(units)) % self.align:
            raise PlanError(f"group {self.id}: the plan leaves {self.num_units - len(units)} {self.unit_name}; "
                            f"fused expert weights run through grouped_mm, which needs a multiple of {self.align}")
        if self.num_units - len(units) < self.min_units:
            raise PlanError(f"group {self.id}: the plan leaves {self.num_units - len(units)} of {self.num_units} "
                            f"experts in layer {self.layer}, fewer than the top_k={self.min_units} each token is "
                            f"routed to")
        if self.gqa and units:
            kv, rep = self.gqa
            counts = np.bincount(np.asarray(units) // rep, minlength=kv)
            partial = {int(c) for c in counts if c != rep}
            if len(partial) > 1:
                raise PlanError(
                    f"group {self.id}: GQA rule broken: remove whole kv groups ({rep} query heads each) or the "
                    f"same number of query heads from every kv group; got per-group counts {counts.tolist()}")
        return units

    @property
    def unit_name(self) -> str:
        return {"attention": "heads", "mlp": "neurons", "experts": "experts", "block": "block"}.get(self.kind, "channels")

    def legal_count(self, n: int) -> int:
        """The number of units to remove closest to ``n`` that keeps ``min_units`` and the alignment."""
        n = max(0, min(int(n), self.num_units - self.min_units))
        if self.align > 1 and self.num_units % self.align == 0:
            keep = max(self.align, -(-(self.num_units - n) // self.align) * self.align)
            n = self.num_units - keep
        return n

    def removed_kv(self, units) -> list:
        if not self.gqa:
            return []
        kv, rep = self.gqa
        counts = np.bincount(np.asarray(list(units), dtype=np.int64) // rep, minlength=kv)
        return [g for g in range(kv) if counts[g] == rep]

    def removed_indices(self, units) -> dict:
        """{(param, dim): indices} removed by removing ``units``."""
        units = list(units)
        kv_units = self.removed_kv(units)
        out = {}
        for m in self.members:
            idx = m.indices(kv_units if m.level == "kv" else units)
            if len(idx):
                out[(m.param, m.dim)] = idx
        return out

    def size_text(self, short: bool = False) -> str:
        """``9 heads (3 kv x 3 q/kv) x 64``, ``1536 neurons``; ``short``: ``9 heads (3 kv x 3) x 64`` (drawings)."""
        if self.kind == "attention":
            size = f"{self.num_units} heads"
            if self.gqa:
                size += f" ({self.gqa[0]} kv x {self.gqa[1]}{'' if short else ' q/kv'})"
            return size + f" x {self.head_dim}"
        if self.block is not None:
            return f"{self.block['part']} ({self.block['numel']:,} parameters)"
        if self.routing:
            return f"{self.num_units} experts (top-{self.min_units})"
        return f"{self.num_units} {self.unit_name}"

    def describe(self) -> str:
        exact = "exact" if self.exact else "inexact"
        return f"{self.id:<16} {self.size_text():<32} {exact:<8} {len(self.members)} members"
