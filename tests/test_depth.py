"""Depth pruning: ``block`` groups from the residual adds; removing a block equals masking it (fp32, 1e-5)."""
import copy
import json

import pytest
import torch
import transformers as tf
from torch import nn

import depgraph
from archs import COMMON, VOCAB, ids
from depgraph.errors import PlanError
from moe_archs import build_moe


def _lm(cfg_cls, model_cls, layers=3, **kw):
    torch.manual_seed(0)
    cfg = cfg_cls(**{**COMMON, "num_hidden_layers": layers, **kw})
    cfg.use_cache = False
    return getattr(tf, model_cls)(cfg).eval()


BUILD = {
    "llama": lambda: _lm(tf.LlamaConfig, "LlamaForCausalLM", num_attention_heads=6, num_key_value_heads=2),
    "qwen2": lambda: _lm(tf.Qwen2Config, "Qwen2ForCausalLM", num_attention_heads=4, num_key_value_heads=2),
    # post-norms: each branch ends in an RMSNorm, whose output is zero exactly when its input is
    "gemma2": lambda: _lm(tf.Gemma2Config, "Gemma2ForCausalLM", num_attention_heads=4, num_key_value_heads=2,
                          head_dim=12, sliding_window=4),
    "gpt2": lambda: _lm(tf.GPT2Config, "GPT2LMHeadModel", layers=3, vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=4,
                        n_inner=64, n_positions=64, bos_token_id=0, eos_token_id=0),
    "mixtral": lambda: build_moe("mixtral"),
}
# the parameters whose zeroing masks each sub-block: what it writes into the residual stream
WRITES = {
    "llama": ("self_attn.o_proj.weight", "mlp.down_proj.weight"),
    "qwen2": ("self_attn.o_proj.weight", "mlp.down_proj.weight"),
    "gemma2": ("self_attn.o_proj.weight", "mlp.down_proj.weight"),
    "gpt2": ("attn.c_proj.weight", "mlp.c_proj.weight"),
    "mixtral": ("self_attn.o_proj.weight", "mlp.experts.down_proj"),
}


@pytest.fixture(scope="module", params=sorted(BUILD))
def traced(request):
    model = BUILD[request.param]()
    return request.param, model, depgraph.trace(model)


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_blocks_found_from_the_residual_adds(traced):
    name, model, graph = traced
    blocks = graph.groups("block")
    n_layers = model.config.num_hidden_layers
    assert {g.block["part"] for g in blocks} == {"layer", "attention", "mlp"}
    assert len(blocks) == 3 * n_layers and not graph.blocked_blocks
    assert "block" not in {g.kind for g in graph.groups()}  # listed only when asked for
    for g in blocks:
        assert g.exact and g.layer is not None and g.block["numel"] > 0
        if g.block["part"] != "layer":
            want = WRITES[name][g.block["part"] == "mlp"]
            assert [w for w in g.block["writes"] if not w.endswith("bias")] == [f"{g.block['list']}.{g.layer}.{want}"]
    layer = graph.group("block.1")
    assert layer.block["numel"] == sum(p.numel() for p in model.get_submodule(layer.block["modules"][0]).parameters())


def _case(case: str, n: int) -> list:
    last = n - 1
    return {"layer": ["block.1"], "attention": ["block.0.attention"], "mlp": [f"block.{last}.mlp"],
            "mixed": ["block.0.attention", f"block.{last}"] + (["block.1.mlp"] if n > 2 else [])}[case]


@pytest.mark.parametrize("case", ["layer", "attention", "mlp", "mixed"])
def test_removal_equals_masking(traced, case):
    name, model, graph = traced
    n = model.config.num_hidden_layers
    gids = _case(case, n)
    plan = depgraph.Plan.from_units(graph, {g: [0] for g in gids})
    x = ids(1)
    masked = _logits(depgraph.mask(copy.deepcopy(model), plan), x)
    shrunk_model = depgraph.shrink(copy.deepcopy(model), plan, verify=True)
    assert not torch.allclose(masked, _logits(model, x), atol=1e-4), "the plan changed nothing"
    torch.testing.assert_close(_logits(shrunk_model, x), masked, rtol=0, atol=1e-5)
    before = sum(p.numel() for p in model.parameters())
    assert before - sum(p.numel() for p in shrunk_model.parameters()) == plan.params_removed()
    dropped = sum(1 for g in gids if g.count(".") == 1)
    assert len(shrunk_model.get_submodule(graph.group("block.0").block["list"])) == n - dropped
    assert shrunk_model.config.num_hidden_layers == n - dropped


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_generate_with_kv_cache_equals_masked(name):
    """Dropped layers renumber layer_idx (and layer_types); skipped attention keeps its cache length in step."""
    model = BUILD[name]()
    graph = depgraph.trace(model)
    plan = depgraph.Plan.from_units(graph, {"block.1": [0], "block.0.attention": [0], "block.2.mlp": [0]})
    masked = depgraph.mask(copy.deepcopy(model), plan)
    shrunk = depgraph.shrink(copy.deepcopy(model), plan)
    x = ids(2)[:1, :5]
    want = masked.generate(x, max_new_tokens=10, do_sample=False, use_cache=False, pad_token_id=0)
    got = shrunk.generate(x, max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(got, want)
    if name == "gemma2":
        assert shrunk.config.layer_types == [t for i, t in enumerate(model.config.layer_types) if i != 1]
        assert [layer.self_attn.layer_idx for layer in shrunk.model.layers[1:]] == [1]


def test_save_load_round_trip(tmp_path):
    model = BUILD["llama"]()
    graph = depgraph.trace(model)
    plan = depgraph.Plan.from_units(graph, {"block.0": [0], "block.2.attention": [0], "mlp.1": list(range(8))})
    shrunk = depgraph.shrink(copy.deepcopy(model), plan)
    depgraph.save_pruned(shrunk, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and list(cfg["depgraph"]["skipped"]) == \
        ["model.layers.1.input_layernorm", "model.layers.1.self_attn"]
    record = cfg["depgraph"]  # layer 1's records are now layer 0's
    assert record["layers"] == {"0": {"intermediate_size": 56}}
    assert record["modules"]["model.layers.0.mlp.down_proj"]["in_features"] == 56
    loaded = depgraph.load_pruned(tmp_path / "out")
    x = ids(3)
    torch.testing.assert_close(_logits(loaded, x), _logits(shrunk, x), rtol=0, atol=0)


def test_exports_see_the_removed_sub_blocks():
    from depgraph.export import gguf, vllm

    model = BUILD["llama"]()
    graph = depgraph.trace(model)
    shrunk = depgraph.shrink(copy.deepcopy(model), depgraph.Plan.from_units(graph, {"block.1.attention": [0],
                                                                                    "block.2": [0]}))
    arch, widths = gguf.plan(shrunk)
    assert arch == "deci" and [w.heads for w in widths] == [6, 0] and all(w.ffn == 64 for w in widths)
    _, blocks = vllm.block_configs(shrunk)
    assert [b["attention"]["no_op"] for b in blocks] == [False, True]
    no_mlp = depgraph.shrink(copy.deepcopy(model), depgraph.Plan.from_units(graph, {"block.1.mlp": [0]}))
    with pytest.raises(Exception, match="keeps attention but has no MLP"):  # llama.cpp's deci cannot say it
        gguf.plan(no_mlp)
    assert [b["ffn"]["no_op"] for b in vllm.block_configs(no_mlp)[1]] == [False, True, False]


def test_plans_that_cannot_be_removed_are_refused(traced):
    name, model, graph = traced
    n = model.config.num_hidden_layers
    with pytest.raises(PlanError, match="removes all"):
        depgraph.Plan.from_units(graph, {f"block.{i}": [0] for i in range(n)})
    with pytest.raises(PlanError, match="removes all"):  # every sub-block gone is every layer gone
        depgraph.Plan.from_units(graph, {f"block.{i}.{p}": [0] for i in range(n) for p in ("attention", "mlp")})
    with pytest.raises(PlanError, match="overlap"):
        depgraph.Plan.from_units(graph, {"block.1": [0], "block.1.mlp": [0]})
    width = next(g for g in graph.groups(("mlp", "experts")) if g.layer == 1)
    units = list(range(max(2, width.align)))  # fused expert neurons (grouped_mm) come in multiples of 8
    with pytest.raises(PlanError, match="inside removed block"):
        depgraph.Plan.from_units(graph, {"block.1.mlp": [0], width.id: units})


def test_from_scores_mixes_depth_and_width():
    model = BUILD["llama"]()
    graph = depgraph.trace(model)
    calib = ids(4, batch=4, length=16)
    width = depgraph.score(model, graph, calib, method="activation", kinds=("mlp", "attention"), progress=False)
    from depgraph.block_scores import score_blocks

    for method in ("influence", "loss"):
        blocks = score_blocks(model, graph, calib, method=method)
        assert set(blocks) == {g.id for g in graph.groups("block")}
        assert all(v.shape == (1,) and v[0] >= -1e-6 or method == "loss" for v in blocks.values())
    scores = {**width, **blocks}
    depth = depgraph.Plan.from_scores(graph, scores, 0.3, kinds=("block",))
    assert all(e.kind == "block" for e in depth.entries) and depth.entries
    mixed = depgraph.Plan.from_scores(graph, scores, 0.3, kinds=("block", "mlp", "attention"))
    assert {e.kind for e in mixed.entries} >= {"block", "mlp"}
    assert abs(mixed.params_removed() / graph.num_params - 0.3) < 0.03
    x = ids(5)
    masked = _logits(depgraph.mask(copy.deepcopy(model), mixed), x)
    torch.testing.assert_close(_logits(depgraph.shrink(copy.deepcopy(model), mixed, verify=True), x), masked,
                               rtol=0, atol=1e-5)


def test_prune_cli_mixes_depth_and_width(tmp_path, capsys):
    from depgraph.cli import main
    from test_evaluate import TEXT, _tiny_model
    from tiny import tiny_tokenizer

    folder = tmp_path / "tiny"
    tok = tiny_tokenizer()
    _tiny_model(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    (tmp_path / "calib.txt").write_text(TEXT)
    out = tmp_path / "pruned"
    rc = main(["prune", str(folder), "--target", "0.3", "--kinds", "block,mlp,attention", "--layers", "all",
               "--calib", str(tmp_path / "calib.txt"), "--n-samples", "4", "--seq-len", "16", "--round-to", "1",
               "--no-report", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["removed_blocks"] and report["block_method"] == "influence"
    loaded = depgraph.load_pruned(out)
    assert report["params_after"] == sum(p.numel() for p in loaded.parameters())


# -- refusals on hand-written models -----------------------------------------------------------------------
class ToyLayer(nn.Module):
    def __init__(self, kind: str, d: int, shared: nn.Module):
        super().__init__()
        self.kind, self.f, self.norm, self.shared = kind, nn.Linear(d, d), nn.LayerNorm(d), shared

    def forward(self, h):
        if self.kind == "sigmoid":  # sigmoid(0) = 0.5: no parameter zeroes the output
            return h + torch.sigmoid(self.f(h))
        if self.kind == "post-layernorm":  # LN(f(h)) with a bias: zero when the norm's weight and bias are
            return h + self.norm(self.f(h))
        if self.kind == "shared":  # the same linear in every layer: cannot be removed from one
            return h + self.shared(h)
        raise ValueError(self.kind)


class Toy(nn.Module):
    """Embedding, residual layers of ``kind``, a head."""

    def __init__(self, kind: str, layers: int = 2, d: int = 16):
        super().__init__()
        shared = nn.Linear(d, d)
        self.emb = nn.Embedding(VOCAB, d)
        self.layers = nn.ModuleList(ToyLayer(kind, d, shared) for _ in range(layers))
        self.head = nn.Linear(d, VOCAB)

    def forward(self, x):
        h = self.emb(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def test_post_layernorm_branch_masks_exactly():
    torch.manual_seed(0)
    model = Toy("post-layernorm").eval()
    graph = depgraph.trace(model, (ids(),))
    g = graph.group("block.0")  # one branch per layer: the layer block
    assert set(g.block["writes"]) == {"layers.0.norm.weight", "layers.0.norm.bias"}
    plan = depgraph.Plan.from_units(graph, {"block.0": [0]})
    x = ids(1)
    with torch.no_grad():
        masked = depgraph.mask(copy.deepcopy(model), plan)(x)
        shrunk = depgraph.shrink(copy.deepcopy(model), plan, verify=True)
        torch.testing.assert_close(shrunk(x), masked, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,reason", [("sigmoid", "sigmoid at layers."), ("shared", "is shared with code outside")])
def test_unprovable_blocks_are_refused_with_the_reason(kind, reason):
    torch.manual_seed(0)
    graph = depgraph.trace(Toy(kind).eval(), (ids(),))
    assert not graph.groups("block")
    assert graph.blocked_blocks and all(any(reason in r for r in b["reasons"]) for b in graph.blocked_blocks)
    assert all(b["module"].startswith("layers.") for b in graph.blocked_blocks)


def test_dropped_layers_alone_stay_stock_loadable(tmp_path):
    """Only whole layers removed: the config's layer count says it all, no modeling file is needed."""
    model = BUILD["gemma2"]()
    shrunk = depgraph.shrink(copy.deepcopy(model), depgraph.Plan.from_units(depgraph.trace(model), {"block.1": [0]}))
    assert shrunk.config.depgraph["uniform"]
    depgraph.save_pruned(shrunk, tmp_path / "out")
    assert not (tmp_path / "out" / "modeling_depgraph.py").exists()
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.num_hidden_layers == 2 and len(loaded.config.layer_types) == 2
    x = ids(6)
    torch.testing.assert_close(_logits(loaded, x), _logits(shrunk, x), rtol=0, atol=1e-6)
