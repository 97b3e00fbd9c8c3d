"""One self-contained HTML report of a pruning run folder (no network at view time: no external URLs, charts are
matplotlib PNGs embedded as base64).

Reads whatever of these the run folder holds and skips the rest:

* ``report.json``: what :func:`depgraph.prune` returned (method, target, params_before/after, removed_fraction,
  times, groups with units_before/after and unit scores);
* ``plan.json``: the :class:`depgraph.Plan` (removed units per group, GQA kv counts); used for the per-layer table
  when ``report.json`` is missing, and to mark the removed units in the score charts;
* ``eval.json``: ``{"dense": {"ppl": {...}, "tasks": {...}}, "pruned": {...}}`` (or one such dict): perplexity and
  zero-shot before / after, plus any other numbers (speed, memory) found there;
* any other ``*.json`` (a recovery run, timings): shown as key / value tables.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from depgraph.prune_report import PruneReport

__all__ = ["report", "render_html", "load_run"]

_KNOWN = {"report.json", "plan.json", "eval.json"}
_KIND_COLOR = {"attention": "#4c78a8", "mlp": "#f58518", "hidden": "#54a24b", "channels": "#b279a2", "experts": "#c9a400"}
_REMOVED = "#e45756"
_CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0} table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right} th{background:#f3f3f3}
td.l,th.l{text-align:left} .bad{color:#b71c1c} .good{color:#1b5e20} .note{color:#666;font-size:.9em}
img{max-width:100%;height:auto;display:block;margin:.6em 0} .cards{display:flex;flex-wrap:wrap;gap:.8em}
.card{border:1px solid #ddd;border-radius:6px;padding:.5em .9em;min-width:9em}
.card b{display:block;font-size:1.3em} code{background:#f5f5f5;padding:0 .2em}
"""


# ----------------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------------


def _read_json(path: Path, notes: list):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        notes.append(f"could not read {path.name}: {type(err).__name__}: {err}")
        return None


def load_run(run_dir) -> dict:
    """Everything :func:`report` uses from ``run_dir``: {"report", "plan", "eval", "extra": {name: data},
    "files": [(name, bytes)], "notes": [...]}; missing parts are None / empty."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    notes: list = []
    data = {"dir": run_dir, "report": None, "plan": None, "eval": None, "extra": {}, "files": [], "notes": notes}
    for name in ("report.json", "plan.json", "eval.json"):
        p = run_dir / name
        if p.is_file():
            data[name[:-5]] = _read_json(p, notes)
    if data["report"] is not None:  # through report.json's one reader (PruneReport), as a plain dict
        try:
            data["report"] = PruneReport.from_dict(data["report"]).to_dict()
        except ValueError as e:
            notes.append(f"report.json: {e}")
            data["report"] = None
    if isinstance(data["plan"], list):  # the steps of an iterative run: one plan on the original shapes
        from depgraph.errors import DepgraphError
        from depgraph.plan import compose, load_plans

        try:
            data["plan"] = json.loads(compose(load_plans(json.dumps(data["plan"]))).to_json())
        except DepgraphError as e:
            notes.append(f"plan.json: {e}")
            data["plan"] = None
    rep = data["report"]
    if data["plan"] is None and isinstance(rep, dict) and isinstance(rep.get("plan"), dict):
        data["plan"] = rep["plan"]  # a report.json with the plan inline
    for p in sorted(run_dir.glob("*.json")):
        if p.name not in _KNOWN:
            obj = _read_json(p, notes)
            if obj is not None:
                data["extra"][p.name] = obj
    for p in sorted(run_dir.iterdir()):
        size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        data["files"].append((p.name + ("/" if p.is_dir() else ""), size))
    return data


# ----------------------------------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------------------------------


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _num(x, digits=4) -> str:
    if isinstance(x, bool) or x is None:
        return _esc(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
            return f"{x:.3e}"
        return f"{x:,.{digits}g}" if abs(x) >= 1 else f"{x:.{digits}g}"
    return _esc(x)


def _table(header, rows, cls="", left=1) -> str:
    """``left``: how many leading columns are text (left-aligned)."""
    out = [f'<table class="{cls}">' if cls else "<table>", "<tr>"]
    out += [f'<th class="l">{_esc(h)}</th>' if i < left else f"<th>{_esc(h)}</th>" for i, h in enumerate(header)]
    out.append("</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _layer_rows(data) -> list:
    """Per group: {group, kind, layer, before, after, kv_before, kv_after, scores, removed_units}."""
    plan_entries = {}
    plan = data.get("plan")
    if isinstance(plan, dict):
        for e in plan.get("entries", []):
            if isinstance(e, dict) and "group" in e:
                plan_entries[e["group"]] = e
    rows = {}
    rep = data.get("report")
    if isinstance(rep, dict) and isinstance(rep.get("groups"), list):
        for g in rep["groups"]:
            if not isinstance(g, dict) or "group" not in g:
                continue
            rows[g["group"]] = {"group": g["group"], "kind": g.get("kind"), "layer": g.get("layer"),
                                "before": g.get("units_before"), "after": g.get("units_after"),
                                "scores": g.get("scores")}
    for gid, e in plan_entries.items():
        row = rows.setdefault(gid, {"group": gid, "kind": e.get("kind"), "layer": e.get("layer"),
                                    "before": e.get("num_units"), "scores": None})
        if row.get("after") is None and e.get("num_units") is not None:
            row["after"] = e["num_units"] - len(e.get("units", []))
        row["removed_units"] = e.get("units")
        att = e.get("attention") or {}
        if att:
            row["kv_before"], row["kv_after"] = att.get("kv_before"), att.get("kv_after")
    return list(rows.values())


def _per_layer(rows):
    """{layer: {kind: row}} for layered groups (the first group of a kind per layer)."""
    out = defaultdict(dict)
    for r in rows:
        if r.get("layer") is not None:
            out[r["layer"]].setdefault(r.get("kind"), r)
    return dict(sorted(out.items(), key=lambda kv: (not isinstance(kv[0], int), kv[0])))


def _layer_table(rows) -> str:
    layers = _per_layer(rows)
    if not layers:
        return '<p class="note">No per-layer groups in this run.</p>'
    has_kv = any(r.get("kv_before") is not None for k in layers.values() for r in k.values())
    header = ["layer", "heads before", "heads after", "heads removed"]
    if has_kv:
        header += ["kv before", "kv after"]
    header += ["neurons before", "neurons after", "neurons removed"]
    body = []
    for layer, kinds in layers.items():
        a, m = kinds.get("attention"), kinds.get("mlp")
        cells = [_esc(layer)]
        for r, kv in ((a, has_kv), (m, False)):
            if r is None or r.get("before") is None or r.get("after") is None:
                cells += ["&ndash;"] * (3 + (2 if kv else 0))
                continue
            gone = r["before"] - r["after"]
            cells += [str(r["before"]), str(r["after"]),
                      f"{gone} ({gone / r['before']:.0%})" if r["before"] else str(gone)]
            if kv:
                cells += [_esc(r.get("kv_before", "")), _esc(r.get("kv_after", ""))]
        body.append(cells)
    other = [r for r in rows if r.get("layer") is None or r.get("kind") not in ("attention", "mlp")]
    text = _table(header, body, cls="layers")
    if other:
        text += "<p>Other groups:</p>" + _table(
            ["group", "kind", "units before", "units after"],
            [[_esc(r["group"]), _esc(r.get("kind")), _num(r.get("before")), _num(r.get("after"))] for r in other],
            left=2)
    return text


# ----------------------------------------------------------------------------------------------------------------------
# charts (matplotlib Figure objects directly: no pyplot state, no backend switch)
# ----------------------------------------------------------------------------------------------------------------------


def _png(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight", metadata={"Software": None})
    b64 = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{b64}">'


def _figure(w, h):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h))


def _bars_chart(rows) -> str:
    layers = _per_layer(rows)
    kinds = [k for k in ("attention", "mlp") if any(k in v for v in layers.values())]
    if not kinds:
        return ""
    fig = _figure(min(max(6, 2 + 0.3 * len(layers)), 14), 2.4 * len(kinds))
    for i, kind in enumerate(kinds):
        ax = fig.add_subplot(len(kinds), 1, i + 1)
        xs = [layer for layer, v in layers.items() if kind in v and v[kind].get("after") is not None]
        kept = [layers[x][kind]["after"] for x in xs]
        gone = [layers[x][kind]["before"] - layers[x][kind]["after"] for x in xs]
        pos = np.arange(len(xs))
        ax.bar(pos, kept, color=_KIND_COLOR[kind], label="kept")
        ax.bar(pos, gone, bottom=kept, color=_REMOVED, alpha=.75, label="removed")
        ax.set_xticks(pos, [str(x) for x in xs], fontsize=7)
        ax.set_ylabel("heads" if kind == "attention" else "neurons")
        ax.set_title(f"{kind}: kept / removed per layer", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.set_xlim(-0.6, len(xs) - 0.4)
    fig.supxlabel("layer", fontsize=8)
    fig.tight_layout()
    return _png(fig, "kept and removed units per layer")


def _scores_chart(rows) -> str:
    layers = _per_layer(rows)
    kinds = [k for k in ("attention", "mlp")
             if any(k in v and v[k].get("scores") for v in layers.values())]
    if not kinds:
        return ""
    fig = _figure(min(max(6, 2 + 0.3 * len(layers)), 14), 2.8 * len(kinds))
    for i, kind in enumerate(kinds):
        ax = fig.add_subplot(len(kinds), 1, i + 1)
        xs = [layer for layer, v in layers.items() if kind in v and v[kind].get("scores")]
        data = [np.asarray(layers[x][kind]["scores"], dtype=float) for x in xs]
        pos = np.arange(len(xs))
        ax.boxplot(data, positions=pos, widths=.6, showfliers=False, patch_artist=True,
                   boxprops={"facecolor": _KIND_COLOR[kind], "alpha": .45}, medianprops={"color": "#222"})
        for p, x, s in zip(pos, xs, data):
            removed = [u for u in (layers[x][kind].get("removed_units") or []) if 0 <= u < len(s)]
            keep = np.setdiff1d(np.arange(len(s)), removed)
            if len(keep) > 80:  # a sample of the kept units: the box shows their spread
                keep = np.random.default_rng(p).choice(keep, 80, replace=False)
            jitter = (np.random.default_rng(p).random(len(s)) - .5) * .35
            ax.scatter(p + jitter[keep], s[keep], s=3, color="#555", alpha=.35, linewidths=0)
            if removed:
                ax.scatter(p + jitter[removed], s[removed], s=5, color=_REMOVED, alpha=.8, linewidths=0,
                           label="removed" if p == 0 else None)
        allv = np.concatenate(data)
        pos_v = allv[allv > 0]
        if len(pos_v) == len(allv) and len(pos_v) and pos_v.max() / max(pos_v.min(), 1e-300) > 1e3:
            ax.set_yscale("log")
        else:  # far outliers would squash every box: clip the axis to the bulk and say so
            lo, hi = np.percentile(allv, [0.05, 99.5])
            span = hi - lo
            if span > 0 and (allv.max() - allv.min()) > 3 * span:
                ax.set_ylim(lo - .05 * span, hi + .05 * span)
                ax.text(.995, .97, f"axis clipped: max {allv.max():.3g}", transform=ax.transAxes, ha="right",
                        va="top", fontsize=7, color="#666")
        ax.set_xticks(pos, [str(x) for x in xs], fontsize=7)
        ax.set_xlim(-0.6, len(xs) - 0.4)
        ax.set_ylabel("score")
        ax.set_title(f"{kind}: unit scores per layer (red: removed)", fontsize=9)
    fig.supxlabel("layer", fontsize=8)
    fig.tight_layout()
    return _png(fig, "distribution of unit scores per layer")


def _times_chart(times: dict) -> str:
    items = [(k, float(v)) for k, v in times.items() if isinstance(v, (int, float))]
    if not items:
        return ""
    fig = _figure(6, 0.4 + 0.3 * len(items))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#72b7b2")
    ax.set_xlabel("seconds")
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    return _png(fig, "time per stage")


# ----------------------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------------------


def _flatten(obj, prefix="", depth=0, out=None) -> dict:
    out = {} if out is None else out
    if isinstance(obj, dict) and depth < 4:
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), depth + 1, out)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = obj
    elif isinstance(obj, (str, bool)) or obj is None:
        out[prefix] = obj
    return out


def _eval_columns(ev) -> tuple:
    """({column: results dict}, {shared setting: value}) from eval.json."""
    if not isinstance(ev, dict):
        return {}, {}
    if any(k in ev for k in ("ppl", "tasks")):
        return {"model": ev}, {}
    cols = {k: v for k, v in ev.items() if isinstance(v, dict)}
    shared = {k: v for k, v in ev.items() if not isinstance(v, dict)}
    return cols, shared


def _metric_rows(cols: dict, section: str):
    """[(metric, [value per column])] for ``section`` ("ppl", "tasks" or None: everything else)."""
    names, per_col = [], {}
    for c, res in cols.items():
        if section is None:
            flat = _flatten({k: v for k, v in res.items() if k not in ("ppl", "tasks")})
        else:
            flat = _flatten(res.get(section, {}))
        flat = {k: v for k, v in flat.items() if "stderr" not in k}
        per_col[c] = flat
        names += [k for k in flat if k not in names]
    return [(n, [per_col[c].get(n) for c in cols]) for n in names]


def _eval_section(ev) -> str:
    cols, shared = _eval_columns(ev)
    if not cols:
        return ""
    parts = ["<h2>Evaluation</h2>"]
    if shared:
        parts.append('<p class="note">' + ", ".join(f"{_esc(k)}: {_esc(v)}" for k, v in shared.items()) + "</p>")
    names = list(cols)
    for section, title, lower_better in (("ppl", "Perplexity (lower is better)", True),
                                         ("tasks", "Zero-shot tasks", False), (None, "Other measurements", None)):
        rows = _metric_rows(cols, section)
        if section is None and len(names) >= 2:  # the same everywhere (window, seq_len): a setting, not a result
            same = [(m, v) for m, v in rows if all(x == v[0] for x in v)]
            if same:
                parts.append('<p class="note">' + ", ".join(f"{_esc(m)}: {_esc(v[0])}" for m, v in same) + "</p>")
            rows = [(m, v) for m, v in rows if (m, v) not in same]
        if not rows:
            continue
        header = ["metric"] + names + (["change"] if len(names) >= 2 else [])
        body = []
        for metric, vals in rows:
            cells = [_esc(metric)] + [_num(v) for v in vals]
            if len(names) >= 2:
                a, b = vals[0], vals[-1]
                if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and a:
                    rel = (b - a) / abs(a)
                    worse = (rel > 0) if lower_better else (rel < 0) if lower_better is False else None
                    cls = "" if worse is None or abs(rel) < 1e-12 else (' class="bad"' if worse else ' class="good"')
                    cells.append(f"<span{cls}>{b - a:+.4g} ({rel:+.1%})</span>")
                else:
                    cells.append("")
            body.append(cells)
        parts.append(f"<h3>{_esc(title)}</h3>" + _table(header, body, cls=f"eval-{section or 'other'}"))
        if section == "ppl":
            parts.append(_eval_chart(rows, names, "perplexity"))
    return "\n".join(parts)


def _eval_chart(rows, names, ylabel) -> str:
    rows = [(m, v) for m, v in rows if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)]
    if not rows:
        return ""
    fig = _figure(1.5 + 1.4 * len(rows), 2.6)
    ax = fig.add_subplot(1, 1, 1)
    w = 0.8 / len(names)
    palette = ["#9e9e9e", _REMOVED, "#4c78a8", "#54a24b", "#f58518"]
    for j, n in enumerate(names):
        vals = [v[j] for _, v in rows]
        bars = ax.bar(np.arange(len(rows)) + (j - (len(names) - 1) / 2) * w, vals, w, label=n,
                      color=palette[j % len(palette)])
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(np.arange(len(rows)), [m for m, _ in rows], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig, f"{ylabel} before and after")


# ----------------------------------------------------------------------------------------------------------------------
# page
# ----------------------------------------------------------------------------------------------------------------------


def _summary_section(rep) -> str:
    if not isinstance(rep, dict):
        return ""
    cards = []
    pb, pa = rep.get("params_before"), rep.get("params_after")
    if isinstance(pb, int):
        cards.append(("parameters before", f"{pb:,}"))
    if isinstance(pa, int):
        cards.append(("parameters after", f"{pa:,}"))
    frac = rep.get("removed_fraction")
    if frac is None and isinstance(pb, int) and isinstance(pa, int) and pb:
        frac = (pb - pa) / pb
    if isinstance(frac, (int, float)):
        cards.append(("removed", f"{frac:.2%}"))
    ne = rep.get("non_embedding_removed_fraction")
    if isinstance(ne, (int, float)):
        cards.append(("removed of non-embedding", f"{ne:.2%}"))
    if isinstance(rep.get("target"), (int, float)):
        of = " (of non-embedding)" if rep.get("target_of") == "non-embedding" else ""
        cards.append((f"target{of}", f"{rep['target']:.2%}"))
    parts = ["<h2>Summary</h2>", '<div class="cards">' +
             "".join(f'<div class="card">{_esc(k)}<b>{_esc(v)}</b></div>' for k, v in cards) + "</div>"]
    settings = {k: v for k, v in rep.items()
                if k not in ("groups", "plan", "times", "params_before", "params_after", "removed_fraction",
                             "non_embedding_removed_fraction")
                and not isinstance(v, (list, dict))}
    if settings:
        parts.append("<h3>Settings</h3>" + _table(["setting", "value"],
                                                  [[_esc(k), _num(v)] for k, v in settings.items()], cls="settings"))
    times = rep.get("times")
    if isinstance(times, dict) and times:
        total = sum(v for v in times.values() if isinstance(v, (int, float)))
        rows = [[_esc(k), f"{v:.3f}" if isinstance(v, (int, float)) else _esc(v)] for k, v in times.items()]
        rows.append(["<b>total</b>", f"<b>{total:.3f}</b>"])
        parts.append("<h3>Time (seconds)</h3>" + _table(["stage", "seconds"], rows, cls="times"))
        parts.append(_times_chart(times))
    return "\n".join(parts)


def _extra_section(extra: dict) -> str:
    parts = []
    for name, obj in extra.items():
        flat = _flatten(obj) if isinstance(obj, dict) else {}
        if not flat:
            continue
        rows = [[_esc(k), _num(v)] for k, v in list(flat.items())[:200]]
        more = f'<p class="note">... {len(flat) - 200} more entries</p>' if len(flat) > 200 else ""
        parts.append(f"<h3>{_esc(name)}</h3>" + _table(["key", "value"], rows) + more)
    return ("<h2>Other results</h2>" + "\n".join(parts)) if parts else ""


def render_html(data: dict, title: str | None = None) -> str:
    """The report page for :func:`load_run`'s ``data``."""
    rep, plan = data.get("report"), data.get("plan")
    run_name = Path(data["dir"]).resolve().name if data.get("dir") else "run"
    title = title or f"depgraph pruning report: {run_name}"
    subtitle = []
    if isinstance(rep, dict):
        for k in ("model", "method", "policy"):
            if rep.get(k) is not None:
                subtitle.append(f"{k} <code>{_esc(rep[k])}</code>")
    subtitle.append(f"generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}")
    rows = _layer_rows(data)
    body = [f"<h1>{_esc(title)}</h1>", f'<p class="sub">{" &middot; ".join(subtitle)}</p>']
    present = [n for n, k in (("report.json", "report"), ("plan.json", "plan"), ("eval.json", "eval")) if data.get(k)]
    missing = [n for n in ("report.json", "plan.json", "eval.json") if n not in present]
    if missing:
        body.append(f'<p class="note">Not in this run folder: {", ".join(missing)} (their sections are left out).</p>')
    body.append(_summary_section(rep))
    if rows:
        body.append("<h2>Per layer</h2>")
        body.append(_layer_table(rows))
        body.append(_bars_chart(rows))
        scores = _scores_chart(rows)
        body.append("<h2>Unit scores per layer</h2>" + (scores or '<p class="note">No scores in this run.</p>'))
    body.append(_eval_section(data.get("eval")))
    body.append(_extra_section(data.get("extra", {})))
    if data.get("files"):
        body.append("<h2>Run folder</h2>" + _table(["file", "size"], [[_esc(n), _num(s)] for n, s in data["files"]],
                                                     cls="files"))
    if data.get("notes"):
        body.append('<p class="note">' + "<br>".join(_esc(n) for n in data["notes"]) + "</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(b for b in body if b) + "\n</body></html>\n")


def report(run_dir, path=None, title: str | None = None) -> Path:
    """Write the HTML report of ``run_dir`` to ``path`` (default ``run_dir/report.html``); returns the path."""
    data = load_run(run_dir)
    path = Path(path) if path is not None else Path(run_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(data, title), encoding="utf-8")
    return path
