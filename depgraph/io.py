"""save_pruned / load_pruned: safetensors plus a config that records every per-layer shape.

A folder whose layers all have one shape carries a plain config that stock
``AutoModelForCausalLM.from_pretrained`` loads; any folder loads exactly with :func:`load_pruned`.
Folders are written through :mod:`depgraph.outdir` (a temporary sibling renamed into place), so nothing is lost on
failure and nothing the user did not ask to replace is replaced.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from . import card, remote_code
from . import record as records
from .depth import skip_modules
from .errors import LoadError
from .outdir import output_folder


def save_pruned(model, path, tokenizer=None, extra_files: dict | None = None, overwrite: bool = False,
                sources=()) -> Path:
    """Write ``model`` (and ``tokenizer``, and ``extra_files`` {name: text}) to the folder ``path`` atomically.

    Through :func:`depgraph.outdir.output_folder`: a non-empty ``path`` that depgraph did not write is refused unless
    ``overwrite``; ``path`` is never one of ``sources`` (the input model); it is replaced only once complete.
    """
    with output_folder(path, overwrite=overwrite, sources=sources) as tmp:
        write_pruned(model, tmp, tokenizer, extra_files)
    return Path(path)


def write_pruned(model, folder, tokenizer=None, extra_files: dict | None = None) -> None:
    """Write the model files into the existing folder ``folder`` (no atomicity: see :func:`save_pruned`)."""
    folder = Path(folder)
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "save_pretrained"):
        raise LoadError(f"save_pruned needs a transformers model, got {type(model).__name__}")
    config.depgraph = records.for_save(model)
    with _dense_quantizer_detached(model):
        # the state-dict names as they are (no conversion back to a legacy layout such as per-expert
        # checkpoints), so load_pruned and the modeling file find every tensor where the shrunk model keeps it
        model.save_pretrained(folder, safe_serialization=True, save_original_format=False)
    wrote_code = remote_code.write(folder, model)  # non-uniform: modeling file + auto_map for stock loading
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(card.render(config, card.report_of(extra_files), wrote_code))  # extra wins
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)


_QUANTIZER_ATTRS = ("hf_quantizer", "quantization_method", "_weight_conversions", "is_quantized")


@contextmanager
def _dense_quantizer_detached(model):
    """Save a model loaded through a quantizer whose weights are all plain floating tensors (stock GGUF loading
    dequantizes them) as the dense model it is: the quantizer is detached for the save and put back after."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        yield
        return
    packed = [n for n, t in model.state_dict().items() if not t.is_floating_point() or type(t) is not torch.Tensor]
    if packed:
        yield  # genuinely quantized: let transformers decide whether it serializes
        return
    saved = {a: getattr(model, a) for a in _QUANTIZER_ATTRS if a in vars(model)}
    config_q = model.config.__dict__.pop("quantization_config", None)
    for a in saved:
        delattr(model, a)
    model.is_quantized = False
    try:
        yield
    finally:
        if "is_quantized" not in saved:
            del model.is_quantized
        for a, v in saved.items():
            setattr(model, a, v)
        if config_q is not None:
            model.config.quantization_config = config_q


@contextmanager
def atomic_folder(path, overwrite: bool = False, sources=()):
    """Yield a temporary sibling folder of ``path`` to fill; on success it replaces ``path``, on any error ``path``
    is left as it was: :func:`depgraph.outdir.output_folder` (the one output-folder mechanism)."""
    with output_folder(path, overwrite=overwrite, sources=sources) as tmp:
        yield tmp


def _read_state(path: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LoadError(f"{path}: no *.safetensors weights in the folder")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file
            raise LoadError(f"{f}: cannot read safetensors weights ({e})") from e
    return state


def load_pruned(path, dtype=None, device="cpu"):
    """Rebuild a model saved by :func:`save_pruned` with its exact per-layer shapes."""
    import transformers
    from accelerate import init_empty_weights

    path = Path(path)
    if not (path / "config.json").is_file():
        raise LoadError(f"{path}: no config.json; not a saved model folder")
    try:
        raw = json.loads((path / "config.json").read_text())
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"{path}/config.json: cannot be read ({e})") from e
    info = records.read(raw, f"{path}/config.json")
    arch = (raw.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise LoadError(f"{path}/config.json: unknown architecture {arch!r}")
    state = _read_state(path)
    expected = info["shapes"]
    for name, shape in expected.items():
        if name in state and list(state[name].shape) != list(shape):
            raise LoadError(f"{path}: tensor {name} has shape {list(state[name].shape)}, config records {shape}")
    with init_empty_weights(include_buffers=False):
        model = cls(config)
    skip_modules(model, info.get("skipped") or {})  # removed sub-blocks (depgraph.depth)
    for mod_path in info["added_biases"]:  # biases added by compensation
        mod = model.get_submodule(mod_path)
        if getattr(mod, "bias", None) is None:
            mod.bias = torch.nn.Parameter(torch.empty(mod.out_features, device="meta"))
    for name, t in state.items():
        mod_name, _, attr = name.rpartition(".")
        try:
            mod = model.get_submodule(mod_name) if mod_name else model
        except AttributeError as e:
            raise LoadError(f"{path}: saved tensor {name} has no place in {arch}") from e
        if attr in mod._parameters and mod._parameters[attr] is not None:
            if tuple(mod._parameters[attr].shape) != tuple(t.shape):
                mod._parameters[attr] = torch.nn.Parameter(torch.empty(t.shape, device="meta", dtype=t.dtype))
        elif attr in mod._buffers:
            pass
        else:
            raise LoadError(f"{path}: saved tensor {name} has no place in {arch}")
    for mod_path, attrs in info["modules"].items():
        mod = model.get_submodule(mod_path)
        for k, v in attrs.items():
            setattr(mod, k, tuple(v) if isinstance(v, list) else v)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise LoadError(f"{path}: weights missing for {', '.join(still_meta[:5])}"
                        f"{' ...' if len(still_meta) > 5 else ''}")
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()
