"""Exports of (pruned) models to other runtimes: GGUF for llama.cpp (:mod:`.gguf`), the DeciLM /
Nemotron-NAS folder layout that vLLM serves (:mod:`.vllm`)."""
from .common import ExportError

__all__ = ["ExportError"]
