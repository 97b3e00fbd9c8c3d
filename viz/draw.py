"""Graphviz drawings of a :class:`depgraph.DependencyGraph`, optionally with a :class:`depgraph.Plan` on top.

Two views:

* **overview** (default): one cluster per layer holding its attention and MLP groups, the hidden group threading
  embeddings -> every layer -> final norm / head. ``collapse=True`` folds runs of identical consecutive layers
  into one cluster; ``wrap=N`` lays the layers out N per row (default: 6 per row for models deeper than 8 layers).
* **detail** (``layer=N`` or ``group="attention.3"``): parameters as nodes, one edge per coupled (group, dim)
  labelled with the dim and its index map (heads x head_dim, slices at their offsets, GQA repeat), inexact couplings
  (normalisation reductions) drawn dashed red, unprunable channel spaces as grey notes.

With a plan, group nodes show removed units ("heads 9 -> 6", "neurons 1536 -> 1232") and a kept/removed stripe;
parameter nodes show their shape before -> after.

``draw(...)`` returns a ``graphviz.Digraph``; with ``path`` it also writes the file, format from the suffix
(.svg, .png, .pdf; .dot / .gv for the source). Without the ``dot`` binary it writes the ``.dot`` source instead and
warns how to install Graphviz.
"""
from __future__ import annotations

import re
import shutil
import textwrap
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

__all__ = ["draw", "save", "COLORS", "index_map"]

# kind -> (border / text colour, fill colour)
COLORS = {
    "attention": ("#2f5d8a", "#cfe0f3"),
    "mlp": ("#b35806", "#fde0c2"),
    "hidden": ("#2e7d32", "#d5ecd1"),
    "channels": ("#7b3f8c", "#ecd9e6"),
    "experts": ("#8a6d00", "#f6ebb8"),
    "blocked": ("#777777", "#eeeeee"),
    "param": ("#444444", "#ffffff"),
}
REMOVED_FILL = "#f4c2c2"
INEXACT_COLOR = "#c62828"
_FORMATS = {".svg": "svg", ".png": "png", ".pdf": "pdf"}
_SOURCE_SUFFIXES = {".dot", ".gv"}
_INSTALL_HINT = ("Graphviz's `dot` binary is not installed; wrote the DOT source to {path}. Install Graphviz to "
                 "render it (Debian/Ubuntu: `apt-get install graphviz`, macOS: `brew install graphviz`, conda: "
                 "`conda install graphviz`), then run `dot -T{fmt} {path} -o {target}`.")


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def _load_plan(plan, graph):
    """A Plan from a Plan, its JSON text or a path, checked against ``graph`` (depgraph.plan.check_plan)."""
    from depgraph.plan import check_plan, compose, load_plans

    if plan is None:
        return None
    # an iterative run's steps become one plan on the original shapes, checked against the graph drawn
    return check_plan(compose(load_plans(plan)), graph)


def _layer_of(name: str):
    from depgraph.graph import layer_of

    return layer_of(name)


def _params(graph) -> list:
    """Parameter names (no buffers), in model order."""
    return graph.param_names()


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _short(name: str, layer) -> str:
    """Parameter name relative to its layer: 'model.layers.3.self_attn.q_proj.weight' -> 'self_attn.q_proj.weight'."""
    if layer is None:
        return name
    m = re.search(rf"(?:^|\.){layer}\.", name)
    return name[m.end():] if m else name


def _plain(text: str) -> str:
    """Escape a label for graphviz's plain-string labels (the package escapes quotes; keep backslashes literal)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _wrap(text: str, width: int = 60, lines: int = 3) -> str:
    out = textwrap.wrap(text, width)
    return "\n".join(out[:lines]) + (" ..." if len(out) > lines else "")


def index_map(member, group) -> str:
    """Short human-readable index map of one group member: ``6 heads x 8``, ``2 kv heads x 8, GQA repeat x3``,
    ``4 heads x 12, 3 slices @ 0,48,96``, ``48 ch, identity``, ``64 of 96 indices @ 32``."""
    uoi = np.asarray(member.unit_of_index)
    n = len(uoi)
    covered = uoi >= 0
    ncov = int(covered.sum())
    kv = member.level == "kv" and group.gqa
    units = group.gqa[0] if kv else group.num_units
    idx0 = np.flatnonzero(uoi == 0)  # separate runs of unit 0's indices = slices (fused qkv: 3)
    starts = [int(idx0[0])] + [int(idx0[i + 1]) for i in np.flatnonzero(np.diff(idx0) > 1)] if len(idx0) else []
    per = ncov / units / max(len(starts), 1) if units else 0
    per_s = str(int(per)) if float(per).is_integer() else f"{per:.3g}"
    if group.kind == "attention":
        text = f"{units} {'kv heads' if kv else 'heads'} x {per_s}"
    elif per == 1 and ncov == n and np.array_equal(uoi, np.arange(n)):
        text = f"{n} ch, identity"
    else:
        text = f"{units} units x {per_s}"
    if starts:
        if len(starts) > 1:
            text += f", {len(starts)} slices @ " + ",".join(str(s) for s in starts)
        elif ncov < n:
            first = int(np.flatnonzero(covered)[0])
            text += f", {ncov} of {n} @ {first}"
    if ncov and np.any(np.diff(uoi[covered]) < 0) and len(starts) <= 1:
        text += ", interleaved"
    if kv and group.gqa[1] > 1:
        text += f", GQA repeat x{group.gqa[1]}"
    return text


def _inexact_modules(group) -> dict:
    """{module: reduction} named by the group's inexact reasons, e.g. {'model.layers.0.input_layernorm': 'mean'}
    (read from the reasons' data: :class:`depgraph.layout.Reason`)."""
    out = {}
    for r in group.inexact_reasons or ():
        op, module = getattr(r, "op", None), getattr(r, "module", None)
        if op and module:
            out[module] = op
    return out


def _inexact_for(param: str, mods: dict):
    for mod, red in mods.items():
        if param == mod or param.startswith(mod + "."):
            return red
    return None


def _plan_index(plan, graph) -> dict:
    if plan is None:
        return {}
    index = {e.group: e for e in plan.entries}
    known = {g.id for g in graph.groups()}
    missing = sorted(set(index) - known)
    if missing:
        warnings.warn(f"plan groups not in this graph (ignored): {', '.join(missing[:6])}"
                      f"{' ...' if len(missing) > 6 else ''}", stacklevel=3)
    return {k: v for k, v in index.items() if k in known}


def _change_text(g, entry) -> str:
    """'heads 9 -> 6' (plus 'kv 3 -> 2' when whole kv groups go)."""
    if entry is None:
        return ""
    text = f"{g.unit_name} {entry.num_units} -> {entry.units_after}"
    att = entry.attention or {}
    if g.gqa and att.get("kv_after") is not None and att.get("kv_after") != att.get("kv_before"):
        text += f", kv {att['kv_before']} -> {att['kv_after']}"
    return text


def _group_node_attrs(g, entry, label_id=None, extra=None) -> dict:
    border, fill = COLORS.get(g.kind, COLORS["channels"])
    lines = [label_id or g.id, g.size_text(short=True)]
    attrs = {"shape": "box", "color": border, "fontcolor": "#111111", "penwidth": "1.4"}
    if entry is not None:
        lines.append(_change_text(g, entry))
        kept = entry.units_after / entry.num_units if entry.num_units else 1.0
        kept = min(max(kept, 0.01), 0.99)
        attrs.update(style="striped", fillcolor=f"{fill};{kept:.3f}:{REMOVED_FILL}")
    else:
        attrs.update(style="filled", fillcolor=fill)
    if not g.exact:
        lines.append("inexact")
        attrs["style"] += ",dashed"
    if extra:
        lines.append(extra)
    attrs["label"] = _plain("\n".join(lines))
    attrs["tooltip"] = _plain(g.describe().strip() + ("" if g.exact else " | " + "; ".join(g.inexact_reasons[:3])))
    return attrs


def _new_digraph(name: str, title: str, rankdir: str = "TB"):
    import graphviz

    dot = graphviz.Digraph(name=name)
    dot.attr(rankdir=rankdir, fontname="Helvetica", fontsize="12", label=_plain(title), labelloc="t",
             newrank="true", nodesep="0.25", ranksep="0.35")
    dot.attr("node", fontname="Helvetica", fontsize="10", margin="0.08,0.04", height="0.3")
    dot.attr("edge", fontname="Helvetica", fontsize="8", arrowsize="0.6")
    return dot


def _title(graph, plan, extra="") -> str:
    total = graph.num_params
    counts = defaultdict(int)
    for g in graph.groups():
        counts[g.kind] += 1
    kinds = ", ".join(f"{n} {k}" for k, n in counts.items())
    title = f"{graph.model_name}: {total:,} parameters, {len(graph.groups())} groups ({kinds})"
    if plan is not None:
        removed = plan.params_removed()
        title += f"\nplan removes {removed:,} parameters ({removed / total:.1%})" if total else ""
    return title + (f"\n{extra}" if extra else "")


# ----------------------------------------------------------------------------------------------------------------------
# overview
# ----------------------------------------------------------------------------------------------------------------------


def _signature(groups, plan_index):
    return tuple((g.kind, g.num_units, g.gqa, g.head_dim, g.exact, len(g.members),
                  None if g.id not in plan_index else plan_index[g.id].units_after) for g in groups)


def _overview(graph, plan, collapse: bool, wrap):
    plan_index = _plan_index(plan, graph)
    by_layer = defaultdict(list)
    top = []
    for g in graph.groups():
        (by_layer[g.layer] if g.layer is not None else top).append(g)
    layers = sorted(by_layer)

    # runs of layers: [(first, last, groups of first)]
    runs = []
    for layer in layers:
        sig = _signature(by_layer[layer], plan_index)
        if collapse and runs and runs[-1][3] == sig and runs[-1][1] == layer - 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer, by_layer[layer], sig])
    if wrap is None:
        wrap = 6 if len(runs) > 8 else 0
    dot = _new_digraph("depgraph", _title(graph, plan))

    hidden = [g for g in top if g.kind == "hidden"]
    hcolor = COLORS["hidden"][0]
    chain_attrs = {"color": hcolor, "penwidth": "2.2"}

    # embeddings and output (final norm, head) from the parameters outside any layer
    outside = [p for p in _params(graph) if _layer_of(p) is None]
    embed = [p for p in outside if re.search(r"embed|wte|wpe|tok_emb|word_emb|position_emb", p)]
    head = [p for p in outside if p not in embed]
    border, fill = COLORS["param"]
    if embed:
        dot.node("embeddings", _plain("embeddings\n" + "\n".join(f"{p} {_fmt_shape(graph.shapes[p])}" for p in embed)),
                 shape="box", style="rounded,filled", fillcolor="#f5f5f5", color=border)
    head_lines = [f"{p} {_fmt_shape(graph.shapes[p])}" for p in head]
    if embed and not any(re.search(r"head|classifier|output|cls\.", p) for p in head):
        head_lines.append("(output head tied to the embeddings)")
    dot.node("output", _plain("final norm / head\n" + "\n".join(head_lines)), shape="box", style="rounded,filled",
             fillcolor="#f5f5f5", color=border)

    for g in hidden:
        attrs = _group_node_attrs(g, plan_index.get(g.id), extra=f"threads every layer ({len(g.members)} params)")
        dot.node(g.id, **attrs)
        if embed:
            dot.edge(g.id, "embeddings", style="dashed", color=hcolor, arrowhead="none")
    others = [g for g in top if g.kind != "hidden"]
    for g in others:  # e.g. 'channels' groups outside layers (non-LLM models)
        dot.node(g.id, **_group_node_attrs(g, plan_index.get(g.id)))

    # layer clusters
    firsts, lasts = [], []
    for first, last, groups, _sig in runs:
        span = f"layer {first}" if first == last else f"layers {first}-{last} (x{last - first + 1}, identical)"
        with dot.subgraph(name=f"cluster_L{first}") as c:
            c.attr(label=span, style="rounded,filled", fillcolor="#fafafa", color="#bbbbbb", fontsize="10")
            ids = []
            for g in groups:
                label_id = g.id if first == last else re.sub(rf"\.{first}(\.|$)", rf".{first}-{last}\1", g.id)
                c.node(g.id, **_group_node_attrs(g, plan_index.get(g.id), label_id))
                ids.append(g.id)
            for a, b in zip(ids, ids[1:]):
                c.edge(a, b, **chain_attrs)
        firsts.append(ids[0])
        lasts.append(ids[-1])

    # the hidden stream: embeddings -> layer 0 -> ... -> output. Wrapped: rows of `wrap` layers, ordered by
    # invisible edges (rows stacked column by column, left to right inside a row); the chain itself does not
    # constrain the layout.
    rows = [list(range(i, min(i + wrap, len(firsts)))) for i in range(0, len(firsts), wrap)] if wrap else []
    wrapped = len(rows) > 1
    prev = "embeddings" if embed else None
    for i, (f, l) in enumerate(zip(firsts, lasts)):
        if prev is not None:
            dot.edge(prev, f, **chain_attrs, **({"constraint": "false"} if wrapped else {}))
        prev = l
    if prev is not None:
        dot.edge(prev, "output", **chain_attrs, **({"constraint": "false"} if wrapped else {}))
    if wrapped:
        for row in rows:
            with dot.subgraph() as s:
                s.attr(rank="same")
                for i in row:
                    s.node(firsts[i])
            for a, b in zip(row, row[1:]):
                dot.edge(firsts[a], firsts[b], style="invis")
        for a_row, b_row in zip(rows, rows[1:]):
            for a, b in zip(a_row, b_row):
                dot.edge(lasts[a], firsts[b], style="invis")
        for i in rows[0]:
            if embed:
                dot.edge("embeddings", firsts[i], style="invis")
        for i in rows[-1]:
            dot.edge(lasts[i], "output", style="invis")
    if graph.blocked:
        n = len(graph.blocked)
        sizes = sum(b["size"] for b in graph.blocked)
        dot.node("blocked", _plain(f"{n} unprunable channel spaces ({sizes:,} channels)\n"
                                   "e.g. " + _wrap(graph.blocked[0]['reasons'][0])),
                 shape="note", style="filled", fillcolor=COLORS["blocked"][1], color=COLORS["blocked"][0],
                 fontsize="8")
        if embed:
            dot.edge("blocked", "embeddings", style="invis")
    return dot


# ----------------------------------------------------------------------------------------------------------------------
# detail
# ----------------------------------------------------------------------------------------------------------------------


def _detail(graph, plan, layer=None, group=None):
    plan_index = _plan_index(plan, graph)
    removed = plan.removed_by_param() if plan is not None else {}
    if group is not None:
        focus = [graph.group(group)]
        params_in = {m.param for m in focus[0].members}
        context = []
        title = f"group {group}"
    else:
        focus = [g for g in graph.groups() if g.layer == layer]
        params_in = {p for p in _params(graph) if _layer_of(p) == layer}
        if not focus and not params_in:
            from depgraph.errors import PlanError

            have = sorted({g.layer for g in graph.groups() if g.layer is not None})
            raise PlanError(f"layer {layer} has no groups or parameters; layers are {have[0]}..{have[-1]}"
                            if have else f"layer {layer} not found: the graph has no numbered layers")
        # groups spanning several layers (hidden) shown with their members in this layer only
        context = [g for g in graph.groups() if g.layer != layer and any(m.param in params_in for m in g.members)]
        title = f"layer {layer}"
    dot = _new_digraph("depgraph_detail", _title(graph, plan, title), rankdir="LR")
    dot.attr(ranksep="1.2")

    def param_node(p):
        shape = graph.shapes[p]
        lines = [_short(p, layer), _fmt_shape(shape)]
        if p in removed:
            after = [n - len(removed[p].get(d, ())) for d, n in enumerate(shape)]
            lines[1] += f" -> {_fmt_shape(after)}"
        dot.node(f"p_{p}", _plain("\n".join(lines)), shape="box", style="rounded,filled",
                 fillcolor="#fff3f3" if p in removed else "#ffffff", color=COLORS["param"][0], tooltip=_plain(p))

    drawn = set()
    for g in focus + context:
        dot.node(g.id, **_group_node_attrs(g, plan_index.get(g.id)))
        border = COLORS.get(g.kind, COLORS["channels"])[0]
        mods = _inexact_modules(g)
        for m in g.members:
            if m.param not in params_in:
                continue
            if m.param not in drawn:
                param_node(m.param)
                drawn.add(m.param)
            label = f"dim {m.dim}: {index_map(m, g)}"
            attrs = {"color": border, "fontcolor": border, "tooltip": _plain(f"{m.param}[{m.dim}] = {m.layout}")}
            red = _inexact_for(m.param, mods)
            if red:
                label += f"\ninexact: {red} reduces over it"
                attrs.update(style="dashed", color=INEXACT_COLOR, fontcolor=INEXACT_COLOR, penwidth="1.6")
            if m.level == "kv":
                attrs["style"] = attrs.get("style", "solid") + ",bold"
            dot.edge(g.id, f"p_{m.param}", label=_plain(label), **attrs)
        hidden_out = len([m for m in g.members if m.param not in params_in])
        if hidden_out and g in context:
            dot.node(f"more_{g.id}", f"+{hidden_out} members outside {title}", shape="plaintext", fontsize="8",
                     fontcolor=border)
            dot.edge(g.id, f"more_{g.id}", style="dotted", color=border, arrowhead="none")

    # unprunable channel spaces touching these parameters
    for i, b in enumerate(graph.blocked):
        hits = [pd for pd in b["params"] if pd.rsplit("[", 1)[0] in params_in]
        if not hits:
            continue
        nid = f"blocked_{i}"
        dot.node(nid, _plain(f"unprunable: {b['size']} channels\n" + _wrap(b['reasons'][0])), shape="note",
                 style="filled", fillcolor=COLORS["blocked"][1], color=COLORS["blocked"][0], fontsize="8")
        for pd in hits:
            p, d = pd.rsplit("[", 1)
            if p not in drawn:
                param_node(p)
                drawn.add(p)
            dot.edge(nid, f"p_{p}", label=f"dim {d.rstrip(']')}", style="dotted", color=COLORS["blocked"][0],
                     fontcolor=COLORS["blocked"][0])
    return dot


# ----------------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------------


def draw(graph, plan=None, path=None, *, layer: int | None = None, group: str | None = None,
         collapse: bool = False, wrap: int | None = None):
    """Draw ``graph`` (a :class:`depgraph.DependencyGraph`) as a ``graphviz.Digraph``.

    ``plan``: a :class:`depgraph.Plan`, its JSON text or a path to ``plan.json``: removed counts are shown.
    ``layer`` / ``group``: a detail view of one layer or one group (parameters as nodes); default the overview.
    ``collapse``: overview only, fold runs of identical consecutive layers into one cluster.
    ``wrap``: overview only, layers per row (default 6 for models deeper than 8 layers; 0: one column).
    ``path``: also write the drawing there (format from the suffix: .svg .png .pdf, or .dot/.gv for the source).
    """
    plan = _load_plan(plan, graph)
    if layer is not None and group is not None:
        raise ValueError("give layer or group, not both")
    if layer is not None or group is not None:
        dot = _detail(graph, plan, layer=layer, group=group)
    else:
        dot = _overview(graph, plan, collapse, wrap)
    if path is not None:
        save(dot, path)
    return dot


def save(dot, path) -> Path:
    """Write ``dot`` to ``path`` by its suffix; returns the path actually written (``.dot`` when Graphviz's ``dot``
    binary is missing, with a warning saying how to install it)."""
    path = Path(path)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in _SOURCE_SUFFIXES:
        path.write_text(dot.source)
        return path
    fmt = _FORMATS.get(suffix)
    if fmt is None:
        raise ValueError(f"unknown output format {path.suffix!r}: use .svg, .png, .pdf, .dot or .gv")
    if shutil.which("dot") is None:
        src = path.with_suffix(".dot")
        src.write_text(dot.source)
        warnings.warn(_INSTALL_HINT.format(path=src, fmt=fmt, target=path), RuntimeWarning, stacklevel=2)
        return src
    data = dot.pipe(format=fmt)
    path.write_bytes(data)
    return path
