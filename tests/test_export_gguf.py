"""GGUF export: read the written file back with gguf's reader and check keys, per-layer arrays and tensors."""
import copy
import functools

import numpy as np
import pytest
import torch
import transformers as tf
from gguf import GGUFReader, GGMLQuantizationType

import depgraph
from depgraph.export import ExportError
from depgraph.export.gguf import export_gguf, permute_rows
from tiny import tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:unknown BPE pre-tokenizer")


def _tiny(cls_name="LlamaForCausalLM", cfg_cls=tf.LlamaConfig, vocab=300, **kw):
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, **kw)
    cfg.use_cache = False
    return getattr(tf, cls_name)(cfg).eval()


def _field(reader, key):
    f = reader.fields[key]
    vals = [f.parts[i] for i in f.data]
    if len(vals) == 1 and not key.endswith(("head_count", "head_count_kv", "feed_forward_length")) or \
            f.types[0].name != "ARRAY":
        v = vals[0]
        return bytes(v).decode() if v.dtype == np.uint8 else v.tolist()[0]
    return [v.tolist()[0] for v in vals]


@functools.lru_cache(maxsize=None)
def _graph(vocab):
    return depgraph.trace(_tiny(vocab=vocab))  # every _tiny llama of this vocabulary has these groups


def _prune(model, removals):
    return depgraph.shrink(model, depgraph.Plan.from_units(_graph(model.config.vocab_size), removals))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_non_uniform_llama_is_written_as_deci_with_per_layer_arrays(tmp_path, tok):
    model = _prune(_tiny(vocab=len(tok)), {"mlp.1": list(range(0, 96, 3)), "attention.2": [0, 2]})
    out = export_gguf(model, tok, tmp_path / "m.gguf", outtype="f32")
    r = GGUFReader(out)
    assert _field(r, "general.architecture") == "deci"
    assert _field(r, "deci.feed_forward_length") == [96, 64, 96]
    assert _field(r, "deci.attention.head_count") == [4, 4, 2]
    assert _field(r, "deci.attention.head_count_kv") == [2, 2, 2]
    assert _field(r, "deci.attention.key_length") == 16
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    tensors = {t.name: t for t in r.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    # ggml lists dims innermost first: [in, out]
    assert list(tensors["blk.1.ffn_gate.weight"].shape) == [64, 64]
    assert list(tensors["blk.1.ffn_down.weight"].shape) == [64, 64]
    assert list(tensors["blk.2.attn_q.weight"].shape) == [64, 32]
    assert list(tensors["blk.2.attn_output.weight"].shape) == [32, 64]
    assert list(tensors["blk.0.ffn_up.weight"].shape) == [64, 96]
    sd = model.state_dict()
    q = tensors["blk.2.attn_q.weight"].data.reshape(32, 64)
    np.testing.assert_array_equal(q, permute_rows(sd["model.layers.2.self_attn.q_proj.weight"], 2).numpy())
    k = tensors["blk.0.attn_k.weight"].data.reshape(32, 64)
    np.testing.assert_array_equal(k, permute_rows(sd["model.layers.0.self_attn.k_proj.weight"], 2).numpy())
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight"].data.reshape(64, 64),
                                  sd["model.layers.1.mlp.down_proj.weight"].numpy())
    assert len(tensors) == 1 + 1 + 3 * 9


def test_uniform_llama_keeps_its_architecture_and_scalars(tmp_path, tok):
    model = _prune(_tiny(vocab=len(tok)), {f"mlp.{i}": list(range(0, 96, 3)) for i in range(3)})
    r = GGUFReader(export_gguf(model, tok, tmp_path / "m.gguf", outtype="f16"))
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "llama.feed_forward_length") == 64
    assert _field(r, "llama.attention.head_count") == 4
    tensors = {t.name: t for t in r.tensors}
    assert tensors["blk.0.ffn_up.weight"].tensor_type == GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32


def test_q8_0_quantizes_whole_blocks_and_falls_back_to_f16(tmp_path, tok):
    model = _prune(_tiny(vocab=len(tok)), {"mlp.1": list(range(8))})  # 88 neurons: down_proj rows of 88
    r = GGUFReader(export_gguf(model, tok, tmp_path / "m.gguf", outtype="q8_0"))
    tensors = {t.name: t for t in r.tensors}
    assert tensors["blk.0.ffn_down.weight"].tensor_type == GGMLQuantizationType.Q8_0
    assert tensors["blk.1.ffn_down.weight"].tensor_type == GGMLQuantizationType.F16  # 88 % 32 != 0


def test_qwen2_uniform_keeps_qwen2_and_biases_unpermuted(tmp_path, tok):
    model = _tiny("Qwen2ForCausalLM", tf.Qwen2Config, vocab=len(tok))
    r = GGUFReader(export_gguf(model, tok, tmp_path / "m.gguf"))
    assert _field(r, "general.architecture") == "qwen2"
    tensors = {t.name: t for t in r.tensors}
    np.testing.assert_array_equal(tensors["blk.0.attn_q.bias"].data,
                                  model.state_dict()["model.layers.0.self_attn.q_proj.bias"].numpy())


def test_chat_template_and_special_tokens_are_carried(tmp_path, tok):
    tok = copy.deepcopy(tok)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    r = GGUFReader(export_gguf(_tiny(vocab=len(tok)), tok, tmp_path / "m.gguf"))
    assert _field(r, "tokenizer.chat_template") == tok.chat_template
    assert _field(r, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert "tokenizer.ggml.merges" in r.fields


def test_unrepresentable_models_are_refused_before_writing(tmp_path, tok):
    with pytest.raises(ExportError, match="GPT2LMHeadModel is not supported"):
        export_gguf(tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2)), tok, tmp_path / "g.gguf")
    model = _tiny(vocab=len(tok))
    del model.model.layers[1].mlp.gate_proj, model.model.layers[1].mlp.up_proj, model.model.layers[1].mlp.down_proj
    with pytest.raises(ExportError, match="layer 1 keeps attention but has no MLP"):
        export_gguf(model, tok, tmp_path / "m.gguf")
    with pytest.raises(ExportError, match="outtype"):
        export_gguf(_tiny(vocab=len(tok)), tok, tmp_path / "m.gguf", outtype="q4_0")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_writes_gguf_and_vllm_and_refuses_bad_arguments(tmp_path, tok, capsys):
    from depgraph import cli

    model = _prune(_tiny(vocab=len(tok)), {"mlp.1": list(range(0, 96, 3))})
    depgraph.save_pruned(model, tmp_path / "pruned", tokenizer=tok)
    assert cli.main(["export", str(tmp_path / "pruned"), "--gguf", str(tmp_path / "m.gguf"), "--outtype", "q8_0",
                     "--vllm", str(tmp_path / "vllm")]) == 0
    out = capsys.readouterr().out
    assert "llama.cpp architecture deci, q8_0" in out and "vllm serve" in out
    assert _field(GGUFReader(tmp_path / "m.gguf"), "deci.feed_forward_length") == [96, 64, 96]
    assert (tmp_path / "vllm" / "configuration_decilm.py").is_file()
    assert cli.main(["export", str(tmp_path / "pruned")]) == 1
    assert cli.main(["export", str(tmp_path / "pruned"), "--vllm", str(tmp_path / "vllm")]) == 1
    err = capsys.readouterr().err
    assert "nothing to export" in err and "already exists" in err


def test_llama3_rope_writes_frequency_factors(tmp_path, tok):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    r = GGUFReader(export_gguf(_tiny(vocab=len(tok), rope_parameters=rope), tok, tmp_path / "m.gguf"))
    factors = {t.name: t for t in r.tensors}["rope_freqs.weight"].data
    assert factors.shape == (8,) and factors[0] == 1.0 and factors[-1] == 8.0  # high freqs kept, low ones / 8
    assert _field(r, "llama.rope.freq_base") == 500000.0
    with pytest.raises(ExportError, match="rope_type 'yarn'"):
        export_gguf(_tiny(vocab=len(tok), rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0,
                                                           "original_max_position_embeddings": 64}),
                    tok, tmp_path / "y.gguf")


def test_gguf_export_never_replaces_a_file_and_cleans_a_killed_runs_temporary(tmp_path):
    """An existing OUT file is refused untouched; a dead process's temporary beside OUT is removed by the next export."""
    from depgraph.export.common import ExportError, atomic_file

    out = tmp_path / "model.gguf"
    out.write_bytes(b"mine")
    with pytest.raises(ExportError, match="already exists"):
        with atomic_file(out):
            pass
    assert out.read_bytes() == b"mine"
    fresh = tmp_path / "new.gguf"
    stale = tmp_path / ".new.gguf.depgraph-tmp-999999999-abcd1234"  # no such pid: a killed export's leftover
    stale.write_bytes(b"half")
    with atomic_file(fresh) as tmp:
        assert tmp.parent == tmp_path and not stale.exists()
        tmp.write_bytes(b"gguf")
    assert fresh.read_bytes() == b"gguf" and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "new.gguf"]
