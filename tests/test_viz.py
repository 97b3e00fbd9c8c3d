"""viz: Graphviz drawings of the dependency graph and the HTML report of a pruning run."""
import base64
import importlib
import json
import re
import shutil
import time
from html.parser import HTMLParser

import pytest

import depgraph
import viz
vdraw = importlib.import_module("viz.draw")  # the module (viz.draw is the function)
from archs import ARCHS

HAS_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAS_DOT, reason="Graphviz `dot` binary not installed")


@pytest.fixture(scope="module")
def llama():
    model = ARCHS["llama-gqa"]()  # 2 layers, 6 heads (2 kv x 3), head_dim 8, 64 neurons, hidden 48
    return model, depgraph.trace(model)


@pytest.fixture(scope="module")
def plan(llama):
    return depgraph.Plan.random(llama[1], 0.3, seed=0, kinds=("attention", "mlp"))


def _edges(source):
    """[(tail, head, attrs text)] of the DOT source."""
    out = []
    for line in source.splitlines():
        m = re.match(r'\s*("?[^"\s]+"?) -> ("?[^"\s]+"?)(?: \[(.*)\])?$', line)
        if m:
            out.append((m.group(1).strip('"'), m.group(2).strip('"'), m.group(3) or ""))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# drawings
# ----------------------------------------------------------------------------------------------------------------------


def test_overview_one_cluster_per_layer_with_its_groups(llama):
    _, graph = llama
    src = viz.draw(graph).source
    assert re.findall(r"subgraph (cluster_\w+)", src) == ["cluster_L0", "cluster_L1"]
    for layer in (0, 1):
        block = src.split(f"subgraph cluster_L{layer} {{")[1].split("}")[0]
        assert f'"attention.{layer}" [' in block and f'"mlp.{layer}" [' in block
        assert "6 heads (2 kv x 3) x 8" in block and "64 neurons" in block
    assert "hidden [" in src and "48 channels" in src and "inexact" in src
    assert "embeddings [" in src and "model.embed_tokens.weight [96, 48]" in src
    assert "output [" in src and "tied to the embeddings" in src
    # the hidden stream threads embeddings -> every group -> output, in order
    chain = [(a, b) for a, b, attrs in _edges(src) if "penwidth=2.2" in attrs]
    assert chain == [("attention.0", "mlp.0"), ("attention.1", "mlp.1"), ("embeddings", "attention.0"),
                     ("mlp.0", "attention.1"), ("mlp.1", "output")]
    # colours by kind
    assert vdraw.COLORS["attention"][1] in src and vdraw.COLORS["mlp"][1] in src and vdraw.COLORS["hidden"][1] in src


def test_detail_view_labels_every_edge_with_dim_and_index_map(llama):
    _, graph = llama
    src = viz.draw(graph, layer=0).source
    edges = _edges(src)
    group_edges = [e for e in edges if e[0] in ("attention.0", "mlp.0", "hidden") and e[1].startswith("p_")]
    assert group_edges and all('label="dim ' in attrs for _, _, attrs in group_edges)
    labels = {(a, b): re.search(r'label="([^"]*)"', attrs).group(1) for a, b, attrs in group_edges}
    q, k, o = (f"p_model.layers.0.self_attn.{n}_proj.weight" for n in "qko")
    assert labels[("attention.0", q)] == "dim 0: 6 heads x 8"
    assert labels[("attention.0", k)] == "dim 0: 2 kv heads x 8, GQA repeat x3"
    assert labels[("attention.0", o)] == "dim 1: 6 heads x 8"
    assert labels[("mlp.0", "p_model.layers.0.mlp.down_proj.weight")] == "dim 1: 64 ch, identity"
    assert labels[("hidden", q)] == "dim 1: 48 ch, identity"
    # the RMSNorm reductions are the inexact couplings: dashed, red, said so
    norm = "p_model.layers.0.input_layernorm.weight"
    (attrs,) = [a for t, h, a in group_edges if (t, h) == ("hidden", norm)]
    assert "inexact: mean reduces over it" in attrs and "dashed" in attrs and vdraw.INEXACT_COLOR in attrs
    assert not any("inexact" in a for t, h, a in group_edges if h == q)
    # parameters as nodes with their shapes; only layer 0's
    assert '"p_model.layers.0.self_attn.q_proj.weight" [label="self_attn.q_proj.weight\\n[48, 48]"' in src
    assert "p_model.layers.1." not in src
    # unprunable channel spaces touching the layer are notes
    assert "unprunable: 8 channels" in src and "attention head_dim of the values" in src


def test_detail_view_of_fused_qkv_shows_slice_offsets():
    graph = depgraph.trace(ARCHS["gpt2"]())
    src = viz.draw(graph, group="attention.1").source
    assert "dim 1: 4 heads x 12, 3 slices @ 0,48,96" in src  # c_attn.weight: q, k, v
    assert "transformer.h.0" not in src and "hidden [" not in src


def test_plan_shows_removed_counts(llama, plan, tmp_path):
    _, graph = llama
    counts = {e.group: (e.num_units, e.units_after) for e in plan.entries}
    assert counts == {"attention.0": (6, 4), "mlp.0": (64, 45), "attention.1": (6, 4), "mlp.1": (64, 45)}
    src = viz.draw(graph, plan).source
    assert src.count("heads 6 -> 4") == 2 and src.count("neurons 64 -> 45") == 2
    assert "plan removes 8,544 parameters (24.0%)" in src
    assert "striped" in src and vdraw.REMOVED_FILL in src
    # the same from plan.json, in the detail view: parameter shapes before -> after
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    detail = viz.draw(graph, path, layer=1).source
    assert "heads 6 -> 4" in detail and "[48, 48] -> [32, 48]" in detail and "[64, 48] -> [45, 48]" in detail


def test_whole_kv_groups_removed_are_shown(llama):
    _, graph = llama
    p = depgraph.Plan.random(graph, 0.5, kinds="attention", gqa="kv")
    assert "heads 6 -> 3, kv 2 -> 1" in viz.draw(graph, p).source


def test_collapse_folds_identical_layers(llama, plan):
    _, graph = llama
    src = viz.draw(graph, collapse=True).source
    assert re.findall(r"subgraph (cluster_\w+)", src) == ["cluster_L0"]
    assert "layers 0-1 (x2, identical)" in src and "attention.0-1" in src
    # a plan that differs between layers keeps them apart
    uneven = depgraph.Plan.from_units(graph, {"mlp.0": [1, 2, 3]})
    assert len(re.findall(r"subgraph cluster_", viz.draw(graph, uneven, collapse=True).source)) == 2


def test_wrapped_overview_keeps_layer_order():
    import transformers as tf
    import torch

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=10,
                         num_attention_heads=2, num_key_value_heads=2)
    graph = depgraph.trace(tf.LlamaForCausalLM(cfg).eval())
    src = viz.draw(graph).source  # > 8 layers: 6 per row
    assert len(re.findall(r"subgraph cluster_L", src)) == 10
    assert src.count("rank=same") == 2
    chain = [(a, b) for a, b, attrs in _edges(src) if "penwidth=2.2" in attrs and a.startswith("mlp")]
    assert chain == [(f"mlp.{i}", f"attention.{i + 1}") for i in range(9)] + [("mlp.9", "output")]


@needs_dot
@pytest.mark.parametrize("suffix,magic", [(".svg", b"<svg"), (".png", b"\x89PNG"), (".pdf", b"%PDF")])
def test_render_by_suffix(llama, plan, tmp_path, suffix, magic):
    _, graph = llama
    out = tmp_path / f"graph{suffix}"
    viz.draw(graph, plan, out)
    data = out.read_bytes()
    assert magic in data[:400]
    if suffix == ".svg":
        assert "heads 6 &#45;&gt; 4" in data.decode()
    viz.draw(graph, plan, tmp_path / f"layer{suffix}", layer=0)
    assert (tmp_path / f"layer{suffix}").stat().st_size > 1000


def test_missing_dot_writes_source_and_says_how_to_install(llama, tmp_path, monkeypatch):
    _, graph = llama
    monkeypatch.setattr(vdraw.shutil, "which", lambda name: None)
    with pytest.warns(RuntimeWarning, match="apt-get install graphviz"):
        written = vdraw.save(viz.draw(graph), tmp_path / "graph.svg")
    assert written == tmp_path / "graph.dot" and not (tmp_path / "graph.svg").exists()
    assert written.read_text().startswith("digraph")


def test_dot_source_and_bad_suffix(llama, tmp_path):
    _, graph = llama
    viz.draw(graph, path=tmp_path / "g.gv")
    assert (tmp_path / "g.gv").read_text().startswith("digraph")
    with pytest.raises(ValueError, match="unknown output format"):
        viz.draw(graph, path=tmp_path / "g.jpeg")
    with pytest.raises(depgraph.PlanError, match="layer 7"):
        viz.draw(graph, layer=7)


# ----------------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------------


class _Tables(HTMLParser):
    """Cells of every <table>, keyed by its class."""

    def __init__(self):
        super().__init__()
        self.tables, self._cls, self._row, self._cell = {}, None, None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._cls = dict(attrs).get("class") or f"table{len(self.tables)}"
            self.tables[self._cls] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._cls:
            self.tables[self._cls].append(self._row)
        elif tag == "table":
            self._cls = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _tables(text):
    p = _Tables()
    p.feed(text)
    return p.tables


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny prune run folder as `depgraph prune` writes it: plan.json, report.json, eval.json."""
    model = ARCHS["llama-gqa"]()
    graph = depgraph.trace(model)
    scores = depgraph.score(model, graph, None, method="magnitude", kinds=("attention", "mlp"))
    plan = depgraph.Plan.from_scores(graph, scores, 0.2, kinds=("attention", "mlp"))
    before = graph.num_params
    depgraph.shrink(model, plan)
    after = sum(p.numel() for p in model.parameters())
    report = {"method": "magnitude", "target": 0.2, "policy": "uniform", "params_before": before,
              "params_after": after, "removed_fraction": (before - after) / before,
              "times": {"trace_s": 0.5, "score_s": 1.25, "plan_s": 0.05, "shrink_s": 0.2},
              "groups": [{"group": e.group, "kind": e.kind, "layer": e.layer, "units_before": e.num_units,
                          "units_after": e.units_after, "scores": [float(x) for x in scores[e.group]]}
                         for e in plan.entries]}
    d = tmp_path_factory.mktemp("run")
    (d / "plan.json").write_text(plan.to_json())
    (d / "report.json").write_text(json.dumps(report))
    (d / "eval.json").write_text(json.dumps({
        "dense": {"ppl": {"wikitext2": 20.5, "ptb": 33.0}, "window": 128,
                  "tasks": {"piqa": {"acc": 0.61, "acc_stderr": 0.01}, "boolq": 0.55}},
        "pruned": {"ppl": {"wikitext2": 25.0, "ptb": 40.0}, "window": 128,
                   "tasks": {"piqa": {"acc": 0.58, "acc_stderr": 0.01}, "boolq": 0.52}}}))
    return d, plan, report


def test_report_per_layer_table_has_the_right_numbers(run_dir):
    d, plan, rep = run_dir
    out = viz.report(d)
    assert out == d / "report.html"
    text = out.read_text()
    rows = _tables(text)["layers"]
    assert rows[0] == ["layer", "heads before", "heads after", "heads removed", "kv before", "kv after",
                       "neurons before", "neurons after", "neurons removed"]
    by = {e.group: e for e in plan.entries}
    assert len(rows) == 3
    for layer, row in zip((0, 1), rows[1:]):
        a, m = by[f"attention.{layer}"], by[f"mlp.{layer}"]
        assert row[:3] == [str(layer), str(a.num_units), str(a.units_after)]
        assert row[4:6] == [str(a.attention["kv_before"]), str(a.attention["kv_after"])]
        assert row[6:8] == [str(m.num_units), str(m.units_after)]
        assert row[8].startswith(f"{m.num_units - m.units_after} (")
    assert rows[1][:3] == ["0", "6", "4"] and rows[1][6:8] == ["64", "48"]  # the values themselves
    # summary, timings, evaluation
    assert f"{rep['params_before']:,}" in text and f"{rep['params_after']:,}" in text
    assert f"{rep['removed_fraction']:.2%}" in text
    tables = _tables(text)
    assert ["score_s", "1.250"] in tables["times"] and ["total", "2.000"] in tables["times"]
    assert tables["eval-ppl"][1][:3] == ["wikitext2", "20.5", "25"] and "+22.0%" in tables["eval-ppl"][1][3]
    assert tables["eval-tasks"][1][:3] == ["piqa.acc", "0.61", "0.58"]
    assert not any("stderr" in r[0] for r in tables["eval-tasks"])
    assert "window: 128" in text


def test_report_embeds_images_and_needs_no_network(run_dir):
    d, _, _ = run_dir
    text = viz.report(d, d / "out" / "r.html").read_text()
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    alts = [a for a, _ in images]
    assert alts == ["time per stage", "kept and removed units per layer", "distribution of unit scores per layer",
                    "perplexity before and after"]
    for _, b64 in images:
        assert base64.b64decode(b64)[:4] == b"\x89PNG"
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"""(src|href)=["'](?!data:)""", text)
    assert "<script" not in text and "<link" not in text and "@import" not in text and "url(" not in text


def test_report_degrades_gracefully(run_dir, tmp_path):
    d, plan, _ = run_dir
    # empty folder: a page saying what is missing
    empty = tmp_path / "empty"
    empty.mkdir()
    text = viz.report(empty).read_text()
    assert "Not in this run folder: report.json, plan.json, eval.json" in text and "<img" not in text
    # only plan.json: the per-layer table from the plan, no score chart
    only = tmp_path / "plan_only"
    only.mkdir()
    shutil.copy(d / "plan.json", only / "plan.json")
    text = viz.report(only).read_text()
    assert _tables(text)["layers"][1][:3] == ["0", "6", "4"] and "No scores in this run." in text
    # one-model eval.json, an unreadable file and an extra results file
    ev = tmp_path / "eval_only"
    ev.mkdir()
    (ev / "eval.json").write_text(json.dumps({"ppl": {"wikitext2": 31.5}, "tasks": {}}))
    (ev / "recover.json").write_text(json.dumps({"method": "lora", "steps": 100, "loss": {"final": 2.5}}))
    (ev / "broken.json").write_text("{not json")
    text = viz.report(ev).read_text()
    tables = _tables(text)
    assert tables["eval-ppl"][1] == ["wikitext2", "31.5"]
    assert any(["loss.final", "2.5"] in t for t in tables.values())
    assert "could not read broken.json" in text
    with pytest.raises(FileNotFoundError):
        viz.report(tmp_path / "nope")


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*no loadable tokenizer")
def test_cli_report_and_viz(run_dir, llama, tmp_path, capsys):
    from depgraph.cli import main

    d, _, _ = run_dir
    assert main(["report", str(d), "-o", str(tmp_path / "r.html")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r.html")
    assert 'class="layers"' in (tmp_path / "r.html").read_text()

    model, _ = llama
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    out = tmp_path / "layer0.dot"
    assert main(["viz", str(folder), "-o", str(out), "--layer", "0", "--plan", str(d)]) == 0
    src = out.read_text()
    assert "heads 6 -> 4" in src and "dim 0: 2 kv heads x 8, GQA repeat x3" in src
    assert main(["viz", str(folder), "-o", str(tmp_path / "g.dot"), "--plan", str(tmp_path / "missing.json")]) == 1


# ----------------------------------------------------------------------------------------------------------------------
# the real model
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_dot
def test_smollm2_overview_renders_fast_and_small(tmp_path):
    from depgraph.models import smollm2_cache_dir

    if not (smollm2_cache_dir() / "config.json").is_file():
        pytest.skip("SmolLM2 is not cached: run `make fetch-model` (CI does)")
    from depgraph.models import load_model

    model, _ = load_model()
    graph = depgraph.trace(model)
    plan = depgraph.Plan.random(graph, 0.2, seed=0, kinds=("attention", "mlp"))
    for kw, name in (({}, "overview"), ({"collapse": True}, "collapsed")):
        t = time.perf_counter()
        viz.draw(graph, plan, tmp_path / f"{name}.svg", **kw)
        elapsed = time.perf_counter() - t
        size = (tmp_path / f"{name}.svg").stat().st_size
        assert elapsed < 5.0, f"{name}: {elapsed:.1f}s"
        assert size < 3_000_000, f"{name}: {size} bytes"
    svg = (tmp_path / "overview.svg").read_text()
    assert len(re.findall(r'<g id="clust\d+" class="cluster">', svg)) == 30
    assert svg.count("heads 9 &#45;&gt; 6") == 30
    t = time.perf_counter()
    viz.draw(graph, plan, tmp_path / "layer3.svg", layer=3)
    assert time.perf_counter() - t < 5.0


@pytest.mark.filterwarnings("ignore:.*no loadable tokenizer")
def test_iterative_plan_json_composes_and_draws(llama, tmp_path):
    """plan.json of an iterative run (a list of steps) has one reader: composed onto the original shapes it removes
    exactly what the steps removed, and `depgraph viz --plan RUN/plan.json` draws it."""
    import copy

    import torch

    from depgraph.cli import main
    from depgraph.plan import compose, dump_plans, load_plans

    dense, _ = llama
    pruned = copy.deepcopy(dense)
    _, _, plans = depgraph.prune(pruned, None, target=0.2, method="l2", kinds=("attention", "mlp"), layers=None,
                                 steps=2, round_to=1, progress=False)
    assert len(plans) == 2
    run = tmp_path / "run"
    run.mkdir()
    (run / "plan.json").write_text(dump_plans(plans))
    assert json.loads((run / "plan.json").read_text())[0]["format"] == 1  # a list of steps
    steps = load_plans(run / "plan.json")
    assert [s.to_json() for s in steps] == [p.to_json() for p in plans] and load_plans(run) == steps
    one = compose(steps)
    assert set(one.shapes) >= set(plans[0].shapes)
    assert all(list(dense.state_dict()[n].shape) == s for n, s in one.shapes.items())
    again = depgraph.shrink(copy.deepcopy(dense), one)
    got, want = again.state_dict(), pruned.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # the CLI draws it over the dense model, with the counts after both steps
    folder = tmp_path / "tiny"
    dense.save_pretrained(folder)
    out = tmp_path / "g.dot"
    assert main(["viz", str(folder), "-o", str(out), "--plan", str(run / "plan.json")]) == 0
    src = out.read_text()
    for e in one.entries:
        assert f"{e.num_units} -> {e.units_after}" in src
    assert f"plan removes {one.params_removed():,} parameters" in src
