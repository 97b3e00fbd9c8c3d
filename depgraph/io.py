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


def write_pruned(model, folder, tokenizer=None, extra_files: dict | None = None, report=None) -> None:
    """Write the model files into the existing folder ``folder`` (no atomicity: see :func:`save_pruned`)."""
    folder = Path(folder)
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "save_pretrained"):
        raise LoadError(f"save_pruned needs a transformers model, got {type(model).__name__}")
    config.depgraph = records.for_save(model, config_shapes(type(model), config))
    with _dense_quantizer_detached(model):
        # the state-dict names as they are (no conversion back to a legacy layout such as per-expert
        # checkpoints), so load_pruned and the modeling file find every tensor where the shrunk model keeps it
        model.save_pretrained(folder, safe_serialization=True, save_original_format=False)
    wrote_code = remote_code.write(folder, model)  # non-uniform: modeling file + auto_map for stock loading
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if report is None:  # the model card reads the run report: given, or the report.json among extra_files
        report = card.report_of(extra_files)
    (folder / "README.md").write_text(card.render(config, report, wrote_code))  # extra wins
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


def config_shapes(cls, config) -> dict | None:
    """{tensor: shape} of ``cls(config)`` built on the meta device (None when it does not build)."""
    try:
        with torch.device("meta"):
            twin = cls(config)
    except Exception:  # noqa: BLE001 - a model that cannot be rebuilt from its config alone
        return None
    return {n: list(t.shape) for n, t in twin.state_dict().items()}


def read_config(path) -> dict:
    """The JSON object in ``path/config.json``; raises :class:`LoadError` naming the file and what is wrong."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise LoadError(f"{path}: no config.json; not a model folder")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise LoadError(f"{file}: not a text file ({e.reason})") from e
    except ValueError as e:
        raise LoadError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise LoadError(f"{file}: not a Hugging Face model config (no model_type)")
    return data


def check_weights(path) -> list:
    """The weight files of the model folder ``path``, each safetensors header checked (a truncated file is named);
    raises :class:`LoadError` when there are none."""
    from safetensors import safe_open

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files and not list(path.glob("pytorch_model*.bin")):
        raise LoadError(f"{path}: no weights (*.safetensors or pytorch_model*.bin) beside config.json")
    for f in files:
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            raise LoadError(f"{f}: cannot read safetensors weights ({_first_line(e)}); truncated or corrupt?") from e
    return files


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _read_state(path: Path) -> dict:
    from safetensors.torch import load_file

    files = check_weights(path)
    if not files:
        raise LoadError(f"{path}: no *.safetensors weights in the folder")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file
            raise LoadError(f"{f}: cannot read safetensors weights ({_first_line(e)})") from e
    return state


def _check_config_shapes(path: Path, built: dict, info: dict) -> None:
    """The config builds the shapes it built when saved (an edited head_dim or width does not)."""
    if "config_shapes" not in info:  # saved before this record existed
        return
    want = {**info.get("shapes", {}), **info["config_shapes"]}
    for name, shape in built.items():
        if name in want and list(want[name]) != shape:
            raise LoadError(f"{path}/config.json: builds {name} with shape {shape}, the saved config built "
                            f"{list(want[name])}; was config.json edited after saving?")


def _check_modules(path: Path, model, info: dict) -> None:
    """Every module attribute that follows a tensor's shape (in/out features, ...) agrees with the tensor, recorded
    or not: a record of another plan, or weights of another plan, are refused."""
    from .shrink import MODULE_FIXERS

    recorded = info.get("modules", {})
    for mod_path, mod in model.named_modules():
        fix = next((f for pred, f in MODULE_FIXERS if pred(mod)), None)
        if fix is None or getattr(mod, "weight", None) is None:
            continue
        for k, v in fix(mod).items():
            have = getattr(mod, k, None)
            if _plain(have) != _plain(v):
                where = "recorded in config.json" if k in recorded.get(mod_path, {}) else "from config.json"
                raise LoadError(f"{path}: {mod_path}.{k} is {_plain(have)} ({where}) but its weight has shape "
                                f"{list(mod.weight.shape)} (implies {_plain(v)})")


def _plain(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def _probe(path: Path, model) -> None:
    """A one-token forward: a rebuilt model that cannot run is refused here, not at the user's first call."""
    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        return
    device = next(iter(model.parameters())).device
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    except Exception as e:  # noqa: BLE001 - any failure means the folder does not describe a working model
        raise LoadError(f"{path}: the rebuilt model fails a one-token forward ({type(e).__name__}: "
                        f"{_first_line(e)})") from e


def load_pruned(path, dtype=None, device="cpu"):
    """Rebuild a model saved by :func:`save_pruned` with its exact per-layer shapes.

    Everything the folder records is checked against the tensors before returning: the saved shapes, the shapes the
    config builds (an edited ``head_dim`` is refused), every module attribute that follows a weight's shape, and a
    one-token forward. Each failure is one :class:`LoadError` line naming the file or tensor."""
    import transformers
    from accelerate import init_empty_weights

    path = Path(path)
    raw = read_config(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"{path}/config.json: cannot be read ({_first_line(e)})") from e
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
    _check_config_shapes(path, {n: list(t.shape) for n, t in model.state_dict().items()}, info)
    skip_modules(model, info.get("skipped") or {})  # removed sub-blocks (depgraph.depth)
    for mod_path in list(info["added_biases"]) + list(info["modules"]):
        try:
            model.get_submodule(mod_path)
        except AttributeError as e:
            raise LoadError(f"{path}/config.json: records module {mod_path}, which {arch} does not have") from e
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
    _check_modules(path, model, info)
    if dtype is not None:
        model.to(dtype)
    model = model.to(device).eval()
    _probe(path, model)
    return model
