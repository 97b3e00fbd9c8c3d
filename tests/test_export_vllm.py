"""vLLM export: the DeciLM config carries exactly what vLLM's nemotron_nas model reads, and the weights fit it."""
import functools
import json

import pytest
import torch
import transformers as tf
from safetensors import safe_open

import depgraph
from depgraph.export import ExportError
from depgraph.export.vllm import export_vllm
from tiny import tiny_tokenizer


def _tiny():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg.use_cache = False
    return tf.LlamaForCausalLM(cfg).eval()


@functools.lru_cache(maxsize=None)
def _graph():
    return depgraph.trace(_tiny())  # traced once: every _tiny() has these groups


def _shrink(model, removals):
    return depgraph.shrink(model, depgraph.Plan.from_units(_graph(), removals))


def _vllm_layer_shapes(cfg, i):
    """The tensors vLLM's DeciLMDecoderLayer creates for layer i, from the config fields it reads."""
    block = cfg.block_configs[i]
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shapes = {}
    if not block.attention.no_op:
        kv = cfg.num_attention_heads // block.attention.n_heads_in_group
        shapes.update({"self_attn.q_proj.weight": [cfg.num_attention_heads * hd, cfg.hidden_size],
                       "self_attn.k_proj.weight": [kv * hd, cfg.hidden_size],
                       "self_attn.v_proj.weight": [kv * hd, cfg.hidden_size],
                       "self_attn.o_proj.weight": [cfg.hidden_size, cfg.num_attention_heads * hd],
                       "input_layernorm.weight": [cfg.hidden_size]})
    if not block.ffn.no_op:
        assert not hasattr(block.ffn, "ffn_mult")  # else vLLM rounds the width to a multiple of 256
        inter = block.ffn.intermediate_size
        shapes.update({"mlp.gate_proj.weight": [inter, cfg.hidden_size], "mlp.up_proj.weight": [inter, cfg.hidden_size],
                       "mlp.down_proj.weight": [cfg.hidden_size, inter],
                       "post_attention_layernorm.weight": [cfg.hidden_size]})
    return shapes


def test_non_uniform_llama_export_matches_vllm_fields_and_loads_in_transformers(tmp_path):
    model = _shrink(_tiny(), {"attention.0": [0, 2], "attention.1": [0, 2], "attention.2": [2, 3],
                              "mlp.1": list(range(0, 96, 3))})
    out = export_vllm(model, tiny_tokenizer(), tmp_path / "vllm")
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["DeciLMForCausalLM"] and raw["model_type"] == "nemotron-nas"
    assert [b["attention"]["n_heads_in_group"] for b in raw["block_configs"]] == [1, 1, 2]
    assert [b["ffn"]["intermediate_size"] for b in raw["block_configs"]] == [96, 64, 96]
    cfg = tf.AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert cfg.num_attention_heads == 2 and cfg.head_dim == 16 and cfg.num_hidden_layers == 3
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    expected = {f"model.layers.{i}.{k}": v for i in range(3) for k, v in _vllm_layer_shapes(cfg, i).items()}
    assert {k: v for k, v in stored.items() if ".layers." in k} == expected
    loaded = tf.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    x = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert "vllm serve" in (out / "README.md").read_text()


def test_uniform_llama_export_has_one_block_config_per_layer(tmp_path):
    model = _shrink(_tiny(), {f"mlp.{i}": list(range(16)) for i in range(3)})
    out = export_vllm(model, None, tmp_path / "vllm")
    cfg = tf.AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert [b.ffn.intermediate_size for b in cfg.block_configs] == [80, 80, 80]
    assert all(not b.attention.no_op and b.attention.n_heads_in_group == 2 for b in cfg.block_configs)


def test_vllm_export_refuses_what_deci_cannot_load(tmp_path):
    model = _shrink(_tiny(), {"attention.1": [0, 2]})  # 2 query heads in layer 1, 4 elsewhere
    with pytest.raises(ExportError, match="query heads differ across layers"):
        export_vllm(model, None, tmp_path / "a")
    with pytest.raises(ExportError, match="GPT2LMHeadModel is not supported"):
        export_vllm(tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2)), None, tmp_path / "b")
    biased = _tiny()
    biased.model.layers[0].mlp.down_proj.bias = torch.nn.Parameter(torch.zeros(64))
    with pytest.raises(ExportError, match="model.layers.0.mlp.down_proj.bias"):
        export_vllm(biased, None, tmp_path / "c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_vllm(_tiny(), None, tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
