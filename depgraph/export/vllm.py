"""vLLM-ready export: a pruned Llama written in the DeciLM / Nemotron-NAS layout (``DeciLMForCausalLM``).

vLLM's nemotron_nas model builds every layer from ``config.block_configs[i]``: ``attention.no_op``,
``attention.n_heads_in_group`` (kv heads = ``num_attention_heads // n_heads_in_group``; query heads are one
count for all layers), ``ffn.no_op`` and ``ffn.intermediate_size`` (read when there is no ``ffn_mult``). The
folder ships ``configuration_decilm.py`` (auto_map AutoConfig) so ``vllm serve OUT --trust-remote-code`` parses
it, and ``modeling_decilm.py`` (depgraph's pruned-Llama class bound to that config) so transformers loads it too
(``trust_remote_code=True``).
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from .. import remote_code
from ..io import save_pruned
from .common import ExportError, check_llama_family, head_dim, layer_widths, new_folder

CONFIG_FILE = "configuration_decilm.py"
MODEL_FILE = "modeling_decilm.py"


def block_configs(model) -> tuple[int, list[dict]]:
    """(query heads, one block config per layer); raises ExportError for what vLLM's DeciLM cannot load."""
    if check_llama_family(model, "vLLM export") != "LlamaForCausalLM":
        raise ExportError(f"vLLM export: only LlamaForCausalLM is supported, got {type(model).__name__}")
    widths = layer_widths(model)
    heads = {w.heads for w in widths if w.heads}
    if len(heads) > 1:
        raise ExportError(f"vLLM export: query heads differ across layers ({sorted(heads)}); vLLM's DeciLM reads "
                          f"one num_attention_heads for every layer")
    (n_heads,) = heads or {model.config.num_attention_heads}
    blocks = []
    for i, w in enumerate(widths):
        if w.heads and (not w.kv or w.heads % w.kv):
            raise ExportError(f"vLLM export: layer {i} has {w.heads} query heads and {w.kv} kv heads")
        attention = {"no_op": not w.heads, "replace_with_linear": False,
                     "n_heads_in_group": w.heads // w.kv if w.heads else None}
        ffn = {"no_op": not w.ffn, "replace_with_linear": False, "intermediate_size": w.ffn or None}
        blocks.append({"attention": attention, "ffn": ffn})
    _check_biases(model)
    return n_heads, blocks


def _check_biases(model) -> None:
    """vLLM's layers take biases from config flags (attention_bias: q, k, v, o; mlp_bias: gate, up, down)."""
    cfg = model.config
    flags = {"self_attn": bool(getattr(cfg, "attention_bias", False)), "mlp": bool(getattr(cfg, "mlp_bias", False))}
    for name in model.state_dict():
        if name.endswith(".bias") and ".layers." in name:
            block = name.split(".")[3]
            if not flags.get(block, False):
                raise ExportError(f"vLLM export: {name} has no place in vLLM's DeciLM (its config has no bias flag "
                                  f"for that layer alone)")


def export_vllm(model, tokenizer, out) -> Path:
    """Write ``model`` (and ``tokenizer``) to the new folder ``out`` in the DeciLM layout; returns ``out``."""
    n_heads, blocks = block_configs(model)
    out = Path(out)
    with new_folder(out) as tmp:
        save_pruned(model, tmp, tokenizer=tokenizer)
        config = json.loads((tmp / "config.json").read_text())
        if not (tmp / remote_code.FILE).exists():  # uniform: transformers still needs the class for this config
            (tmp / remote_code.FILE).write_text(remote_code.render(type(model).__name__, "AutoModelForCausalLM"))
        for name in (CONFIG_FILE, MODEL_FILE):
            (tmp / name).write_text(resources.files("depgraph").joinpath(f"templates/{name}.in").read_text())
        config.update({
            "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "block_configs": blocks,
            "num_attention_heads": n_heads, "head_dim": head_dim(model.config),
            "num_key_value_heads": max((n_heads // b["attention"]["n_heads_in_group"] for b in blocks
                                        if b["attention"]["n_heads_in_group"]), default=n_heads),
            "intermediate_size": max((b["ffn"]["intermediate_size"] or 0) for b in blocks),
            "auto_map": {"AutoConfig": f"{CONFIG_FILE[:-3]}.DeciLMConfig",
                         "AutoModelForCausalLM": f"{MODEL_FILE[:-3]}.DeciLMForCausalLM"},
        })
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        with open(tmp / "README.md", "a") as f:
            f.write(SERVE.format(out=out.name))
    return out


SERVE = """
## Serve it with vLLM

This folder is in the DeciLM / Nemotron-NAS layout (`DeciLMForCausalLM`, per-layer `block_configs`):

```bash
vllm serve {out} --trust-remote-code          # or: python -c "from vllm import LLM; LLM('{out}', trust_remote_code=True)"
```
"""
