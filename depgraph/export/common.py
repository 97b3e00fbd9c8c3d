"""What both exporters share: per-layer widths read from a Llama-family model's tensors, and atomic output."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import DepgraphError
from ..outdir import temporary_beside, usual_permissions


class ExportError(DepgraphError):
    """The model cannot be written in the requested format (the message says what and why)."""


# Llama-family decoder-layer tensors: role -> state-dict suffix inside model.layers.{i}
LAYER_TENSORS = {
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}
LLAMA_FAMILY = ("LlamaForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class LayerWidth:
    heads: int   # query heads (0: no attention sub-block)
    kv: int      # key/value heads
    ffn: int     # MLP intermediate size (0: no MLP sub-block)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_widths(model) -> list[LayerWidth]:
    """Each decoder layer's widths from its tensor shapes [out, in]; a missing sub-block counts as zero."""
    state = model.state_dict()
    hd = head_dim(model.config)
    widths = []
    for i in range(len(model.model.layers)):
        t = {role: state.get(f"model.layers.{i}.{suffix}") for role, suffix in LAYER_TENSORS.items()}
        heads = t["q"].shape[0] // hd if t["q"] is not None else 0
        kv = t["k"].shape[0] // hd if t["k"] is not None else 0
        ffn = t["gate"].shape[0] if t["gate"] is not None else 0
        widths.append(LayerWidth(heads, kv, ffn))
    return widths


def check_llama_family(model, what: str) -> str:
    arch = type(model).__name__
    if arch not in LLAMA_FAMILY:
        raise ExportError(f"{what}: {arch} is not supported (supported: {', '.join(LLAMA_FAMILY)})")
    if getattr(model.config, "use_sliding_window", False):
        raise ExportError(f"{what}: {arch} with use_sliding_window=True is not supported")
    return arch


@contextmanager
def atomic_file(path):
    """Yield a temporary path beside ``path``; on success it is renamed to ``path`` (0644 under umask 022), on
    failure removed, after a kill removed by the next export to the same place (depgraph.outdir's temporaries).
    An existing ``path`` is refused: nothing the user has is replaced."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise ExportError(f"{path} already exists; remove it or choose another file name")
    tmp = temporary_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def new_folder(path):
    """Yield a temporary folder beside ``path``, renamed to ``path`` on success; ``path`` must not exist yet
    (or be an empty folder), so nothing the user has is replaced. Temporaries as in :func:`atomic_file`."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ExportError(f"{path} already exists and is not an empty folder; choose a new output folder")
    tmp = temporary_beside(path)
    tmp.mkdir()
    try:
        yield tmp
        usual_permissions(tmp)
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
