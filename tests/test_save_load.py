"""save_pruned / load_pruned round trips; uniform plans load with stock from_pretrained."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import depgraph
from archs import ARCHS, ids
from depgraph import LoadError


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2", "opt"])
def test_non_uniform_round_trip(arch, tmp_path):
    model = ARCHS[arch]()
    graph = depgraph.trace(model)
    plan = depgraph.Plan.from_units(graph, {"mlp.0": [1, 5, 9], "attention.1": graph.group("attention.1").gqa and [0, 3] or [2]})
    shrunk = depgraph.shrink(copy.deepcopy(model), plan)
    assert shrunk.config.depgraph["uniform"] is False
    depgraph.save_pruned(shrunk, tmp_path / "m")
    loaded = depgraph.load_pruned(tmp_path / "m")
    x = ids()
    assert torch.equal(_logits(loaded, x), _logits(shrunk, x))
    shapes = {n: tuple(p.shape) for n, p in loaded.named_parameters()}
    assert shapes == {n: tuple(p.shape) for n, p in shrunk.named_parameters()}
    assert not any(p.device.type == "meta" for p in loaded.parameters())


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2", "llama-mha"])
def test_uniform_plan_loads_with_stock_from_pretrained(arch, tmp_path):
    model = ARCHS[arch]()
    graph = depgraph.trace(model)
    removals = {}
    for g in graph.groups(("attention", "mlp")):
        removals[g.id] = [0, 3] if g.gqa else ([1] if g.kind == "attention" else list(range(0, 64, 4)))
    plan = depgraph.Plan.from_units(graph, removals)
    shrunk = depgraph.shrink(copy.deepcopy(model), plan)
    assert shrunk.config.depgraph["uniform"] is True
    depgraph.save_pruned(shrunk, tmp_path / "m")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    x = ids()
    torch.testing.assert_close(_logits(stock, x), _logits(shrunk, x), rtol=0, atol=0)
    assert stock.config.intermediate_size == 48


def test_corrupted_folders_raise_load_error(tmp_path):
    model = ARCHS["llama-mha"]()
    graph = depgraph.trace(model)
    shrunk = depgraph.shrink(copy.deepcopy(model), depgraph.Plan.from_units(graph, {"mlp.0": [0, 1]}))
    good = tmp_path / "good"
    depgraph.save_pruned(shrunk, good)

    with pytest.raises(LoadError, match="no config.json"):
        depgraph.load_pruned(tmp_path / "nothing")

    import shutil
    no_weights = tmp_path / "no_weights"
    shutil.copytree(good, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(LoadError, match="no_weights: no weights"):
        depgraph.load_pruned(no_weights)

    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="cannot read safetensors"):
        depgraph.load_pruned(truncated)

    wrong_shape = tmp_path / "wrong_shape"
    shutil.copytree(good, wrong_shape)
    cfg = json.loads((wrong_shape / "config.json").read_text())
    cfg["depgraph"]["shapes"]["model.layers.0.mlp.up_proj.weight"] = [64, 48]
    (wrong_shape / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="model.layers.0.mlp.up_proj.weight"):
        depgraph.load_pruned(wrong_shape)


def test_record_is_versioned_and_read_with_defaults():
    from depgraph import record
    from depgraph.errors import LoadError

    assert record.read({})["modules"] == {} and record.read({"depgraph": {"format": 1}})["added_biases"] == []
    with pytest.raises(LoadError, match="format 99 is newer"):
        record.read({"depgraph": {"format": 99}}, "m/config.json")
    info = record.new()
    record.add_biases(info, ["b", "a"])
    record.add_biases(info, ["a"])
    record.set_module_attrs(info, "x", {"normalized_shape": (4,)})
    assert info["added_biases"] == ["a", "b"] and info["modules"] == {"x": {"normalized_shape": [4]}}


def write_tiny_gguf(path, vocab=64, hidden=32, layers=2, ffn=64, heads=4, kv=2, seed=0):
    """A float32 Llama GGUF written with the gguf package (llama.cpp's tensor names)."""
    import numpy as np
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_token_merges([])
    hd = hidden // heads

    def t(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", t(vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", t(vocab, hidden))
    for i in range(layers):
        for name, shape in (("attn_q", (heads * hd, hidden)), ("attn_k", (kv * hd, hidden)),
                            ("attn_v", (kv * hd, hidden)), ("attn_output", (hidden, heads * hd)),
                            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            w.add_tensor(f"blk.{i}.{name}.weight", t(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_stock_gguf_loaded_model_saves(tmp_path):
    """transformers refuses to save a model loaded with gguf_file= ("not serializable"); its weights are plain
    dequantized tensors, so save_pruned saves it, and the shrunk model loads back exactly."""
    write_tiny_gguf(tmp_path / "tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    assert model.hf_quantizer is not None
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "stock")
    graph = depgraph.trace(model)
    depgraph.shrink(model, depgraph.Plan.from_units(graph, {"mlp.0": [1, 2, 3], "attention.1": [0, 2]}))
    depgraph.save_pruned(model, tmp_path / "pruned")
    assert model.hf_quantizer is not None  # the user's model is left as it was
    assert "quantization_config" not in json.loads((tmp_path / "pruned" / "config.json").read_text())
    loaded = depgraph.load_pruned(tmp_path / "pruned")
    x = torch.tensor([[1, 5, 9, 2, 7]])
    assert torch.equal(_logits(loaded, x), _logits(model, x))
    assert loaded.model.layers[0].mlp.up_proj.out_features == 61


@pytest.fixture()
def pruned_pair(tmp_path):
    """Two folders of the same model pruned by two different (non-uniform) plans."""
    model = ARCHS["llama-gqa"]()
    graph = depgraph.trace(model)
    folders = []
    for name, units in (("a", [1, 5, 9]), ("b", [0, 2, 4, 6, 8])):
        shrunk = depgraph.shrink(copy.deepcopy(model), depgraph.Plan.from_units(graph, {"mlp.0": units}))
        folders.append(depgraph.save_pruned(shrunk, tmp_path / name))
    return folders


def _edit_config(folder, edit):
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_edited_head_dim_is_refused(pruned_pair):
    a, _ = pruned_pair
    _edit_config(a, lambda c: c.update(head_dim=c["head_dim"] // 2))
    with pytest.raises(LoadError, match=r"a/config.json: builds model.layers.\d.self_attn.q_proj.weight with shape "
                                        r".* edited after saving"):
        depgraph.load_pruned(a)


def test_recorded_attribute_contradicting_its_weight_is_refused(pruned_pair):
    a, _ = pruned_pair
    _edit_config(a, lambda c: c["depgraph"]["modules"]["model.layers.0.mlp.up_proj"].update(out_features=62))
    with pytest.raises(LoadError, match=r"model.layers.0.mlp.up_proj.out_features is 62 \(recorded in config.json\) "
                                        r"but its weight has shape \[61, 48\]"):
        depgraph.load_pruned(a)


def test_weights_of_another_plan_without_shapes_are_refused(pruned_pair):
    a, b = pruned_pair
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    _edit_config(a, lambda c: c["depgraph"].pop("shapes"))
    with pytest.raises(LoadError, match=r"model.layers.0.mlp.\w+_proj.\w+_features is 61 .* weight has shape"):
        depgraph.load_pruned(a)


def test_a_model_that_cannot_run_is_refused_by_the_probe(pruned_pair, monkeypatch):
    a, _ = pruned_pair
    from transformers.models.llama import modeling_llama

    def broken(self, *args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", broken)
    with pytest.raises(LoadError, match="a: the rebuilt model fails a one-token forward .*mat1 and mat2"):
        depgraph.load_pruned(a)


@pytest.mark.parametrize("case,message", [
    ("only_config", "no weights"),
    ("garbage_config", r"config.json: not valid JSON"),
    ("binary_config", r"config.json: not a text file"),
    ("not_a_config", r"config.json: not a Hugging Face model config"),
    ("truncated", r"model.safetensors: cannot read safetensors weights .*truncated"),
])
def test_broken_hf_folders_are_one_line(tmp_path, case, message):
    from depgraph.models import load_model

    folder = tmp_path / "m"
    ARCHS["llama-mha"]().save_pretrained(folder)
    weights = folder / "model.safetensors"
    if case == "only_config":
        weights.unlink()
    elif case == "garbage_config":
        (folder / "config.json").write_text("{'model_type': llama,")
    elif case == "binary_config":
        (folder / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    elif case == "not_a_config":
        (folder / "config.json").write_text("[1, 2, 3]")
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(LoadError, match=message) as info:
        load_model(folder)
    assert "\n" not in str(info.value)
