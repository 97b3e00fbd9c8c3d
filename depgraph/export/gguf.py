"""GGUF export for llama.cpp with the ``gguf`` package's writer.

Uniform models keep their llama.cpp architecture (``llama``, ``qwen2``); a Llama-family model whose layers differ
is written as llama.cpp's ``deci`` architecture (Nemotron-NAS), whose loader reads per-layer arrays for
``{arch}.attention.head_count``, ``{arch}.attention.head_count_kv`` and ``{arch}.feed_forward_length``. In ``deci``
a layer with 0 heads has no attention sub-block (the residual passes through) and 0 FFN length skips the whole
layer, so a layer that keeps attention but drops its MLP cannot be represented and is refused.

Conventions follow llama.cpp's convert_hf_to_gguf.py: q/k rows permuted from Hugging Face's rotate-half order to
llama.cpp's interleaved RoPE pairs (``llama`` and ``deci``; ``qwen2`` uses NEOX RoPE and keeps the order),
1-D tensors in f32, the GPT-2-style BPE vocabulary with its merges, special tokens and chat template.
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .common import ExportError, LayerWidth, atomic_file, check_llama_family, head_dim, layer_widths

OUTTYPES = ("f32", "f16", "q8_0")


@dataclass(frozen=True)
class ArchSpec:
    uniform_arch: str       # llama.cpp architecture for uniform models
    permute_uniform: bool   # q/k rows to interleaved RoPE order in the uniform architecture


ARCHS = {
    "LlamaForCausalLM": ArchSpec("llama", True),
    "Qwen2ForCausalLM": ArchSpec("qwen2", False),
}
NON_UNIFORM_ARCH = "deci"  # interleaved RoPE: always permuted

# tokenizer.ggml.pre by the hash of the probe text's token ids (llama.cpp's convert_hf_to_gguf.py method)
PROBE = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
         '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
         '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
         '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's pre-tokenizer name for ``tokenizer`` ('default', with a warning, when unknown)."""
    digest = hashlib.sha256(str(tokenizer.encode(PROBE)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest)
    if name is None:
        warnings.warn(f"unknown BPE pre-tokenizer (probe hash {digest[:12]}); writing 'default': llama.cpp may "
                      f"split some texts differently", stacklevel=3)
    return name or "default"


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows [n_head * head_dim, ...] from rotate-half pairs (i, i + d/2) to interleaved pairs (2i, 2i + 1)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def plan(model) -> tuple[str, list[LayerWidth]]:
    """The llama.cpp architecture for ``model`` and its per-layer widths; raises ExportError if unrepresentable."""
    arch = check_llama_family(model, "GGUF export")
    widths = layer_widths(model)
    for i, w in enumerate(widths):
        if w.heads and not w.ffn:
            raise ExportError(f"GGUF export: layer {i} keeps attention but has no MLP; llama.cpp's deci "
                              f"architecture skips a whole layer whose FFN length is 0")
        if w.heads and (not w.kv or w.heads % w.kv):
            raise ExportError(f"GGUF export: layer {i} has {w.heads} query heads and {w.kv} kv heads; llama.cpp "
                              f"needs a whole number of query heads per kv head")
    if len(set(widths)) == 1 and widths[0].heads and widths[0].ffn:
        return ARCHS[arch].uniform_arch, widths
    return NON_UNIFORM_ARCH, widths


def _rope(config) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = {"rope_theta": getattr(config, "rope_theta", 10000.0), **(getattr(config, "rope_scaling", None) or {})}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ExportError(f"GGUF export: rope_type {kind!r} is not supported (default, linear, llama3)")
    return {**params, "rope_type": kind}


def _llama3_rope_factors(rope: dict, dim: int) -> torch.Tensor:
    """Per-frequency divisors for llama3 RoPE scaling (llama.cpp's rope_freqs tensor)."""
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _vocab(writer, tokenizer, vocab_size: int) -> None:
    """GPT-2-style BPE vocabulary, merges, special tokens and chat template (gguf's SpecialVocab)."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    model_type = json.loads(backend.to_str())["model"]["type"] if backend is not None else None
    if model_type != "BPE":
        raise ExportError(f"GGUF export: only byte-level BPE tokenizers are supported, got {model_type or 'a slow tokenizer'}")
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="depgraph-gguf-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)


def _tensor_data(t: torch.Tensor, outtype: str):
    """(numpy data, raw ggml type or None) for one tensor: 1-D stays f32; q8_0 falls back to f16 per tensor."""
    import gguf

    data = t.detach().to(torch.float32).cpu().numpy()
    if data.ndim <= 1 or outtype == "f32":
        return data, None
    if outtype == "q8_0":
        try:
            return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        except gguf.QuantError:
            pass  # rows not a multiple of the 32-value block
    return data.astype(np.float16), None


def export_gguf(model, tokenizer, path, outtype: str = "f32", name: str | None = None) -> Path:
    """Write ``model`` (a Llama-family transformers model, pruned or not) and ``tokenizer`` to ``path``.

    Returns the path. Raises :class:`ExportError` before writing anything when llama.cpp cannot represent it.
    """
    import gguf

    if outtype not in OUTTYPES:
        raise ExportError(f"GGUF export: outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if tokenizer is None:
        raise ExportError("GGUF export: the model has no tokenizer; llama.cpp needs one")
    arch, widths = plan(model)
    config = model.config
    rope = _rope(config)
    hd = head_dim(config)
    permute = arch == NON_UNIFORM_ARCH or ARCHS[type(model).__name__].permute_uniform
    state = model.state_dict()
    vocab_size = state["model.embed_tokens.weight"].shape[0]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], len(widths))
    uniform = arch != NON_UNIFORM_ARCH
    pick = (lambda xs: xs[0]) if uniform else list
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(name or Path(str(getattr(config, "_name_or_path", "") or "model")).name)
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_block_count(len(widths))
        w.add_feed_forward_length(pick([x.ffn for x in widths]))
        w.add_head_count(pick([x.heads for x in widths]))
        w.add_head_count_kv(pick([x.kv for x in widths]))
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_rope_dimension_count(hd)
        w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
        if rope["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        w.add_vocab_size(vocab_size)
        w.add_file_type(ftype)
        _vocab(w, tokenizer, vocab_size)
        if rope["rope_type"] == "llama3":
            w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                         _llama3_rope_factors(rope, hd).numpy())
        tied = getattr(config, "tie_word_embeddings", False)
        for key, t in state.items():
            if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                continue
            if permute and ("q_proj." in key or "k_proj." in key):
                layer = int(key.split(".")[2])
                t = permute_rows(t, widths[layer].heads if "q_proj." in key else widths[layer].kv)
            new = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise ExportError(f"GGUF export: no llama.cpp tensor name for {key}")
            data, raw = _tensor_data(t, outtype)
            w.add_tensor(new, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(path)
