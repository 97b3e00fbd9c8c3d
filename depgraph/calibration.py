"""Calibration data for importance scoring.

``load_calibration(source, tokenizer, ...)`` returns a ``torch.LongTensor`` of shape
``[n_samples, seq_len]`` built from one of:

* a **text file** (any other extension): the whole text is tokenized once and
  ``n_samples`` windows of ``seq_len`` tokens are cut at seeded random offsets;
* an **Alpaca-style JSON or JSONL file** (``.json`` / ``.jsonl``): records with
  ``instruction`` / ``input`` / ``output`` are rendered with the Alpaca prompt
  template (the one Stanford Alpaca and LLM-Pruner's ``Prompter`` use), joined with
  blank lines, tokenized and windowed like a text file.  Records that carry a plain
  ``text`` field (and no ``instruction``) are used verbatim;
* a **built-in name** resolving to the local copies of public data sets
  (see :func:`shared_data_dir`):

  ========== ================================================ ==========================
  name       file                                             why this one
  ========== ================================================ ==========================
  alpaca     ``alpaca/alpaca_5000_random_subset.json``        recommended default
  ptb        ``ptb/ptb.test.txt``                             LLM-Pruner scores PTB on
                                                              the *validation* split (the
                                                              ``ptb`` set of
                                                              ``recover.evaluate`` and
                                                              ``depgraph eval``), so the
                                                              test file is held out; it
                                                              is the ``ptb-test`` set:
                                                              never score that after
                                                              calibrating on ``ptb``
  wikitext2  ``wikitext2/wiki.valid.tokens``                  only test/valid are local;
                                                              the test split is what we
                                                              score, so calibrate on
                                                              valid (v1 tokenized text,
                                                              ``<unk>`` kept, ``@-@``
                                                              style escapes undone)
  ========== ================================================ ==========================

* an **HF dataset name** (``"name"`` or ``"name:config"``), loaded with
  ``datasets.load_dataset(..., split="train", streaming=True)`` when online; offline it
  fails with a :class:`CalibrationError` saying so;
* ``"self"`` / ``"generated"``: data-free, sequences sampled from ``model`` itself (seeded, full
  distribution, all in one batch), each started from BOS (when the tokenizer has one) and a seeded
  random vocabulary token, then sampled at a temperature falling from 2 to 0.8 over the first 16
  tokens, special tokens never sampled (:class:`SelfSampling`).

Every bad input (missing file, empty file, too few tokens for one window, Alpaca
records missing fields, malformed JSON) raises :class:`CalibrationError`, which is a
``ValueError`` and names the file and the problem.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from depgraph.errors import DepgraphError

__all__ = [
    "CalibrationError",
    "CalibrationSet",
    "BUILTIN_SOURCES",
    "ALPACA_TEMPLATE",
    "ALPACA_TEMPLATE_NO_INPUT",
    "load_calibration",
    "load_calibration_set",
    "render_alpaca",
    "shared_data_dir",
    "looks_like_path",
    "PROTOCOLS",
    "bos_prefix",
    "bos_windows",
    "check_protocol",
    "SELF_SOURCES",
    "SelfSampling",
    "TEXT_SUFFIXES",
    "JSON_SUFFIXES",
    "records_from_json",
]


class CalibrationError(DepgraphError, ValueError):
    """Calibration data could not be built; the message names the source and the problem."""


ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

# name -> path relative to the shared data dir
BUILTIN_SOURCES: dict[str, str] = {
    "alpaca": "alpaca/alpaca_5000_random_subset.json",
    "ptb": "ptb/ptb.test.txt",
    "wikitext2": "wikitext2/wiki.valid.tokens",
}
# data-source names and file kinds, shared with recover.data (one place for both)
SELF_SOURCES = ("self", "generated")  # text sampled from the model itself: no data needed
TEXT_SUFFIXES = {".txt", ".raw", ".tokens", ".text", ".md"}  # plain-text files
JSON_SUFFIXES = {".json", ".jsonl"}  # Alpaca-style records

# How token windows start: "bos" puts the tokenizer's BOS in front of every window when the tokenizer adds one
# (lm-eval's convention: every rolling window is scored after a prefix token); "llm-pruner" cuts bare windows
# from the text tokenized once, as LLM-Pruner's PPL and calibration code do (only the first window gets a BOS).
PROTOCOLS = ("bos", "llm-pruner")


@dataclass
class CalibrationSet:
    """Calibration windows plus a note on where they came from."""

    input_ids: torch.Tensor  # LongTensor [n_samples, seq_len]
    source: str  # what the caller passed
    origin: str  # resolved file path, "hf:<name>" or "self-generated"
    kind: str  # "text" | "alpaca" | "hf" | "self"
    seed: int
    total_tokens: int | None = None  # tokens the windows were drawn from (None for "self")
    starts: list[int] = field(default_factory=list)  # window offsets (empty for "self")
    protocol: str = "bos"  # "bos": BOS first when the tokenizer adds one; "llm-pruner": bare windows

    @property
    def n_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])


def check_protocol(protocol: str) -> str:
    """``protocol`` if it is one of :data:`PROTOCOLS`; otherwise a one-line ``CalibrationError``."""
    if protocol not in PROTOCOLS:
        raise CalibrationError(f"unknown window protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return protocol


def bos_prefix(tokenizer) -> int | None:
    """The BOS id when ``tokenizer`` puts one in front of encoded text by default (LLaMA, Gemma), else None
    (GPT-2 and SmolLM2 tokenizers add nothing)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if ids and int(ids[0]) == int(bos) else None


def bos_windows(ids, window: int, bos: int | None) -> torch.Tensor:
    """Non-overlapping windows [n, window] of the token list ``ids``: each is ``bos`` then ``window - 1`` tokens
    (or ``window`` bare tokens when ``bos`` is None); a last partial window is dropped."""
    step = window - 1 if bos is not None else window
    t = torch.as_tensor(ids, dtype=torch.long)
    n = t.numel() // step
    body = t[: n * step].view(n, step)
    if bos is None:
        return body
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), body], dim=1)


# --------------------------------------------------------------------------- data dir


def looks_like_path(source) -> bool:
    """Is the data source ``source`` meant as a local path (not a built-in name or a hub dataset)? It exists, has
    a data-file suffix (:data:`TEXT_SUFFIXES`, :data:`JSON_SUFFIXES`), or is absolute / starts with ``.`` or ``~``;
    a bare ``org/name`` is a hub dataset. Shared by calibration and recovery data (``recover.data``)."""
    src = str(source)
    path = Path(src).expanduser()
    return (path.exists() or path.suffix.lower() in TEXT_SUFFIXES | JSON_SUFFIXES or Path(src).is_absolute()
            or src.startswith((".", "~")))


def shared_data_dir(data_dir: str | os.PathLike | None = None, *, must_exist: bool = True) -> Path:
    """Where the shared public data sets live.

    Order: the ``data_dir`` argument, env var ``DEPGRAPH_DATA``, ``<repo root>/../shared/data``,
    ``./shared/data``.  Raises :class:`CalibrationError` when ``must_exist`` and none exists.
    """
    candidates: list[Path] = []
    if data_dir is not None:
        candidates.append(Path(data_dir))
    elif os.environ.get("DEPGRAPH_DATA"):
        candidates.append(Path(os.environ["DEPGRAPH_DATA"]))
    else:
        repo_root = Path(__file__).resolve().parents[1]
        candidates += [repo_root.parent / "shared" / "data", Path.cwd() / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    if must_exist:
        raise CalibrationError(
            "shared data directory not found (tried "
            + ", ".join(str(c) for c in candidates)
            + "); set DEPGRAPH_DATA to the folder holding alpaca/, ptb/, wikitext2/"
        )
    return candidates[0]


# --------------------------------------------------------------------------- text sources


def render_alpaca(record: dict[str, Any]) -> str:
    """Alpaca prompt + response for one record (``input`` may be missing or empty)."""
    inp = record.get("input") or ""
    if str(inp).strip():
        prompt = ALPACA_TEMPLATE.format(instruction=record["instruction"], input=inp)
    else:
        prompt = ALPACA_TEMPLATE_NO_INPUT.format(instruction=record["instruction"])
    return prompt + str(record["output"])


def _detok_wikitext(text: str) -> str:
    # undo the v1 "tokenized" escapes; keep <unk> (there is no way to restore it)
    return text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"calibration file {path}: not UTF-8 text ({e})") from None


def records_from_json(path: Path) -> list[Any]:
    """The records of a ``.json`` (a list, or a dict holding one) or ``.jsonl`` file; one-line errors name it."""
    text = _read_text(path)
    if not text.strip():
        raise CalibrationError(f"calibration file {path} is empty")
    if path.suffix.lower() == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise CalibrationError(f"calibration file {path}, line {lineno}: invalid JSON ({e.msg})") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CalibrationError(f"calibration file {path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict):
        # tolerate {"data": [...]} / {"train": [...]} wrappers holding a single list
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
        else:
            data = [data]
    if not isinstance(data, list):
        raise CalibrationError(f"calibration file {path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _texts_from_records(records: Sequence[Any], path: Path) -> list[str]:
    if not records:
        raise CalibrationError(f"calibration file {path} holds no records")
    texts = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise CalibrationError(
                f"calibration file {path}, record {i}: expected an object with instruction/input/output, "
                f"got {type(rec).__name__}"
            )
        if "instruction" not in rec and isinstance(rec.get("text"), str):
            texts.append(rec["text"])
            continue
        missing = [k for k in ("instruction", "output") if k not in rec]
        if missing:
            raise CalibrationError(
                f"calibration file {path}, record {i}: missing Alpaca field(s) {', '.join(missing)} "
                f"(need instruction, output and optionally input; or a plain 'text' field); "
                f"record has {sorted(rec)}"
            )
        texts.append(render_alpaca(rec))
    return texts


def _file_texts(path: Path) -> tuple[list[str], str]:
    """Text pieces of one file (joined later with blank lines) and the kind of file."""
    if not path.exists():
        raise CalibrationError(f"calibration file {path} does not exist")
    if not path.is_file():
        raise CalibrationError(f"calibration source {path} is not a file")
    if path.suffix.lower() in JSON_SUFFIXES:
        return _texts_from_records(records_from_json(path), path), "alpaca"
    text = _read_text(path)
    if not text.strip():
        raise CalibrationError(f"calibration file {path} is empty")
    if path.name.startswith("wiki.") and path.suffix == ".tokens":
        text = _detok_wikitext(text)
    return [text], "text"


def _hf_texts(name: str, min_chars: int) -> list[str]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise CalibrationError(f"calibration source {name!r}: the 'datasets' package is needed ({e})") from None
    ds_name, _, config = name.partition(":")
    offline = _hub_unreachable()
    if offline:
        raise CalibrationError(
            f"calibration source {name!r} is not an existing local file or a built-in "
            f"({', '.join(sorted(BUILTIN_SOURCES))}, self) and cannot be loaded as a Hugging Face "
            f"dataset: {offline}"
        )
    try:
        ds = datasets.load_dataset(ds_name, config or None, split="train", streaming=True)
        texts, n_chars = [], 0
        for row in ds:
            col = "text" if "text" in row else next((k for k, v in row.items() if isinstance(v, str)), None)
            if col is None:
                raise CalibrationError(f"calibration source {name!r}: no text column in {sorted(row)}")
            t = row[col]
            if t and t.strip():
                texts.append(t)
                n_chars += len(t)
            if n_chars >= min_chars or len(texts) >= 20000:
                break
    except CalibrationError:
        raise
    except Exception as e:
        raise CalibrationError(
            f"calibration source {name!r} is not an existing local file or a built-in "
            f"({', '.join(sorted(BUILTIN_SOURCES))}, self) and could not be loaded as a Hugging Face "
            f"dataset (offline? {type(e).__name__}: {e})"
        ) from None
    if not texts:
        raise CalibrationError(f"calibration source {name!r}: the HF dataset's train split yielded no text")
    return texts


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the HF hub cannot be used right now (None when it looks reachable).

    Avoids ``datasets``' ~25 s of retries when there is no network."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return f"offline mode ({var} is set)"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy a direct probe proves nothing; let `datasets` try
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        return f"offline, {host} unreachable ({e})"
    return None


def _tokenize_pieces(tokenizer, pieces: Iterable[str]) -> list[int]:
    """Token ids of the pieces joined with blank lines, no special tokens.

    Encoded piecewise (records; long texts in ~20k-character line blocks) so fast tokenizers
    batch the work and no max-length warning fires; a merge across a block boundary can differ
    from encoding the joined text in one go, which does not matter for calibration."""
    ids: list[int] = []
    sep = "\n\n"
    pieces = list(pieces)
    # split very long single texts into line blocks so encoding stays linear and warning-free
    chunks: list[str] = []
    for i, p in enumerate(pieces):
        s = p if i == len(pieces) - 1 else p + sep
        if len(s) <= 20000:
            chunks.append(s)
            continue
        lines = s.splitlines(keepends=True)
        buf, n = [], 0
        for ln in lines:
            buf.append(ln)
            n += len(ln)
            if n >= 20000:
                chunks.append("".join(buf))
                buf, n = [], 0
        if buf:
            chunks.append("".join(buf))
    batch = 256
    for i in range(0, len(chunks), batch):
        enc = tokenizer(chunks[i : i + batch], add_special_tokens=False)["input_ids"]
        for e in enc:
            ids.extend(e)
    return ids


def _windows(ids: list[int], n_samples: int, seq_len: int, seed: int, origin: str,
             bos: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """``n_samples`` windows at seeded offsets; with ``bos`` each is BOS + ``seq_len - 1`` text tokens."""
    body = seq_len - 1 if bos is not None and seq_len >= 2 else seq_len
    if len(ids) < body:
        raise CalibrationError(
            f"calibration file {origin} has too few tokens for one window: {len(ids)} tokens < seq_len={seq_len}"
            + (f" (BOS + {body} text tokens)" if body < seq_len else "")
        )
    t = torch.tensor(ids, dtype=torch.long)
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, len(ids) - body + 1, (n_samples,), generator=g)
    out = torch.stack([t[s : s + body] for s in starts.tolist()])
    if body < seq_len:
        out = torch.cat([torch.full((n_samples, 1), int(bos), dtype=torch.long), out], dim=1)
    return out, starts.tolist()


# --------------------------------------------------------------------------- self-generated


@dataclass(frozen=True)
class SelfSampling:
    """How ``"self"`` calibration text is sampled from the model (seeded, model only, no data).

    Every sequence starts with the tokenizer's BOS when it has one (SmolLM2's is its chat marker ``<|im_start|>``)
    and a seeded random vocabulary token (LLM-QAT's diverse starts); each later token is sampled from the full
    distribution at a temperature that falls linearly from ``start_temperature`` to ``temperature`` over the first
    ``warmup`` tokens of the text (the schedule of Williams et al., "Self-calibration for language model
    quantization and pruning", NAACL 2025: hot first tokens spread the topics, cooler ones keep the text fluent).
    ``ban_special``: special tokens (end-of-turn, chat markers) are never sampled, so no sequence drifts into the
    chat template."""

    temperature: float = 0.8
    start_temperature: float = 2.0
    warmup: int = 16
    ban_special: bool = True

    def __post_init__(self):
        if not (self.temperature > 0 and self.start_temperature > 0 and self.warmup >= 0):
            raise CalibrationError(f"self sampling: temperatures must be > 0 and warmup >= 0, got {self}")

    def temperature_at(self, position: int) -> float:
        """The temperature of the text token at ``position`` (0: the random first token, BOS not counted)."""
        if position >= self.warmup:
            return self.temperature
        return self.start_temperature + position / self.warmup * (self.temperature - self.start_temperature)


def _cache_keyword(model) -> str:
    """The forward keyword of the KV cache: transformers >= 5.2x names it ``cache``, older versions
    ``past_key_values``."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        params = {}
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def _self_generate(model, tokenizer, n_samples: int, seq_len: int, seed: int,
                   sampling: SelfSampling | None = None) -> torch.Tensor:
    """[n_samples, seq_len] token ids sampled from ``model`` as :class:`SelfSampling` says, all sequences in one
    batch with the KV cache (one forward of n_samples tokens a step)."""
    sampling = sampling or SelfSampling()
    if model is None:
        raise CalibrationError("calibration source 'self' needs the model: load_calibration('self', tok, model=model)")
    try:
        device = next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        device = torch.device("cpu")
    vocab = len(tokenizer) if tokenizer is not None else None
    out_features = getattr(getattr(model, "config", None), "vocab_size", None)
    vocab = min(v for v in (vocab, out_features) if v) if (vocab or out_features) else None
    if not vocab:
        raise CalibrationError("calibration source 'self': cannot tell the vocabulary size from tokenizer or model")
    special = sorted(i for i in set(getattr(tokenizer, "all_special_ids", []) or []) if 0 <= i < vocab)
    allowed = torch.tensor([i for i in range(vocab) if i not in set(special)] or list(range(vocab)))
    banned = torch.tensor(special if sampling.ban_special and len(special) < vocab else [], dtype=torch.long)

    g = torch.Generator().manual_seed(int(seed))
    bos = getattr(tokenizer, "bos_token_id", None)
    first = allowed[torch.randint(0, len(allowed), (n_samples,), generator=g)].view(n_samples, 1)
    lead = 1 if bos is not None and seq_len >= 2 else 0  # the BOS column (not a text position)
    if lead:
        seqs = torch.cat([torch.full((n_samples, 1), int(bos), dtype=torch.long), first], dim=1)
    else:
        seqs = first
    seqs = seqs[:, :seq_len]
    cache_kw = _cache_keyword(model)

    was_training = model.training
    model.eval()
    try:
        past = None
        inp = seqs
        while seqs.shape[1] < seq_len:
            kwargs = {cache_kw: past} if past is not None else {}
            out = model(input_ids=inp.to(device), use_cache=True, **kwargs)
            past = out.get("cache", None) if hasattr(out, "get") else None
            if past is None:
                past = getattr(out, "past_key_values", None)
            logits = out.logits[:, -1, :vocab].float().cpu()
            logits[:, banned] = -float("inf")
            probs = torch.softmax(logits / sampling.temperature_at(seqs.shape[1] - lead), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=g)
            seqs = torch.cat([seqs, nxt], dim=1)
            inp = nxt if past is not None else seqs
    finally:
        model.train(was_training)
    return seqs.long()


# --------------------------------------------------------------------------- public API


def load_calibration_set(
    source: str | os.PathLike,
    tokenizer,
    n_samples: int = 32,
    seq_len: int = 64,
    seed: int = 0,
    model=None,
    data_dir: str | os.PathLike | None = None,
    protocol: str = "bos",
    sampling: SelfSampling | None = None,
) -> CalibrationSet:
    """Like :func:`load_calibration`, with provenance (resolved file, window offsets)."""
    check_protocol(protocol)
    if int(n_samples) < 1 or int(seq_len) < 1:
        raise CalibrationError(f"calibration: n_samples and seq_len must be >= 1 (got {n_samples}, {seq_len})")
    n_samples, seq_len = int(n_samples), int(seq_len)
    src = os.fspath(source)

    if src in SELF_SOURCES:
        ids = _self_generate(model, tokenizer, n_samples, seq_len, seed, sampling)
        return CalibrationSet(ids, src, "self-generated", "self", seed)

    path = Path(src).expanduser()
    is_path = looks_like_path(src)
    if not is_path and src in BUILTIN_SOURCES:
        path = shared_data_dir(data_dir) / BUILTIN_SOURCES[src]
        is_path = True
        if not path.exists():
            raise CalibrationError(f"built-in calibration source {src!r}: file {path} does not exist")

    if is_path:
        pieces, kind = _file_texts(path)
        origin = str(path)
    else:
        pieces = _hf_texts(src, min_chars=max(200_000, n_samples * seq_len * 16))
        kind, origin = "hf", f"hf:{src}"

    ids = _tokenize_pieces(tokenizer, pieces)
    if not ids:
        raise CalibrationError(f"calibration file {origin} tokenizes to no tokens")
    bos = bos_prefix(tokenizer) if protocol == "bos" else None
    windows, starts = _windows(ids, n_samples, seq_len, seed, origin, bos)
    return CalibrationSet(windows, src, origin, kind, seed, total_tokens=len(ids), starts=starts, protocol=protocol)


def load_calibration(
    source: str | os.PathLike,
    tokenizer,
    n_samples: int = 32,
    seq_len: int = 64,
    seed: int = 0,
    model=None,
    protocol: str = "bos",
    sampling: SelfSampling | None = None,
) -> torch.Tensor:
    """Calibration token windows, ``LongTensor [n_samples, seq_len]`` on the CPU.

    ``protocol="bos"`` (default) starts every window with the tokenizer's BOS when the tokenizer adds one
    (then ``seq_len - 1`` text tokens follow), as evaluation does; ``"llm-pruner"``: bare text windows.

    ``source``: a text file, an Alpaca-style ``.json`` / ``.jsonl`` file, a built-in name
    (``"alpaca"``, ``"ptb"``, ``"wikitext2"`` — local held-out files, see the module
    docstring), an HF dataset name (online only) or ``"self"`` / ``"generated"``
    (sampled from ``model`` as ``sampling`` says, default :class:`SelfSampling`).  Windows are drawn at
    offsets from ``torch.Generator`` seeded with ``seed`` (global RNG untouched), so the same arguments give
    the same tensor.  Raises :class:`CalibrationError` (a ``ValueError``) on bad input.
    """
    return load_calibration_set(source, tokenizer, n_samples, seq_len, seed, model, protocol=protocol,
                                sampling=sampling).input_ids
