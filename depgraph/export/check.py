"""Check an exported GGUF against the transformers model it came from, in llama.cpp itself (llama-cpp-python).

``compare(model, gguf_path, ids)`` evaluates the same token ids in both runtimes and reports the largest logit
difference, whether the top-1 token agrees at every position, and whether greedy decoding of ``new_tokens``
tokens is identical (neither side stops at end-of-sequence).
"""
from __future__ import annotations

import time

import numpy as np
import torch


def open_llama(path, n_ctx: int = 512, threads: int | None = None, f32_cache: bool = False):
    """A llama.cpp context on ``path`` keeping every position's logits (needs ``llama_cpp``).

    ``f32_cache``: keep the KV cache in f32 (llama.cpp's default is f16) for an f32-exact comparison."""
    import llama_cpp

    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                           n_threads=threads, n_threads_batch=threads, seed=0, **cache)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] logits of llama.cpp on ``ids`` from an empty cache."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_greedy(llm, ids: list[int], new_tokens: int) -> list[int]:
    """``new_tokens`` greedy tokens from llama.cpp (argmax of the raw logits, no stopping)."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(new_tokens):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].float().numpy()


@torch.no_grad()
def hf_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    """``new_tokens`` greedy tokens from transformers with its KV cache (argmax, no stopping)."""
    out = model(torch.tensor([ids]), use_cache=True)
    past, toks = out.past_key_values, []
    for _ in range(new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        toks.append(nxt)
        out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return toks


def compare(model, llm, ids: list[int], new_tokens: int = 32) -> dict:
    """Logits and greedy tokens of ``model`` (transformers) and ``llm`` (llama.cpp) on the same ``ids``."""
    a, b = hf_logits(model, ids), llama_logits(llm, ids)
    ga, gb = hf_greedy(model, ids, new_tokens), llama_greedy(llm, ids, new_tokens)
    return {"positions": len(ids), "max_abs_diff": float(np.abs(a - b).max()),
            "logit_scale": float(np.abs(a).max()),
            "top1_equal_all": bool((a.argmax(-1) == b.argmax(-1)).all()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
            "greedy_equal": ga == gb, "greedy_hf": ga, "greedy_llama": gb}


def llama_decode_tps(llm, ids: list[int], new_tokens: int) -> float:
    """llama.cpp greedy decoding speed after prefilling ``ids``: tokens per second of the decode steps only."""
    llm.reset()
    llm.eval(ids)
    start = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return new_tokens / (time.perf_counter() - start)


@torch.no_grad()
def hf_decode_tps(model, ids: list[int], new_tokens: int) -> float:
    """transformers greedy decoding speed (KV cache) after prefilling ``ids``: decode steps only."""
    out = model(torch.tensor([ids]), use_cache=True)
    past = out.past_key_values
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(out.logits[:, -1:].argmax(-1), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return new_tokens / (time.perf_counter() - start)
