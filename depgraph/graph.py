"""DependencyGraph: the coupled channel spaces of a model, as groups and as a networkx graph."""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from functools import cached_property
from math import prod

import numpy as np
import torch

from .capture import Capture, capture
from .dimflow import DimFlow, propagate
from .evidence import observe
from .fills import prove as prove_fills
from .indices import prove as prove_indices
from .groups import Group, Member
from .layout import Prod, Space
from .reads import Reads, follows_call
from .sizes import SizeSpaces
from .rules import op_name
from .rules.moe import GROUPED_MM_ALIGN

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_KIND_ORDER = {"hidden": 0, "channels": 1, "attention": 2, "mlp": 3, "experts": 4}
_SOFTMAX = ("softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax")


def _owned(attr: str, attention_module) -> bool:
    from .shrink import ATTENTION_ATTRIBUTES

    path, _, name = attr.rpartition(":")
    return attention_module is not None and path == attention_module and name in ATTENTION_ATTRIBUTES


def unowned_literals(lits, attention_module, stale=frozenset(), width=()) -> list:
    """Reasons for literal sizes no shrink rewrite follows: only an attention group's own module
    attributes (``num_heads``, ``split_size``, ...) are rewritten, and the width attributes of the modules ``width``
    (a residual group's ``width_modules``); any other attribute stays stale, and so does a literal that also equals
    an attribute the forward was seen to read (``stale``)."""
    out = []
    for lit in lits:
        owned = lit.proved and (not lit.counted or attention_module == lit.module) or lit.held or \
            lit.width and lit.module in width or \
            lit.passed and lit.module == attention_module or \
            any(_owned(a, attention_module) for a in lit.attributes) and not any(a in stale for a in lit.attributes)
        if owned and lit.unread:
            reason = f"{lit}: read off a tensor's shape, not the attribute (it did not follow the attribute)"
            if reason not in out:
                out.append(reason)
        elif not owned:
            reason = f"{lit}: not an attribute shrink rewrites"
            if reason not in out:
                out.append(reason)
    return out


def stale_attributes(model, flow, store) -> dict:
    """{leaf space: reasons} for parameter dims whose size a module also keeps in an int attribute that
    no fixer rewrites (e.g. a norm's ``dim_norm``): after a shrink that attribute would be stale."""
    from .shrink import held_attributes

    out: dict = {}
    if model is None:
        return out
    for path, mod in model.named_modules():
        own = {n: p for n, p in mod._parameters.items() if p is not None}
        if not own:
            continue
        fixed = held_attributes(mod)
        attrs = {a: v for a, v in vars(mod).items() if isinstance(v, int) and not isinstance(v, bool)
                 and v > 1 and a not in fixed}
        for pname, p in own.items():
            name = f"{path}.{pname}" if path else pname
            lays = flow.param_layouts.get(name)
            if lays is None:
                continue
            for d, n in enumerate(p.shape):
                for a, v in attrs.items():
                    if v == n and lays[d] is not None:
                        why = f"{path or type(mod).__name__}.{a} = {v} sizes {name}[{d}] and shrink does not rewrite it"
                        for leaf in store.leaves(lays[d]):
                            out.setdefault(leaf, []).append(why)
    return out


def read_off_sizes(flow, store) -> dict:
    """{leaf space: reasons} for the spaces a merge's literal size may have been read off: a merge whose size was
    not the attribute it equals (``reshape(b, t, embed_dim)`` with ``b, t, embed_dim = x.size()``) keeps that
    size when the input's space is pruned, so each input dim of that size (its ``witnesses``) is blocked."""
    out: dict = {}
    for lit in flow.literals or ():
        if lit.strict or not lit.unread:
            continue
        mine = set(store.leaves(lit.layout))
        why = f"its size may be read off a tensor's shape by the {lit} (a merge no rewritten attribute sizes)"
        for lay in lit.witnesses:
            for leaf in set(store.leaves(lay)) - mine:
                if why not in out.setdefault(leaf, []):
                    out[leaf].append(why)
    return out


def _width_modules(moe_modules, params) -> list:
    """The routers and expert blocks among ``moe_modules`` holding one of ``params`` (a space's members)."""
    owners = {p.rpartition(".")[0] for p in params}
    return [p for p in moe_modules if any(o == p or o.startswith(p + ".") for o in owners)]


def layer_of(name: str):
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


class DependencyGraph:
    """Built by :func:`depgraph.trace`. ``groups()`` lists what can be pruned; ``blocked`` what cannot
    and why; ``unsupported`` the ops without a rule that touched a channel space."""

    def __init__(self, cap: Capture, flow: DimFlow, model_name: str):
        self.model_name = model_name
        self.shapes = dict(cap.shapes)
        self.aliases = dict(cap.aliases)
        self.unsupported = list(flow.unsupported)
        self.notes = list(flow.notes)
        self._flow = flow
        self._module = cap.module
        self._cap = cap
        self._pos_cache: dict = {}
        self._groups, self.blocked = self._build()

    # -- construction ----------------------------------------------------------------------
    def _positions(self, key):
        if key not in self._pos_cache:
            name, d = key
            self._pos_cache[key] = self._flow.store.positions(self._flow.param_layouts[name][d])
        return self._pos_cache[key]

    def _build(self):
        store = self._flow.store
        users = defaultdict(list)  # leaf space -> [(param, dim)]
        for name, lays in self._flow.param_layouts.items():
            for d, lay in enumerate(lays):
                for leaf in dict.fromkeys(store.leaves(lay)):
                    users[leaf].append((name, d))

        literals = defaultdict(list)  # leaf space -> LiteralSize records sizing it
        for lit in self._flow.literals or ():
            for leaf in dict.fromkeys(store.leaves(lit.layout)):
                literals[leaf].append(lit)
        stale = stale_attributes(self._module, self._flow, store)
        read_off = read_off_sizes(self._flow, store)
        groups, taken, blocked = [], set(), {}
        language_model = bool(self._flow.attention) or _looks_up_tokens(self._cap)
        for classes, gqa, sites, reasons in self._head_sets():
            taken.update(classes)
            stale_attrs = self._flow.stale or frozenset()
            for lit in [lit for c in classes for lit in literals.get(c, ())]:
                # a literal size is owned when the attributes of one of the modules rewritten hold it
                unowned = [unowned_literals([lit], site.module, stale_attrs) for site in sites]
                if all(unowned):
                    reasons = reasons + [r for r in unowned[0] if r not in reasons]
            reasons = reasons + [r for c in classes for r in read_off.get(c, ()) if r not in reasons]
            if reasons:
                self._record_blocked(blocked, classes, users, reasons)
                continue
            group = self._attention_group(sites[0], classes, gqa, users)
            group.modules = list(dict.fromkeys(site.module for site in sites))  # shared heads: every module
            groups.append(group)

        by_space = []  # (expert leaves, experts group)
        for site in self._flow.routing:
            leaves = set(store.leaves(site.experts))
            group = self._experts_group(site, users, taken, blocked)
            if group is not None:
                groups.append(group)
                by_space.append((leaves, group))
                continue
            for other, g in by_space:  # another top-k over the same experts (group-limited routing's top-2)
                if other == leaves:  # the plan keeps the largest k; every site's correction is masked
                    g.routing["top_k"] = max(g.routing["top_k"], site.top_k)
                    g.routing["correction"] = sorted(set(g.routing["correction"]) | set(site.correction))

        by_layer = defaultdict(list)
        for path in self._flow.moe_modules:
            by_layer[layer_of(path)].append(path)
        moe_modules = sorted({p for g in groups if g.routing for p in g.routing["modules"]}
                             | {p for paths in by_layer.values() for p in _module_chain(paths)})
        aligned = {c for lay in self._flow.aligned for c in store.leaves(lay)}
        for leaf, members in users.items():
            if leaf in taken or leaf.size < 2:
                continue
            taken.add(leaf)
            reasons = list(leaf.blocked)
            if leaf.broadcast and not reasons:
                reasons = ["expanded by aten.expand: its size is fixed in the model code"]
            lits = literals.get(leaf, ())
            width = _width_modules(moe_modules, (name for name, _ in members))
            reasons += unowned_literals(lits, None, width=width) + stale.get(leaf, []) + read_off.get(leaf, [])
            if reasons:
                self._record_blocked(blocked, (leaf,), users, reasons)
                continue
            group = self._channel_group(leaf, members, language_model)
            if group.kind == "mlp" and not group.exact:  # e.g. an MLA latent under its RMSNorm: refuse, not approximate
                self._record_blocked(blocked, (leaf,), users, [f"normalised inside layer {group.layer}, so removing "
                                                               f"a channel is not zeroing it"] + list(leaf.inexact))
                continue
            if group.kind in ("hidden", "channels") and group.layer is None:  # routers and expert blocks keep the
                group.width_modules = width  # residual width as an attribute (reshape(-1, hidden)): rewritten
            elif unowned_literals(lits, None):  # a width attribute follows only a residual group's shrink
                self._record_blocked(blocked, (leaf,), users, unowned_literals(lits, None))
                continue
            groups.append(group)
            if leaf in aligned:  # fused expert weights multiplied by grouped_mm
                group.align = GROUPED_MM_ALIGN

        # stable, readable ids
        groups.sort(key=lambda g: (g.layer is not None, g.layer or 0, _KIND_ORDER.get(g.kind, 9)))
        used: set = set()
        for g in groups:  # "mlp.3", then "mlp.3.1", ...; never an id another group already has
            base = g.kind if g.layer is None else f"{g.kind}.{g.layer}"
            g.id, k = base, 0
            while g.id in used:
                k += 1
                g.id = f"{base}.{k}"
            used.add(g.id)
        return groups, list(blocked.values())

    def _head_sets(self):
        """[(head spaces, gqa, attention sites, reasons it is blocked)]: sites whose heads share a space are
        one set (heads coupled across layers by a shared bias); a set is blocked unless every site in it has
        the same head structure, a space (kv x q_per_kv for GQA) the attention rules can express."""
        store = self._flow.store
        sets = []  # [classes tuple, gqa, sites, reasons]
        for site in self._flow.attention:
            heads = store.expand(site.heads)
            reasons = []
            if isinstance(heads, Space):  # one kv head: every query head reads the same keys and values
                classes, gqa = (heads,), ((1, heads.size) if site.num_kv_heads == 1 and heads.size > 1 else None)
            elif isinstance(heads, Prod) and len(heads.parts) == 2 and all(isinstance(p, Space) for p in heads.parts) \
                    and heads.parts[1].broadcast:
                classes, gqa = heads.parts, (heads.parts[0].size, heads.parts[1].size)
            else:
                classes, gqa = tuple(dict.fromkeys(store.leaves(heads))), None
                reasons = [f"attention heads of {site.module or '<root>'} have a layout the attention rules cannot "
                           f"express: {store.describe(heads)}"]
            same = [e for e in sets if set(e[0]) & set(classes)]
            for e in same:
                sets.remove(e)
            merged = [classes, gqa, [site], reasons + [r for c in classes for r in c.blocked]]
            for e in same:
                if tuple(e[0]) != tuple(classes):
                    merged[3].append(f"attention sites {e[2][0].module} and {site.module} share heads with "
                                     f"different structures")
                    merged[0] = tuple(dict.fromkeys(list(e[0]) + list(merged[0])))
                merged[2] = e[2] + merged[2]
                merged[3] = e[3] + merged[3]
            sets.append(merged)
        return [(tuple(c), g, sites, list(dict.fromkeys(r))) for c, g, sites, r in sets]

    def _record_blocked(self, blocked, classes, users, reasons):
        params = sorted({f"{p}[{d}]" for c in classes for p, d in users.get(c, [])})
        if params:
            key = tuple(c.id for c in classes)
            blocked[key] = {"params": params, "size": prod(c.size for c in classes), "reasons": reasons[:3]}

    def _member(self, name, d, uoi, level):
        return Member(name, d, uoi, level, self._flow.store.describe(self._flow.param_layouts[name][d]),
                      prod(self.shapes[name]))

    def _attention_group(self, site, classes, gqa, users):
        members = []
        keys = dict.fromkeys(k for c in classes for k in users.get(c, []))
        for name, d in keys:
            pos = self._positions((name, d))
            if len(classes) == 2:
                pk, pr = pos.get(classes[0]), pos.get(classes[1])
                if pk is not None and pr is not None:
                    uoi = np.where((pk >= 0) & (pr >= 0), pk * gqa[1] + pr, -1)
                    members.append(self._member(name, d, uoi, "unit"))
                elif pk is not None:
                    members.append(self._member(name, d, pk, "kv"))
            else:
                members.append(self._member(name, d, pos[classes[0]], "unit"))
        inexact = [r for c in classes for r in c.inexact]
        layers = {layer_of(m.param) for m in members}
        layer = layers.pop() if len(layers) == 1 else None
        return Group("", "attention", layer, site.num_heads, site.head_dim, members, not inexact, inexact,
                     gqa if gqa and gqa[1] > 1 else None, site.module, site.head_dim, [site.module])

    def _experts_group(self, site, users, taken, blocked):
        """Whole routed experts of one routing site (rules.moe), or None with the expert dim recorded as
        blocked: the router rows never form a group on their own."""
        store = self._flow.store
        experts = store.expand(site.experts)
        leaves = tuple(dict.fromkeys(store.leaves(experts)))
        if not leaves or any(c in taken for c in leaves):
            return None
        taken.update(leaves)
        reasons = [r for c in leaves for r in c.blocked if r != site.reason]
        if not isinstance(experts, Space):
            reasons = reasons or [f"expert dim of the router at {site.module} is split or cut by the model code"]
        if reasons:
            self._record_blocked(blocked, leaves, users, reasons)
            return None
        allowed = tuple(f"({op} at {where or '<root>'})" for op, where in site.chain + site.exact_over
                        if op in _SOFTMAX)
        inexact = [r for r in experts.inexact if not r.endswith(allowed)] if allowed else list(experts.inexact)
        members = [self._member(name, d, self._positions((name, d))[experts], "unit")
                   for name, d in users.get(experts, [])]
        layers = {layer_of(m.param) for m in members}
        layer = layers.pop() if len(layers) == 1 else None
        routing = {"top_k": site.top_k, "router": list(site.router), "router_module": site.router_module,
                   "correction": list(site.correction),
                   "modules": _module_chain([m.param.rpartition(".")[0] for m in members]
                                            + [site.router_module, site.module])}
        return Group("", "experts", layer, experts.size, 1, members, not inexact, inexact, module=site.module,
                     routing=routing)

    def _channel_group(self, leaf, members, language_model):
        """A channel space's group: ``hidden`` (across layers) or ``mlp`` (inside one) in a language model,
        ``channels`` in any other network (a CNN)."""
        ms = [self._member(name, d, self._positions((name, d))[leaf], "unit") for name, d in members]
        layers = {layer_of(m.param) for m in ms}
        layer = layers.pop() if len(layers) == 1 else None
        if not language_model:
            kind = "channels"
        else:
            kind = "mlp" if layer is not None else "hidden"
        return Group("", kind, layer, leaf.size, 1, ms, not leaf.inexact, list(leaf.inexact))

    # -- public view ------------------------------------------------------------------------
    @cached_property
    def _blocks(self):
        from .blocks import find_blocks

        return find_blocks(self._cap, self._flow, self.shapes)

    @property
    def blocked_blocks(self) -> list:
        """Residual branches and layers that cannot be removed exactly: ``{block, module, reasons}``."""
        return self._blocks[1]

    def groups(self, kinds=None) -> list:
        """Prunable groups, optionally only those of the given kinds. ``block`` groups (residual branches and
        whole layers, depgraph.blocks) are found on first request and listed only when asked for by kind."""
        if kinds is None:
            return list(self._groups)
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        out = [g for g in self._groups if g.kind in kinds]
        return out + (list(self._blocks[0]) if "block" in kinds else [])

    def group(self, gid: str) -> Group:
        for g in self._groups + (self._blocks[0] if gid.startswith("block") else []):
            if g.id == gid:
                return g
        from .errors import PlanError
        raise PlanError(f"unknown group {gid!r}; the graph has {', '.join(g.id for g in self._groups[:6])}, ...")

    def param_names(self) -> list:
        """Names of the traced parameters (no buffers), in model order."""
        return [n for n in self.shapes if n in self._flow.param_layouts and n not in self._flow.buffer_names]

    @property
    def num_params(self) -> int:
        return sum(prod(self.shapes[n]) for n in self.param_names())

    @cached_property
    def embedding_params(self) -> tuple:
        """Canonical names of the embedding parameters, the ones "non-embedding parameters" (Kaplan et al.'s N,
        Minitron's budgets) leave out: every table an ``embedding`` op of the graph looks rows up in (token, position
        and token-type tables), and the parameters of the output head (``get_output_embeddings()``: the tied token
        table again, or an untied ``lm_head`` with its bias)."""
        names = [self._cap.params[n.args[0].name] for n in self._cap.graph.nodes
                 if n.op == "call_function" and op_name(n.target) == "embedding" and len(n.args) > 0
                 and getattr(n.args[0], "name", None) in self._cap.params]
        getter = getattr(self._module, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        if isinstance(head, torch.nn.Module):
            canonical = {a: c for c, names_ in self.aliases.items() for a in names_}
            path = next((p for p, m in self._module.named_modules() if m is head), None)
            if path is not None:
                names += [canonical.get(f"{path}.{n}" if path else n, f"{path}.{n}" if path else n)
                          for n, _ in head.named_parameters()]
        known = set(self.param_names())
        return tuple(n for n in dict.fromkeys(names) if n in known)

    @property
    def num_embedding_params(self) -> int:
        return sum(prod(self.shapes[n]) for n in self.embedding_params)

    @cached_property
    def nx(self):
        """networkx view: parameter-dim nodes and group nodes; edges carry the dim's index map."""
        import networkx as nx

        g = nx.Graph()
        for grp in self._groups:
            g.add_node(grp.id, type="group", kind=grp.kind, layer=grp.layer, units=grp.num_units, exact=grp.exact)
            for m in grp.members:
                node = f"{m.param}[{m.dim}]"
                g.add_node(node, type="param_dim", param=m.param, dim=m.dim, size=len(m.unit_of_index))
                g.add_edge(grp.id, node, layout=m.layout, level=m.level)
        for b in self.blocked:
            for p in b["params"]:
                g.add_node(p, type="param_dim")
                g.nodes[p].setdefault("blocked", b["reasons"][0])
        return g

    def summary_dict(self) -> dict:
        counts = defaultdict(int)
        for g in self._groups:
            counts[g.kind] += 1
        return {
            "model": self.model_name,
            "num_params": self.num_params,
            "embedding_params": {"params": list(self.embedding_params), "count": self.num_embedding_params},
            "groups": [{"id": g.id, "kind": g.kind, "layer": g.layer, "units": g.num_units,
                        "unit_size": g.unit_size, "exact": g.exact, "gqa": g.gqa, "members": len(g.members)}
                       for g in self._groups],
            "counts": dict(counts),
            "blocked": self.blocked,
            "unsupported": [str(n) for n in self.unsupported],
        }

    def __str__(self) -> str:
        counts = defaultdict(int)
        for g in self._groups:
            counts[g.kind] += 1
        head = ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: _KIND_ORDER.get(kv[0], 9)))
        emb = self.num_embedding_params
        share = f" ({emb:,} in embeddings, {100 * emb / self.num_params:.0f}%)" if emb and self.num_params else ""
        lines = [f"DependencyGraph of {self.model_name}: {len(self._groups)} groups ({head}), "
                 f"{self.num_params:,} parameters{share}"]
        lines += ["  " + g.describe() for g in self._groups]
        if self.blocked:
            lines.append("Unprunable channel spaces:")
            for b in self.blocked[:12]:
                ps = b["params"]
                lines.append(f"  {b['size']:>6} channels of {ps[0]}{' +%d more' % (len(ps) - 1) if len(ps) > 1 else ''}:"
                             f" {b['reasons'][0]}")
            if len(self.blocked) > 12:
                lines.append(f"  ... {len(self.blocked) - 12} more")
        if self.unsupported:
            lines.append("Ops without a dimension rule (their channels are unprunable):")
            lines += [f"  {n}" for n in self.unsupported]
        return "\n".join(lines)

    __repr__ = __str__

    def collapsed(self) -> str:
        """One line per kind of group with equal sizes: ``30 x attention: 9 heads (3 kv x 3 q/kv) x 64``."""
        counts = {}
        for g in self._groups:
            key = (g.kind, g.size_text(), g.exact)
            counts[key] = counts.get(key, 0) + 1
        lines = [f"DependencyGraph of {self.model_name}: {len(self._groups)} groups, {self.num_params:,} parameters"]
        lines += [f"  {n} x {kind}: {size}{'' if exact else ' (inexact)'}" for (kind, size, exact), n in counts.items()]
        if self.blocked:
            lines.append(f"  {len(self.blocked)} unprunable channel spaces (e.g. {self.blocked[0]['reasons'][0]})")
        if self.unsupported:
            lines.append(f"  {len(self.unsupported)} ops without a dimension rule")
        return "\n".join(lines)


def _looks_up_tokens(cap: Capture) -> bool:
    """Does the model look its input up in an embedding table (a language model, with or without attention:
    a state-space stack whose attention layers a 2-layer config left out still has hidden and MLP widths)?"""
    return any(n.op == "call_function" and op_name(n.target) == "embedding" and len(n.args) > 0 and
               getattr(n.args[0], "name", None) in cap.params for n in cap.graph.nodes)


def _module_chain(paths) -> list:
    """Every module from the paths' common ancestor down to each path (the modules that may hold a count)."""
    split = [p.split(".") if p else [] for p in paths]
    common = 0
    while all(len(s) > common for s in split) and len({s[common] for s in split}) == 1:
        common += 1
    return sorted({".".join(s[:n]) for s in split for n in range(common, len(s) + 1)})


def trace(model, example_inputs=None, strict: bool = False) -> DependencyGraph:
    """Trace ``model`` (left untouched) into its dependency graph.

    ``example_inputs``: a tuple of tensors for the forward (default for HF causal LMs: token ids [2, 8]).
    ``strict``: raise :class:`UnsupportedOpError` when an op without a rule touches a channel space.
    """
    cap, seen = observe(model, example_inputs)  # one export: the graph, and what the proofs below read off it
    flow = propagate(cap, strict=strict)
    prove_fills(flow, seen.fills)
    prove_indices(flow, seen.indices)
    flow.stale = read_attributes(model, example_inputs, cap, flow, seen.reads)
    return DependencyGraph(cap, flow, type(model).__name__)


def read_attributes(model, example_inputs, cap, flow, reads_of) -> set:
    """Which attributes behind a literal size the forward really reads.

    - A split/slice size equal to both an attribute shrink rewrites (``split_size``) and one it does not
      (``embed_dim``) cannot be told apart by value: when the tagged export (below) shows every call making the op
      passed, at each of the literal's places, the rewritten one (or a size read off the space) or an unrewritten
      one itself (it is read: not owned; each place its own, a slice's bounds included: :func:`_told`), that
      settles it; else each
      such unrewritten attribute is perturbed (+1, on every module that has it) in one extra export; if the op's arguments change the forward reads it, and the literal
      is not owned (returned, as ``path:attr``); if that export fails, the literal is owned only when the tagged
      export below shows every call making the op pass a rewritten attribute at the literal's place.
    - A literal that equals the size of a tensor entering its module (``reshape(b, t, embed_dim)`` with
      ``embed_dim = x.size(-1)``, equal to ``self.embed_dim`` by value) must be seen to be the attribute it equals:
      the trace's export with the attributes of the literals' modules tagged (``reads_of(paths)``, a
      :class:`depgraph.reads.Reads`); a literal whose op's line was not passed the attribute is marked ``unread``:
      not owned, and (a merge, owned or not) its witnesses are blocked, since pruning them would change the size
      the model code reads off them. A merge that the same export, with the sizes tensors report tagged, shows to
      be the product of its own input's dims, or of tensor dims in exactly the spaces it sizes
      (:mod:`depgraph.sizes`), follows them (``proved``).
    - Every other merge, kept dim, split size or slice bound (or size kept by ``new_empty``) of a parameter's space,
      equal to an attribute or not, is confirmed the same way (a split size or slice bound against the layout it
      sizes: ``h.split(h.size(-1) // 2, -1)`` over gate ++ up); a literal the reads do not prove is not owned and
      blocks its space; one its module's fixer rewrites from a parameter dim of that very space is ``held``."""
    from .shrink import WIDTH_ATTRIBUTES

    ambiguous: dict = {}  # attr name -> literals to test against an unrewritten attribute
    confirm = []  # literals whose owning attribute must be seen to be read
    param_leaves = _parameter_leaves(flow)
    counted = [lit for lit in flow.literals or () if lit.strict and not lit.attributes and
               _fixed_slots(flow.store, lit.layout)]
    slotted = {id(lit) for lit in counted}
    for lit in flow.literals or ():
        owned = [a for a in lit.attributes if _owned(a, lit.module)]
        if lit.strict and owned:
            for a in lit.attributes:
                if not _owned(a, lit.module):
                    ambiguous.setdefault(a.rpartition(":")[2], []).append(lit)
        if lit.witnesses and (owned or not lit.strict):  # owned or not, a merge may be read off its witnesses
            confirm.append(lit)
        elif id(lit) not in slotted and param_leaves.intersection(flow.store.leaves(lit.layout)):
            confirm.append(lit)  # proved below (read off its spaces, or a rewritten attribute), or it blocks
    nodes = _top_level_nodes(cap)
    stale, failed = set(), []
    spaces = SizeSpaces(flow, nodes, cap.module)

    def follows(lit, reads, accept=None):
        """Sizes read off the spaces they size (no ``accept``), or attributes ``accept`` takes as well."""
        node = nodes.get(lit.node)
        return node is not None and follows_call(reads, node, lit.value, accept or (lambda name: False),
                                                 _repeated(flow, node) if accept else None, spaces,
                                                 lit.layout if lit.strict else None, lit.at)

    def reads_for(paths):  # the export with the attributes of ``paths`` and the sizes tensors report tagged
        return (reads_of(paths) or Reads()) if paths else Reads()
    base = {lit.module for lit in confirm} | {lit.module for lit in counted}
    early = reads_for(base | {lit.module for lits in ambiguous.values() for lit in lits}) if ambiguous else None
    # the slices the tagged export saw, asked only here: every call on a slice's line, with its bounds' tags
    sliced = Reads(early.lines, {k: early.calls.get(k, []) + early.slices.get(k, [])
                                 for k in set(early.calls) | set(early.slices)}) if early is not None else None
    told = _told(ambiguous, lambda lit, accept: follows(lit, sliced, accept))
    for lit, read in told.values():  # the unrewritten attributes some call passed itself there: the forward reads them
        stale.update(a for a in lit.attributes if a.rpartition(":")[2] in read)
    for name, lits in ambiguous.items():
        lits = [lit for lit in lits if id(lit) not in told]
        if not lits:
            continue

        def perturb(twin, name=name):
            for mod in twin.modules():
                if isinstance(vars(mod).get(name), int):
                    setattr(mod, name, vars(mod)[name] + 1)
        quiet = logging.getLogger("torch._subclasses.fake_tensor")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # the perturbed export may fail by design; torch logs that loudly
        try:
            other = {n.name: n for n in capture(model, example_inputs, prepare=perturb).graph.nodes}
        except Exception:  # noqa: BLE001 - a forward that breaks when the attribute changes reads it
            other = {}
        finally:
            quiet.setLevel(level)
        for lit in lits:
            n = other.get(lit.node)
            if not other:  # the perturbed forward broke (StableLM's rotary_ndims sizes its RoPE): no answer
                failed.append((name, lit))
            elif n is None or lit.node not in nodes or repr(n.args) != repr(nodes[lit.node].args):
                stale.update(a for a in lit.attributes if a.rpartition(":")[2] == name)
    reads = reads_for(base | {lit.module for _, lit in failed})  # every literal below is answered by it

    def prove(lit):  # an attribute proof holds only for the attention group of the module whose attribute it is
        lit.proved = follows(lit, reads)
        lit.passed = not lit.proved and follows(lit, reads, _owns(lit))
    for lit in counted:  # ``view(b, t, self.num_heads + 2, d)`` over (heads ++ 2 blocked slots)
        lit.counted = lit.proved = follows(lit, reads, _counts_plus(lit, _fixed_slots(flow.store, lit.layout)))
    for name, lit in failed:  # settled when every call making the op passed a rewritten attribute there
        prove(lit)
        if not (lit.proved or lit.passed):
            stale.update(a for a in lit.attributes if a.rpartition(":")[2] == name)
    for lit in confirm:
        accept = _accepts(lit)
        seen = any(v == lit.value and accept(name) for name, v in reads.get(lit.source, ()))
        prove(lit)
        lit.held = not (lit.proved or lit.passed) and any(follows(lit, reads, lambda n, a=a: n == a)
                                                          for a in _fixed_by(lit, cap.module, flow))
        widths = {a.rpartition(":")[2] for a in lit.attributes if a.rpartition(":")[0] == lit.module} & \
            set(WIDTH_ATTRIBUTES)  # owned if its module is among its residual group's width_modules
        whole = flow.store.expand(lit.layout)  # one whole space: the width shrink sets is its units after
        lit.width = not (lit.proved or lit.passed or lit.held) and bool(widths) and isinstance(whole, Space) and \
            whole.size == lit.value and follows(lit, reads, lambda n: n in widths)
        lit.unread = not (lit.proved or lit.passed or lit.held or lit.width or seen or follows(lit, reads, accept))
    return stale


def _told(ambiguous: dict, follows) -> dict:
    """{id(literal): (literal, the unrewritten attributes read there)} for the ambiguous literals (``ambiguous``: {unrewritten
    attribute name: literals}) the tagged export settles: every call making the op passed, at each place the literal
    holds, a rewritten attribute, sizes read off the space, or one of the literal's unrewritten attributes itself
    (each place its own: ``split([self.qk_nope_head_dim, self.v_head_dim])``). An attribute passed there is read
    (what a perturbed export would show); one no call passed cannot be the literal. ``follows(lit, accept)``: the
    tagged export's answer (:func:`depgraph.reads.follows_call`)."""
    names: dict = {}
    for name, lits in ambiguous.items():
        for lit in lits:
            names.setdefault(id(lit), (lit, set()))[1].add(name)
    out = {}
    for key, (lit, mine) in names.items():
        owns, read = _owns(lit), set()

        def accept(n, mine=mine, owns=owns, read=read):
            if n in mine:
                read.add(n)
                return True
            return owns(n)
        if follows(lit, None) or follows(lit, accept):  # every place was asked: ``read`` is all they passed
            out[key] = (lit, read)
    return out


def _fixed_by(lit, root, flow) -> list:
    """The attributes ``lit`` equals on its own module that the module's fixer rewrites from a parameter dim whose
    layout is the literal's (``Conv1D``'s ``view(size_out)`` with ``size_out[-1] = self.nf``): they follow it."""
    from .shrink import fixer_dims

    try:
        dims = fixer_dims(root.get_submodule(lit.module)) if root is not None else {}
    except AttributeError:
        return []
    out = []
    for a in lit.attributes:
        path, _, name = a.rpartition(":")
        if path != lit.module or name not in dims:
            continue
        pname, d = dims[name]
        lays = flow.param_layouts.get(f"{path}.{pname}" if path else pname)
        if lays is not None and lays[d] is not None and flow.store.expand(lays[d]) == flow.store.expand(lit.layout):
            out.append(name)
    return out


def _parameter_leaves(flow) -> set:
    """The leaf spaces some parameter dim uses (only a literal sizing one of them can matter to a plan)."""
    return {leaf for lays in flow.param_layouts.values() for lay in lays if lay is not None
            for leaf in flow.store.leaves(lay)}


def _repeated(flow, node):
    """``repeated(name, d)``: whether attribute ``name`` is the query-heads-per-kv count and dim ``d`` of ``node``'s
    input a space grown by ``expand`` (``repeat_kv``'s ``n_rep``), so the attribute sizes that dim."""
    from .shrink import ATTENTION_ATTRIBUTES

    lays = flow.env.get(node.args[0]) if node.args else None

    def repeated(name, d):
        if ATTENTION_ATTRIBUTES.get(name) != "q_per_kv" or not isinstance(lays, tuple) or d >= len(lays):
            return False
        e = flow.store.expand(lays[d]) if lays[d] is not None else None
        return isinstance(e, Space) and e.broadcast
    return repeated


def _top_level_nodes(cap) -> dict:
    """{name: node} of the exported graph's own nodes, without any name a nested graph (a ``no_grad`` body) also
    uses: a literal found in a body is never matched to a namesake outside it."""
    nodes = {n.name: n for n in cap.graph.nodes}
    gm = cap.graph.owning_module
    for _, sub in (gm.named_modules() if gm is not None else ()):
        if isinstance(sub, torch.fx.GraphModule) and sub is not gm:
            for n in sub.graph.nodes:
                nodes.pop(n.name, None)
    return nodes


def _owns(lit):
    """Which tag names own ``lit`` (shrink rewrites them): its module's rewritten attributes, counts' products."""
    owned = {a.rpartition(":")[2] for a in lit.attributes if _owned(a, lit.module)}
    return lambda name: name in owned or _follows_counts(name)


def _accepts(lit):
    """Which tag names ``lit`` is seen to be: one of its module's attributes shrink rewrites, or a product following
    counts; for a literal no rewritten attribute holds, any attribute it equals (is it that attribute at all?)."""
    names = {a.rpartition(":")[2] for a in lit.attributes if _owned(a, lit.module)} or \
        {a.rpartition(":")[2] for a in lit.attributes}
    return lambda name: name in names or _follows_counts(name)


def _fixed_slots(store, layout) -> int:
    """The size of the blocked segments of a concatenation with exactly one other (prunable) segment, else 0."""
    segs = store.segments(layout) if layout is not None else []
    free = [s for s in segs if any(not leaf.blocked for leaf in store.leaves(s))]
    return sum(s.size for s in segs) - free[0].size if len(segs) > 1 and len(free) == 1 else 0


def _counts_plus(lit, slots: int):
    """Which tag names follow a dim of one head segment plus ``slots`` blocked ones: ``count+slots`` of a head
    count of the literal's own module."""
    from .shrink import ATTENTION_ATTRIBUTES

    def accept(name):
        attr, plus, extra = name.partition("+")
        return bool(plus) and extra == str(slots) and ATTENTION_ATTRIBUTES.get(attr) in ("heads", "kv") and \
            _owned(f"{lit.module}:{attr}", lit.module)
    return accept


def _follows_counts(product: str) -> bool:
    """A product of attributes (``num_heads*head_dim``) with exactly one factor shrink rewrites as a head count and
    none rewritten otherwise: it follows the heads the plan keeps."""
    from .shrink import ATTENTION_ATTRIBUTES

    factors = product.split("*")
    if any(not (f.isidentifier() or f.isdigit()) or f == "other" for f in factors):  # a size a tensor reported
        return False
    kinds = [ATTENTION_ATTRIBUTES.get(f) for f in factors]
    return len(factors) > 1 and sum(k in ("heads", "kv") for k in kinds) == 1 and \
        all(k in (None, "heads", "kv") for k in kinds)
