"""Model card (``README.md``) for a saved pruned folder: Hugging Face YAML front matter and a short body.

The card states the base model and its license (read from the source folder's own card when it has one), the
pruning method and target, the per-layer widths (runs of equal layers collapsed), the evaluation figures a run
recorded, and the three ways to load the folder.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from . import record as records
from .prune_report import PruneReport
from .shrink import CONFIG_FIELDS

# per-layer width columns: card heading -> (record key, config fields to fall back on)
WIDTHS = {
    "heads": ("num_attention_heads", CONFIG_FIELDS["heads"]),
    "kv heads": ("num_key_value_heads", CONFIG_FIELDS["kv"] + CONFIG_FIELDS["heads"]),
    "ffn": ("intermediate_size", CONFIG_FIELDS["mlp"]),
}
# facts about sources that carry no model card of their own (the bundled model is cached from a GGUF)
KNOWN_SOURCES = {
    "SmolLM2-135M-Instruct": {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"},
}


def _config_value(config, fields):
    for f in fields:
        v = getattr(config, f, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def layer_widths(config) -> list[dict]:
    """One row per decoder layer: {"heads", "kv heads", "ffn"} from the record, else the config."""
    record = records.get(config, create=False) or {}
    layers = record.get("layers") or {}
    n = getattr(config, "num_hidden_layers", None) or len([k for k in layers if k.isdigit()])
    rows = []
    for i in range(n):
        rec = {**layers.get("all", {}), **layers.get(str(i), {})}
        rows.append({col: rec.get(key, _config_value(config, fields)) for col, (key, fields) in WIDTHS.items()})
    return rows


def collapse(rows: list[dict]) -> list[tuple[range, dict]]:
    """Runs of consecutive equal rows: [(range of layer indices, row)]."""
    runs = []
    for i, row in enumerate(rows):
        if runs and runs[-1][1] == row and runs[-1][0].stop == i:
            runs[-1] = (range(runs[-1][0].start, i + 1), row)
        else:
            runs.append((range(i, i + 1), row))
    return runs


def front_matter_of(readme: Path) -> dict:
    """``license`` and ``base_model`` from a card's YAML front matter (flat ``key: value`` lines only)."""
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return {}
    m = re.match(r"---\n(.*?)\n---", text, re.S)
    out = {}
    for line in (m.group(1).splitlines() if m else []):
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("license", "base_model") and value.strip():
            out[key.strip()] = value.strip().strip("'\"")
    return out


def source_facts(config) -> dict:
    """base_model / license of the model this one was pruned from, where known."""
    source = str(getattr(config, "_name_or_path", "") or "")
    facts = dict(KNOWN_SOURCES.get(Path(source).name, {}))
    if source and Path(source).is_dir():
        facts.update(front_matter_of(Path(source) / "README.md"))
        facts.setdefault("base_model", Path(source).name)
    elif source:
        facts.setdefault("base_model", source)
    return facts


def _evaluation(report: dict) -> list[str]:
    ev = report.get("evaluation") or {}
    lines = []
    for name, r in ev.items():
        if isinstance(r, dict) and "after" in r:
            proto = f" ({r['protocol']})" if r.get("protocol") else ""
            before = f"{r['before']:.2f} -> " if isinstance(r.get("before"), (int, float)) else ""
            lines.append(f"| {name}{proto} | {before}{r['after']:.2f} |")
    return (["| evaluation | dense -> pruned |", "|---|---|"] + lines) if lines else []


def render(config, report: dict | None = None, remote_code: bool = False) -> str:
    """The README.md text for a folder saved from a model with ``config`` (and the run's ``report``)."""
    report = report or {}
    facts = source_facts(config)
    yaml = ["---"]
    if facts.get("base_model"):
        yaml.append(f"base_model: {facts['base_model']}")
    if facts.get("license"):
        yaml.append(f"license: {facts['license']}")
    yaml += ["library_name: transformers", "tags:", "- pruned", "- depgraph", "---", ""]
    title = facts.get("base_model", "model").rsplit("/", 1)[-1]
    body = [f"# {title}, structurally pruned with depgraph", ""]
    if report:
        method = report.get("method", "?")
        of = "the non-embedding parameters" if report.get("target_of") == "non-embedding" else "all parameters"
        line = f"Method: `{method}` scores, target {report.get('target', '?')} of {of}"
        if "params_before" in report:
            line += (f"; {report['params_before']:,} -> {report['params_after']:,} parameters "
                     f"({100 * report.get('removed_fraction', 0):.1f}% removed")
            if report.get("non_embedding_removed_fraction") is not None:
                line += f", {100 * report['non_embedding_removed_fraction']:.1f}% of the non-embedding parameters"
            line += ")"
        body += [line + ".", ""]
    rows = layer_widths(config)
    if rows:
        body += ["| layers | " + " | ".join(WIDTHS) + " |", "|---|" + "---|" * len(WIDTHS)]
        for idx, row in collapse(rows):
            name = str(idx.start) if len(idx) == 1 else f"{idx.start}-{idx.stop - 1}"
            body.append(f"| {name} | " + " | ".join(str(row[c]) for c in WIDTHS) + " |")
        body.append("")
    ev = _evaluation(report)
    if ev:
        body += ev + [""]
    arch = (getattr(config, "architectures", None) or ["AutoModelForCausalLM"])[0]
    trust = ", trust_remote_code=True" if remote_code else ""
    why = ("layers have different widths, so the folder carries `modeling_depgraph.py` (imports only torch and "
           "transformers)") if remote_code else "every layer has one shape"
    body += [
        "## Load it", "",
        f"1. Stock transformers ({why}):", "",
        "   ```python", "   from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"   model = AutoModelForCausalLM.from_pretrained(FOLDER{trust})", "   ```", "",
        "2. depgraph: `depgraph.load_pruned(FOLDER)` (exact per-layer shapes, no remote code).", "",
        "3. llama.cpp or vLLM (Llama-family models): `depgraph export FOLDER --gguf model.gguf` or "
        "`depgraph export FOLDER --vllm OUT`.", "",
        f"Architecture: `{arch}`; pruned with depgraph (structured pruning by the exact dependency graph: "
        f"removing a group's channels equals zeroing them).", "",
    ]
    return "\n".join(yaml + body)


def report_of(extra_files: dict | None) -> dict:
    """The run report among a save's extra files (``report.json``), else {}."""
    text = (extra_files or {}).get("report.json")
    try:
        return PruneReport.from_dict(json.loads(text)).to_dict() if text else {}
    except ValueError:
        return {}
