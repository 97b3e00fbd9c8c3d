"""Plan: which units of which groups to remove. Self-contained: it carries the index maps it needs,
so ``mask``/``shrink`` and ``Plan.from_json`` work without the graph."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from .errors import PlanError

FORMAT = 1


@dataclass
class PlanEntry:
    """Units removed from one group, with the parameter indices that removal deletes."""

    group: str
    kind: str
    layer: int | None
    num_units: int
    units: list
    removed: dict  # param -> {dim: [indices]}
    exact: bool = True
    attention: dict | None = None  # module, heads_before/after, kv_before/after, head_dim
    experts: dict | None = None  # routed experts: top_k, router, router_module, modules, experts_before/after
    width_modules: list | None = None  # modules whose width attributes (hidden_dim, ...) follow the group
    block: dict | None = None  # kind "block": part, list/index, modules, params, writes (depgraph.blocks)

    @property
    def units_after(self) -> int:
        return self.num_units - len(self.units)


@dataclass
class Plan:
    entries: list = field(default_factory=list)
    shapes: dict = field(default_factory=dict)  # param -> shape the plan was made for

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_units(cls, graph, removals: dict) -> "Plan":
        """``removals``: {group id: unit indices}. Validates every group before returning."""
        entries = []
        for gid, units in removals.items():
            g = graph.group(gid)
            units = g.validate(units)
            if not units:
                continue
            removed = {}
            for (param, dim), idx in g.removed_indices(units).items():
                removed.setdefault(param, {})[dim] = [int(i) for i in idx]
            att = None
            if g.kind == "attention":
                kv, rep = g.gqa if g.gqa else (g.num_units, 1)
                kv_gone = len(g.removed_kv(units)) if g.gqa else len(units)
                att = {"module": g.module, "modules": list(g.modules or [g.module]), "head_dim": g.head_dim,
                       "heads_before": g.num_units,
                       "heads_after": g.num_units - len(units), "kv_before": kv, "kv_after": kv - kv_gone}
            experts = None
            if g.routing:
                experts = dict(g.routing, experts_before=g.num_units, experts_after=g.num_units - len(units))
            entries.append(PlanEntry(g.id, g.kind, g.layer, g.num_units, units, removed, g.exact, att, experts,
                                     list(g.width_modules) or None, dict(g.block) if g.block else None))
        check_blocks(entries)
        touched = {p for e in entries for p in e.removed} | {p for e in entries if e.block for p in e.block["params"]}
        return cls(entries, {p: list(graph.shapes[p]) for p in touched})

    @classmethod
    def random(cls, graph, ratio: float, seed: int = 0, kinds=None, gqa: str = "heads") -> "Plan":
        """Remove about ``ratio`` of the units of every group of ``kinds`` (all kinds if None), legally:
        GQA groups lose ``gqa="heads"`` the same number of query heads per kv group, or ``"kv"`` whole kv
        groups; no group is emptied and every experts group keeps at least ``top_k`` experts."""
        check_ratio(ratio)
        if gqa not in ("heads", "kv"):
            raise PlanError(f"gqa policy must be 'heads' or 'kv', got {gqa!r}")
        rng = np.random.default_rng(seed)
        removals = {}
        for g in graph.groups(kinds):
            if g.gqa:
                kv, rep = g.gqa
                if gqa == "kv":
                    n = min(int(round(ratio * kv)), kv - 1)
                    units = [k * rep + r for k in rng.choice(kv, n, replace=False) for r in range(rep)]
                else:
                    n = min(int(round(ratio * rep)), rep - 1)
                    units = [k * rep + r for k in range(kv) for r in rng.choice(rep, n, replace=False)]
            else:
                n = g.legal_count(round(ratio * g.num_units))
                units = rng.choice(g.num_units, n, replace=False).tolist()
            removals[g.id] = units
        return cls.from_units(graph, removals)

    @classmethod
    def from_scores(cls, graph, scores: dict, target: float | None = None, kinds=("attention", "mlp"),
                    policy: str = "uniform", layers=None, round_to: int = 8, gqa: str = "heads",
                    ratios: dict | None = None, min_width: float = 0.25, depth_share: float | None = None,
                    target_of: str = "all") -> "Plan":
        """Remove the lowest-scored units until ``target`` (a fraction of the parameters ``target_of`` names,
        counted exactly: ``"all"``, embeddings included, or ``"non-embedding"``: all but
        ``graph.embedding_params``, whose removed columns then do not count either) is reached, or, with
        ``ratios={"attention": 0.25, "mlp": 0.3}``, that fraction of the units of every group of each kind.

        ``policy="uniform"``: the same fraction of units in every group (bisection on that fraction);
        ``"global"``: one threshold on the (normalised) scores across groups; ``"adaptive"``: per-layer widths
        from measured sensitivity, FLAP-style: each kind's scores are standardised over all its groups (z-scores,
        so heads and neurons compare), one threshold across layers, and every group keeps at least ``min_width``
        of its units (MLP widths still multiples of ``round_to``). ``layers``: only groups of
        these layers (e.g. ``range(3, 27)``). ``round_to``: MLP widths kept a multiple of it. ``gqa``:
        ``"heads"`` removes the same number of query heads per kv group, ``"kv"`` whole kv groups.

        ``block`` in ``kinds`` (depth pruning, depgraph.blocks): whole layers and attention/MLP sub-blocks are removed
        first, cheapest first by score per parameter, never two that overlap and never every layer, until
        ``depth_share`` of the target (default: all of it when no width kind is asked for, else half) is reached
        (the closest count); the width groups outside the removed blocks then make up the rest of the target.
        """
        if (target is None) == (ratios is None):
            raise PlanError("give either a parameter target or per-kind ratios")
        if ratios is not None:
            for kind, r in ratios.items():
                check_ratio(r)
            kinds = tuple(ratios)
        else:
            check_ratio(target)
        if policy not in POLICIES:
            raise PlanError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if not 0 < min_width <= 1:
            raise PlanError(f"min_width must be in (0, 1], got {min_width!r}")
        check_round_to(round_to)
        budget = Budget.of(graph, target_of)
        groups = [g for g in select_groups(graph, kinds, layers) if g.id in scores]
        if not groups:
            raise PlanError(f"no scored groups of kinds {kinds} in {_layers_text(layers)}")
        total = budget.total
        blocks = [g for g in groups if g.kind == "block"]
        chosen: dict = {}
        if blocks:
            if ratios is not None:
                raise PlanError("block groups are planned under a parameter target, not per-kind ratios")
            groups = [g for g in groups if g.kind != "block"]
            share = depth_share if depth_share is not None else (0.5 if groups else 1.0)
            if not 0 <= share <= 1:
                raise PlanError(f"depth_share must be in [0, 1], got {share!r}")
            chosen = _choose_blocks(blocks, scores, share * target * total)
            gone = {p for g in blocks if g.id in chosen for p in g.block["params"]}
            groups = [g for g in groups if not any(m.param in gone for m in g.members)]
            if not groups:
                return cls.from_units(graph, chosen)
        if ratios is not None:
            return cls.from_units(graph, {g.id: _select(g, np.asarray(scores[g.id], dtype=np.float64),
                                                        ratios[g.kind], round_to, gqa) for g in groups})

        if policy == "adaptive":
            scores = {**scores, **_standardised(groups, scores)}
        max_frac = 1.0 if policy != "adaptive" else 1.0 - min_width

        def plan_for(x):
            removals = dict(chosen)
            for g in groups:
                s = np.asarray(scores[g.id], dtype=np.float64)
                frac = x if policy == "uniform" else min(float((s < x).mean()), max_frac)
                removals[g.id] = _select(g, s, frac, round_to, gqa)
            return cls.from_units(graph, removals)

        if policy == "uniform":
            lo, hi = 0.0, 1.0
        else:
            every = np.concatenate([np.asarray(scores[g.id], dtype=np.float64) for g in groups])
            lo, hi = float(every.min()), float(every.max()) + 1e-12
        _check_reachable(plan_for(hi), budget, target, kinds, layers)
        best = plan_for(lo)
        for _ in range(30):
            mid = (lo + hi) / 2
            cand = plan_for(mid)
            if budget.fraction(cand) < target:
                lo, best = mid, cand
            else:
                hi = mid
        above = plan_for(hi)
        # the closer of the two plans that bracket the target
        if abs(budget.fraction(above) - target) < abs(budget.fraction(best) - target):
            best = above
        return best

    # -- views ------------------------------------------------------------------------------
    def removed_by_param(self, blocks: bool = True) -> dict:
        """{param: {dim: sorted indices}} merged over every entry (``blocks=False``: width entries only; a block
        entry lists its write parameters whole, which is what masking it zeroes)."""
        out: dict = {}
        for e in self.entries:
            if e.block and not blocks:
                continue
            for p, dims in e.removed.items():
                for d, idx in dims.items():
                    out.setdefault(p, {}).setdefault(int(d), set()).update(idx)
        return {p: {d: sorted(s) for d, s in dims.items()} for p, dims in out.items()}

    def params_removed(self, skip=()) -> int:
        """Exact number of parameter elements deleted (a block's parameters count whole), not counting the
        parameters named in ``skip`` (e.g. the embedding tables, for a non-embedding budget)."""
        skip = set(skip)
        whole = {p for e in self.entries if e.block for p in e.block["params"]} - skip
        total = sum(int(np.prod(self.shapes[p])) for p in whole)
        for p, dims in self.removed_by_param().items():
            if p in whole or p in skip:
                continue
            shape = list(self.shapes[p])
            kept = [n - len(dims.get(d, ())) for d, n in enumerate(shape)]
            total += int(np.prod(shape)) - int(np.prod(kept))
        return total

    def summary(self) -> str:
        lines = [f"Plan: {len(self.entries)} groups, {self.params_removed():,} parameters removed"]
        for e in self.entries:
            lines.append(f"  {e.group:<16} {e.num_units} -> {e.units_after} {'' if e.exact else '(inexact)'}")
        return "\n".join(lines)

    __str__ = summary

    # -- JSON -------------------------------------------------------------------------------
    def to_json(self, indent: int | None = None) -> str:
        return json.dumps({"format": FORMAT, "shapes": self.shapes,
                           "entries": [e.__dict__ for e in self.entries]}, indent=indent)

    @classmethod
    def from_json(cls, text: str, graph=None) -> "Plan":
        """Read a plan written by :meth:`to_json`, checked by :func:`check_plan` (against ``graph`` when given)."""
        try:
            data = json.loads(text)
            if isinstance(data, list):
                raise PlanError(f"this JSON holds {len(data)} plans (one per step of an iterative prune), not one")
            if not isinstance(data, dict):
                raise PlanError(f"not a depgraph plan: a JSON {type(data).__name__}")
            if data.get("format") != FORMAT:
                raise PlanError(f"plan format {data.get('format')!r} is not {FORMAT}")
            entries = []
            for e in data["entries"]:
                e = dict(e)
                e["removed"] = {p: {int(d): idx for d, idx in dims.items()} for p, dims in e["removed"].items()}
                entries.append(PlanEntry(**e))
            plan = cls(entries, {p: list(s) for p, s in data["shapes"].items()})
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            if isinstance(err, PlanError):
                raise
            raise PlanError(f"not a depgraph plan: {type(err).__name__}: {err}") from err
        return check_plan(plan, graph)


# -- plan.json: one plan (a JSON object) or the steps of an iterative run (a JSON list of them) ----------------------
def dump_plans(plans) -> str:
    """The text of ``plan.json``: one :class:`Plan` as an object, several (the steps of an iterative run, each made
    for the shapes the previous one left) as a list of them."""
    plans = [plans] if isinstance(plans, Plan) else list(plans)
    if len(plans) == 1:
        return plans[0].to_json(indent=1)
    return "[" + ",\n".join(p.to_json(indent=1) for p in plans) + "]"


def load_plans(source) -> list:
    """The steps of a ``plan.json``: ``source`` is its text, a path to it, or a run folder holding one.

    Returns ``[Plan, ...]`` (one element for a one-step plan); :func:`compose` turns several into one plan on the
    original shapes."""
    from pathlib import Path

    if isinstance(source, Plan):
        return [source]
    text = str(source)
    if not text.lstrip().startswith(("{", "[")):
        path = Path(source)
        if path.is_dir():
            path = path / "plan.json"
        if not path.is_file():
            raise FileNotFoundError(f"plan {path} does not exist")
        text = path.read_text()
    stripped = text.lstrip()
    if not stripped.startswith("["):
        return [Plan.from_json(text)]
    try:
        steps = json.loads(text)
    except ValueError as err:
        raise PlanError(f"not a depgraph plan: {err}") from err
    if not steps:
        raise PlanError("plan.json holds an empty list of steps")
    return [Plan.from_json(json.dumps(step)) for step in steps]


def compose(plans) -> Plan:
    """One plan on the original shapes equivalent to applying ``plans`` in turn (each made for the shapes the
    previous ones left): every index is mapped back to the original tensor / group, entries of the same group merge
    (units before from the first step, after from the last)."""
    plans = list(plans)
    if len(plans) == 1:
        return plans[0]
    alive: dict = {}  # (param, dim) -> original indices still present
    shapes: dict = {}
    units_alive: dict = {}  # group -> original unit indices still present
    merged: dict = {}  # group -> PlanEntry on the original indices
    for plan in plans:
        for p, shape in plan.shapes.items():
            shapes.setdefault(p, list(shape))
            for d, n in enumerate(shape):
                alive.setdefault((p, d), list(range(n)))
        gone: dict = {}
        for e in plan.entries:
            ua = units_alive.setdefault(e.group, list(range(e.num_units)))
            units = [ua[u] for u in e.units]
            removed = {p: {d: [alive[(p, d)][i] for i in idx] for d, idx in dims.items()}
                       for p, dims in e.removed.items()}
            old = merged.get(e.group)
            if old is None:
                merged[e.group] = PlanEntry(e.group, e.kind, e.layer, e.num_units, sorted(units), removed, e.exact,
                                            dict(e.attention) if e.attention else None)
            else:
                old.units = sorted(set(old.units) | set(units))
                for p, dims in removed.items():
                    for d, idx in dims.items():
                        old.removed.setdefault(p, {})[d] = sorted(set(old.removed.get(p, {}).get(d, [])) | set(idx))
                old.exact = old.exact and e.exact
                if old.attention and e.attention:
                    old.attention.update(heads_after=e.attention["heads_after"], kv_after=e.attention["kv_after"])
            gone.setdefault(e.group, set()).update(units)
            for p, dims in removed.items():
                for d, idx in dims.items():
                    gone.setdefault((p, d), set()).update(idx)
        for key, idx in gone.items():  # shrink the index spaces only after the whole step (one set of shapes)
            table = units_alive if isinstance(key, str) else alive
            table[key] = [i for i in table[key] if i not in idx]
    return Plan(list(merged.values()), shapes)


POLICIES = ("uniform", "global", "adaptive")


def check_blocks(entries) -> None:
    """Raise PlanError for block entries that overlap each other or a width entry, or that remove every layer."""
    blocks = [e for e in entries if e.block]
    if not blocks:
        return
    owner = {}
    for e in blocks:
        for p in e.block["params"]:
            if p in owner:
                raise PlanError(f"blocks {owner[p]} and {e.group} overlap (both remove {p}): remove the layer or "
                                f"its sub-blocks, not both")
            owner[p] = e.group
    for e in entries:
        if not e.block:
            inside = [p for p in e.removed if p in owner]
            if inside:
                raise PlanError(f"group {e.group} lies inside removed block {owner[inside[0]]} ({inside[0]})")
    gone: dict = {}
    for e in blocks:
        b = e.block
        if b.get("list") is None:
            continue
        if b["part"] == "layer":
            gone.setdefault(b["list"], set()).add(b["index"])
    parts: dict = {}
    for e in blocks:  # a layer whose every sub-block is removed is gone too
        if e.block["part"] != "layer" and e.block.get("list") is not None:
            parts.setdefault((e.block["list"], e.block["index"]), []).append(e.block.get("parts") or 0)
    for (lst, i), found in parts.items():
        if len(found) >= max(found):
            gone.setdefault(lst, set()).add(i)
    for lst, idx in gone.items():
        size = max(e.block.get("list_size") or 0 for e in blocks if e.block.get("list") == lst)
        if size and len(idx) >= size:
            raise PlanError(f"the plan removes all {size} layers of {lst}; at least one must stay")


def _choose_blocks(blocks, scores: dict, budget: float) -> dict:
    """{block id: [0]}: the blocks with the lowest score per parameter, skipping any that overlaps one already
    chosen or would leave no layer, while the parameters removed get closer to ``budget``."""
    order = sorted(blocks, key=lambda g: (float(np.asarray(scores[g.id]).ravel()[0]) / max(g.block["numel"], 1),
                                          g.id))
    chosen, used, removed = {}, set(), 0
    for g in order:
        n = g.block["numel"]
        if removed + n / 2 > budget:
            continue
        if used & set(g.block["params"]):
            continue
        trial = [PlanEntry(b.id, "block", b.layer, 1, [0], {}, True, block=dict(b.block))
                 for b in blocks if b.id in chosen or b is g]
        try:
            check_blocks(trial)
        except PlanError:
            continue
        chosen[g.id] = [0]
        used |= set(g.block["params"])
        removed += n
    return chosen


def _standardised(groups, scores: dict) -> dict:
    """{group id: z-scores}: each kind's scores standardised over all of that kind's groups (FLAP's AL-AM)."""
    out = {}
    for kind in {g.kind for g in groups}:
        mine = [g for g in groups if g.kind == kind]
        every = np.concatenate([np.asarray(scores[g.id], dtype=np.float64) for g in mine])
        mu, sd = every.mean(), every.std() or 1.0
        out.update({g.id: (np.asarray(scores[g.id], dtype=np.float64) - mu) / sd for g in mine})
    return out


def _select(group, s, frac: float, round_to: int, gqa: str) -> list:
    """The lowest-scored ``frac`` of a group's units, legal for its kind (never all of them)."""
    n = group.num_units
    if group.gqa:
        kv, rep = group.gqa
        if gqa == "kv":
            k = min(int(round(frac * kv)), kv - 1)
            per_kv = s.reshape(kv, rep).sum(1)
            return [g * rep + r for g in np.argsort(per_kv, kind="stable")[:k] for r in range(rep)]
        c = min(int(round(frac * rep)), rep - 1)
        return [g * rep + int(r) for g in range(kv) for r in np.argsort(s[g * rep:(g + 1) * rep], kind="stable")[:c]]
    k = min(int(round(frac * n)), n - 1)
    if group.kind not in ("attention", "experts") and round_to > 1 and n % round_to == 0:
        keep = n - k
        keep = max(round_to, -(-keep // round_to) * round_to)
        k = n - keep
    return np.argsort(s, kind="stable")[:group.legal_count(k)].tolist()


def check_ratio(ratio) -> None:
    if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise PlanError(f"ratio must be in [0, 1), got {ratio!r}")


# -- validation: one function, used by every entry point (from_json, mask, shrink, viz) ---------------------------


def check_plan(plan: "Plan", graph=None) -> "Plan":
    """Raise :class:`PlanError` naming the group unless ``plan`` is legal; returns ``plan``.

    Always: one entry per group; units unique integers in range, never all of a group (no emptied layer); the GQA
    rule; ``heads_after``/``kv_after`` agreeing with the units; every removed index an integer, unique and inside the
    recorded shape of its parameter. With ``graph``: the plan was made for this graph (group ids, kinds, sizes,
    shapes) and its removed indices are exactly the ones the group's units map to.
    """
    if not isinstance(plan.entries, list) or not isinstance(plan.shapes, dict):
        raise PlanError("not a depgraph plan: entries must be a list and shapes a mapping")
    seen = set()
    for e in plan.entries:
        if e.group in seen:
            raise PlanError(f"plan group {e.group}: listed twice")
        seen.add(e.group)
        group = _entry_group(e)
        units = _check_units(e, group)
        _check_removed(e, plan.shapes)
        if e.attention is not None:
            _check_attention(e, group, units)
        if graph is not None:
            _check_against_graph(e, graph, units)
    if graph is not None:
        for p, shape in plan.shapes.items():
            if p not in graph.shapes:
                raise PlanError(f"the plan removes channels of {p}, which this model does not have: a plan of "
                                f"another model?")
            if list(graph.shapes[p]) != list(shape):
                raise PlanError(f"the plan was made for {p} of shape {list(shape)}, this model's is "
                                f"{list(graph.shapes[p])}: a plan of another model (or of an earlier prune step)?")
    return plan


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _entry_group(e: PlanEntry):
    """A member-less :class:`Group` with the entry's sizes, so the unit rules (range, emptied, GQA) are the
    groups' own."""
    from .groups import Group

    if not _is_int(e.num_units) or e.num_units < 1:
        raise PlanError(f"plan group {e.group}: num_units must be a positive integer, got {e.num_units!r}")
    gqa = None
    a = e.attention
    if a is not None:
        if not isinstance(a, dict) or not all(_is_int(a.get(k)) for k in ("heads_before", "heads_after",
                                                                              "kv_before", "kv_after")):
            raise PlanError(f"plan group {e.group}: attention record needs integer heads_before/after and "
                            f"kv_before/after")
        kv, heads = a["kv_before"], a["heads_before"]
        if heads != e.num_units or kv < 1 or heads % kv:
            raise PlanError(f"plan group {e.group}: heads_before {heads} / kv_before {kv} do not fit "
                            f"num_units {e.num_units}")
        gqa = (kv, heads // kv) if kv < heads else None
    return Group(e.group, e.kind, e.layer, e.num_units, 0, [], e.exact, gqa=gqa, block=e.block)


def _check_units(e: PlanEntry, group) -> list:
    units = e.units
    if not isinstance(units, list) or not all(_is_int(u) for u in units):
        raise PlanError(f"plan group {e.group}: units must be a list of integers")
    if len(set(units)) != len(units):
        dup = sorted({u for u in units if units.count(u) > 1})
        raise PlanError(f"plan group {e.group}: units listed more than once: {dup}")
    if not units:
        raise PlanError(f"plan group {e.group}: removes no units")
    return group.validate(units)


def _check_removed(e: PlanEntry, shapes: dict) -> None:
    if not isinstance(e.removed, dict) or (not e.removed and e.block is None):
        raise PlanError(f"plan group {e.group}: no removed parameter indices")
    for p, dims in e.removed.items():
        if p not in shapes:
            raise PlanError(f"plan group {e.group}: removes channels of {p}, which the plan's shapes do not list")
        shape = shapes[p]
        for d, idx in dims.items():
            if not _is_int(d) or not 0 <= d < len(shape):
                raise PlanError(f"plan group {e.group}: {p} has no dim {d} (shape {list(shape)})")
            if not isinstance(idx, list) or not all(_is_int(i) for i in idx):
                raise PlanError(f"plan group {e.group}: indices of {p} dim {d} must be a list of integers")
            bad = [i for i in idx if not 0 <= i < shape[d]]
            if bad:
                raise PlanError(f"plan group {e.group}: indices of {p} dim {d} out of range 0..{shape[d] - 1}: "
                                f"{bad[:5]}")
            if len(set(idx)) != len(idx):
                raise PlanError(f"plan group {e.group}: indices of {p} dim {d} listed more than once")
            if len(idx) >= shape[d] and e.block is None:  # a removed block zeroes whole tensors it writes
                raise PlanError(f"plan group {e.group}: removes every index of {p} dim {d}")


def _check_attention(e: PlanEntry, group, units: list) -> None:
    a = e.attention
    kv_after = a["kv_before"] - len(group.removed_kv(units)) if group.gqa else a["kv_before"] - len(units)
    if a["heads_after"] != e.num_units - len(units) or a["kv_after"] != kv_after:
        raise PlanError(f"plan group {e.group}: heads_after {a['heads_after']} / kv_after {a['kv_after']} contradict "
                        f"the {len(units)} removed units (expected {e.num_units - len(units)} / {kv_after})")


def _check_against_graph(e: PlanEntry, graph, units: list) -> None:
    g = graph.group(e.group)
    if (g.kind, g.layer, g.num_units) != (e.kind, e.layer, e.num_units) or \
            (e.attention is not None and _entry_group(e).gqa != g.gqa):
        raise PlanError(f"plan group {e.group}: made for a {e.kind} group of {e.num_units} units in layer {e.layer}, "
                        f"this model's is a {g.kind} group of {g.num_units} in layer {g.layer} (gqa {g.gqa})")
    if e.block is not None:
        return  # a block's one unit removes it whole (depgraph.depth checks the block itself)
    want = {}
    for (param, dim), idx in g.removed_indices(units).items():
        want.setdefault(param, {})[dim] = [int(i) for i in idx]
    got = {p: {d: sorted(idx) for d, idx in dims.items()} for p, dims in e.removed.items()}
    if got != want:
        raise PlanError(f"plan group {e.group}: its removed parameter indices are not the ones its units "
                        f"{units[:8]}{'...' if len(units) > 8 else ''} map to in this model")


# -- what a target can ask for: checked right after the trace, before any scoring ----------------------------------


def check_round_to(round_to) -> None:
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise PlanError(f"round_to must be a positive integer (1: no rounding), got {round_to!r}")


def _layers_text(layers) -> str:
    if layers is None:
        return "all layers"
    layers = sorted(layers)
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"layers {layers[0]}..{layers[-1]}"
    return f"layers {layers}"


def select_groups(graph, kinds, layers=None) -> list:
    """The groups of ``kinds`` in ``layers`` (None: all); raises :class:`PlanError` for an empty selection, layers
    the model does not have, or nothing to prune there."""
    present = sorted({g.layer for g in graph.groups() if g.layer is not None})
    if layers is not None:
        layers = sorted(set(layers))
        if not layers:
            raise PlanError("no layers selected (an empty layer range)")
        missing = [x for x in layers if x not in present]
        if missing:
            have = f"{present[0]}..{present[-1]}" if present else "none"
            raise PlanError(f"layers {missing[:8]}{' ...' if len(missing) > 8 else ''} are not in the model "
                            f"(its layers: {have})")
    chosen = [g for g in graph.groups(kinds) if layers is None or g.layer in layers]
    if not chosen:
        raise PlanError(f"nothing to prune: no prunable groups of kinds {tuple(kinds or ())} in "
                        f"{_layers_text(layers)}")
    return chosen


def most_removable(graph, kinds, layers=None, round_to: int = 8, gqa: str = "heads") -> "Plan":
    """The plan that leaves every selected group at its minimum legal width: the most any target can remove."""
    check_round_to(round_to)
    groups = select_groups(graph, kinds, layers)
    return Plan.from_units(graph, {g.id: _select(g, np.zeros(g.num_units), 1.0, round_to, gqa) for g in groups})


def check_target(graph, target: float, kinds, layers=None, round_to: int = 8, gqa: str = "heads",
                 target_of: str = "all") -> None:
    """Raise :class:`PlanError` with the largest reachable fraction (of the parameters ``target_of`` names) when
    ``target`` cannot be met."""
    check_ratio(target)
    budget = Budget.of(graph, target_of)
    _check_reachable(most_removable(graph, kinds, layers, round_to, gqa), budget, target, kinds, layers)


def _check_reachable(most: "Plan", budget: "Budget", target: float, kinds, layers) -> None:
    reachable = budget.fraction(most)
    if reachable < target:
        units = "" if budget.target_of == "all" else f" (of the {budget.target_of} parameters)"
        raise PlanError(f"target {target:g}{units} cannot be met: at most {reachable:.4f} ({100 * reachable:.1f}%) of "
                        f"the {budget.name} can be removed with kinds {tuple(kinds)} in {_layers_text(layers)}, every "
                        f"group at its minimum width; lower the target or prune more kinds/layers{budget.hint()}")


# -- what a parameter target is a fraction of ------------------------------------------------------------------------
TARGET_OF = ("all", "non-embedding")


def check_target_of(target_of) -> None:
    if target_of not in TARGET_OF:
        raise PlanError(f"target_of must be one of {', '.join(map(repr, TARGET_OF))}, got {target_of!r}")


@dataclass(frozen=True)
class Budget:
    """The parameters a target is a fraction of: ``total`` of them, the removals of ``skip`` (parameter names) not
    counted. ``"all"``: every parameter; ``"non-embedding"``: all but ``graph.embedding_params`` (the tables an
    embedding op reads and the output head, tied or not)."""

    target_of: str
    total: int
    skip: frozenset = frozenset()
    embedding: int = 0  # the graph's embedding parameters (for the hint in a refusal)
    every: int = 0  # all of the graph's parameters

    @classmethod
    def of(cls, graph, target_of: str = "all") -> "Budget":
        check_target_of(target_of)
        emb, every = graph.num_embedding_params, graph.num_params
        if target_of == "all":
            return cls(target_of, every, frozenset(), emb, every)
        return cls(target_of, every - emb, frozenset(graph.embedding_params), emb, every)

    @property
    def name(self) -> str:
        return "parameters" if self.target_of == "all" else f"{self.target_of} parameters"

    def fraction(self, plan: "Plan") -> float:
        """The part of :attr:`total` that ``plan`` removes."""
        return plan.params_removed(self.skip) / self.total

    def hint(self) -> str:
        """For a target of all parameters on a model whose embeddings are a large part of it: the other unit."""
        if self.target_of != "all" or not self.every or self.embedding < 0.25 * self.every:
            return ""
        return (f" (the embedding tables are {100 * self.embedding / self.every:.0f}% of the parameters: "
                f"target_of='non-embedding', CLI --target-of non-embedding, reads the target as a fraction of the "
                f"rest)")
