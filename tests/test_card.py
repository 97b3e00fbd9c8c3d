"""Every saved folder carries a Hugging Face model card."""
import copy
import json

import torch
from huggingface_hub import ModelCard

import depgraph
from archs import ARCHS
from depgraph import card


def _source(tmp_path):
    """A llama folder with its own card (license mit), loaded back so config._name_or_path points at it."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "tiny-llama"
    ARCHS["llama-gqa"]().save_pretrained(src)
    (src / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# tiny\n")
    return AutoModelForCausalLM.from_pretrained(src).eval()


def test_card_front_matter_widths_evaluation_and_loading(tmp_path):
    model = _source(tmp_path)
    graph = depgraph.trace(model)
    plan = depgraph.Plan.from_units(graph, {"mlp.0": [1, 2, 3, 4, 5, 6, 7, 8], "attention.1": [0, 3]})
    depgraph.shrink(model, plan)
    report = {"method": "activation", "target": 0.2, "params_before": 1000, "params_after": 800,
              "removed_fraction": 0.2, "evaluation": {"wikitext2": {"before": 55.0, "after": 113.1,
                                                                     "protocol": "window 128, 16 windows"}}}
    out = depgraph.save_pruned(model, tmp_path / "out", extra_files={"report.json": json.dumps(report)})
    parsed = ModelCard.load(out / "README.md")
    assert parsed.data.license == "mit"
    assert parsed.data.base_model == "tiny-llama"
    assert parsed.data.tags == ["pruned", "depgraph"]
    text = parsed.text
    assert "| 0 | 6 | 2 | 56 |" in text and "| 1 | 4 | 2 | 64 |" in text  # per-layer widths
    assert "55.00 -> 113.10" in text and "window 128, 16 windows" in text
    assert "trust_remote_code=True" in text and "depgraph.load_pruned" in text and "--gguf" in text


def test_uniform_card_collapses_layers_and_loads_without_remote_code(tmp_path):
    model = ARCHS["llama-gqa"]()
    graph = depgraph.trace(model)
    plan = depgraph.Plan.from_units(graph, {g.id: list(range(8)) for g in graph.groups(("mlp",))})
    out = depgraph.save_pruned(depgraph.shrink(model, plan), tmp_path / "out")
    text = (out / "README.md").read_text()
    assert "| 0-1 | 6 | 2 | 56 |" in text
    assert "trust_remote_code" not in text
    assert ModelCard.load(out / "README.md").data.tags == ["pruned", "depgraph"]


def test_a_readme_given_by_the_caller_is_kept(tmp_path):
    out = depgraph.save_pruned(ARCHS["llama-mha"](), tmp_path / "out", extra_files={"README.md": "mine\n"})
    assert (out / "README.md").read_text() == "mine\n"


def test_collapse_runs():
    rows = [{"a": 1}, {"a": 1}, {"a": 2}, {"a": 1}]
    assert [(r.start, r.stop, v["a"]) for r, v in card.collapse(rows)] == [(0, 2, 1), (2, 3, 2), (3, 4, 1)]
