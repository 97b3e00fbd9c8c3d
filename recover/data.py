"""Instruction data for LoRA recovery: Alpaca-format examples, LLM-Pruner's prompt template and tokenisation.

Sources (:func:`load_examples`):

* a ``.json`` file holding a list of objects (or ``{"data": [...]}``/``{"train": [...]}``), or a ``.jsonl`` file
  with one object a line;
* ``"alpaca"`` / ``"alpaca-5000"``: the shared 5,000-example random subset of Alpaca
  (``<data dir>/alpaca/alpaca_5000_random_subset.json``, data dir resolved as in :mod:`recover.datasets`);
* a plain-text file (``.txt``, ``.raw``, ``.tokens``, ``.text``, ``.md``): one text example per paragraph (blank-line
  separated; one per line when the file has no blank lines) -- for self-distillation on your own text;
* ``"wikitext2"``: in-domain language-model text, the WikiText-2 **validation** file cut into consecutive windows of
  ``cutoff_len`` tokens (BOS first when the tokenizer adds one, as evaluation windows are), every token a label,
  v1's ``<unk>`` markers dropped (the raw test text has none); the test split, which ``recover.evaluate`` scores,
  is never read;
* ``"self"`` / ``"generated"``: text sampled from a model (the dense teacher when distilling), one text example per
  sample of ``cutoff_len`` tokens, ``limit`` samples (default 256) -- self-distillation with no data at all;
* anything else that is not a local path: a Hugging Face dataset name (LLM-Pruner's default is
  ``yahma/alpaca-cleaned``), loaded with ``datasets.load_dataset(name, split="train")`` -- needs the hub;
* an in-memory list of dicts;
* several sources joined with ``+`` (``"alpaca+wikitext2"``): the examples of each, one after the other (training
  shuffles them), ``limit`` applying to each part -- general instructions mixed with in-domain text.

Each example is an **instruction** example (``instruction``, optional ``input``, ``output``), a **text**
example (``text`` only -- plain language-model data, for self-distillation on calibration or generated text) or a
**token** example (``input_ids`` only: a window already tokenised, trained on as it is).

Tokenisation follows ``LLM-Pruner/post_training.py`` (``generate_and_tokenize_prompt``, ``train_on_inputs=False``):
the full prompt (template + output) is tokenised with truncation at ``cutoff_len``; an EOS is appended when the
sequence is shorter than ``cutoff_len`` and does not already end with it; the tokens of the user prompt (template
without the output) are replaced by ``-100`` in the labels.  The validation split is drawn like LLM-Pruner's
``train_test_split(test_size=val_size, shuffle=True, seed=42)``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from recover.datasets import DataNotFoundError, resolve_data_dir

__all__ = [
    "ALPACA_TEMPLATE",
    "ALPACA_SUBSET",
    "IGNORE_INDEX",
    "IN_DOMAIN_SOURCES",
    "MIX_SEPARATOR",
    "in_domain_text",
    "DataCollator",
    "TokenizedDataset",
    "build_datasets",
    "generate_prompt",
    "load_examples",
    "split_examples",
    "tokenize_example",
]

from depgraph.calibration import ALPACA_TEMPLATE as _CALIB_TEMPLATE  # noqa: E402
from depgraph.calibration import ALPACA_TEMPLATE_NO_INPUT as _CALIB_TEMPLATE_NO_INPUT  # noqa: E402
from depgraph.calibration import SELF_SOURCES, TEXT_SUFFIXES, looks_like_path, records_from_json  # noqa: E402

IGNORE_INDEX = -100

# LLM-Pruner/templates/alpaca.json (the Alpaca-LoRA template): one copy, shared with calibration
ALPACA_TEMPLATE = {
    "prompt_input": _CALIB_TEMPLATE,
    "prompt_no_input": _CALIB_TEMPLATE_NO_INPUT,
    "response_split": "### Response:",
}

ALPACA_SUBSET = "alpaca/alpaca_5000_random_subset.json"
_SHORTHANDS = {"alpaca", "alpaca-5000", "alpaca_5000"}
# in-domain LM text: data name -> depgraph.calibration built-in (a held-out split, never the one evaluation scores)
IN_DOMAIN_SOURCES = {"wikitext2": "wikitext2"}
MIX_SEPARATOR = "+"  # "alpaca+wikitext2": the examples of both sources


# ============================================================================ loading


def validate_examples(rows: Sequence[Any], where: str = "data") -> list[dict]:
    """Check every row is an instruction example or a text example; returns the rows as plain dicts."""
    if len(rows) == 0:
        raise ValueError(f"{where}: the data set is empty (no examples)")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: example {i} is a {type(row).__name__}, expected an object with "
                             f"'instruction'/'input'/'output' (or 'text') fields")
        if "instruction" not in row and "output" not in row and "input_ids" in row:
            ids = row["input_ids"]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids) or len(ids) < 2:
                raise ValueError(f"{where}: example {i} field 'input_ids' must be a list of at least 2 token ids")
            out.append({"input_ids": list(ids)})
            continue
        if "instruction" not in row and "output" not in row and "text" in row:
            if not isinstance(row["text"], str):
                raise ValueError(f"{where}: example {i} field 'text' must be a string")
            out.append({"text": row["text"]})
            continue
        missing = [k for k in ("instruction", "output") if row.get(k) is None]
        if missing:
            raise ValueError(f"{where}: example {i} is missing field(s) {', '.join(repr(m) for m in missing)} "
                             f"(has {', '.join(repr(k) for k in row) or 'no fields'}); Alpaca examples need "
                             f"'instruction' and 'output' ('input' optional), plain-text examples need 'text'")
        for k in ("instruction", "input", "output"):
            if row.get(k) is not None and not isinstance(row[k], str):
                raise ValueError(f"{where}: example {i} field {k!r} must be a string, got {type(row[k]).__name__}")
        out.append({"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]})
    return out


def _text_file_examples(path: Path) -> list[dict]:
    """One ``{"text"}`` example per blank-line separated paragraph of a text file (per line when it has none)."""
    import re

    text = path.read_text(encoding="utf-8", errors="replace").strip()  # leading/trailing blank lines: no break
    parts = re.split(r"\n\s*\n", text) if re.search(r"\n\s*\n", text) else text.splitlines()
    return [{"text": t.strip()} for t in parts if t.strip()]


def _generated_examples(model, tokenizer, n: int, seq_len: int, seed: int) -> list[dict]:
    """``n`` texts of ``seq_len`` tokens sampled from ``model`` (the same sampler as calibration's ``self``)."""
    from depgraph.calibration import load_calibration

    if model is None or tokenizer is None:
        raise ValueError("data source 'self' samples text from a model: pass model= (recover() uses the teacher "
                         "when distilling, else the pruned model) and a tokenizer")
    ids = load_calibration("self", tokenizer, n_samples=n, seq_len=seq_len, seed=seed, model=model)
    return [{"text": t} for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def in_domain_text(name: str, data_dir: str | os.PathLike | None = None) -> tuple[str, Path]:
    """``(text, file)`` of an in-domain source: the built-in calibration file (``"wikitext2"``: the validation
    split) laid out like the test text evaluation scores -- v1's ``<unk>`` markers, which the raw test text does not
    have, are dropped; the ``@-@`` escapes stay, as in the raw text."""
    from depgraph.calibration import BUILTIN_SOURCES, shared_data_dir

    path = shared_data_dir(data_dir) / BUILTIN_SOURCES[IN_DOMAIN_SOURCES[name]]
    if not path.is_file():
        raise DataNotFoundError(f"in-domain data {name!r}: file {path} is missing")
    return path.read_text(encoding="utf-8").replace(" <unk>", ""), path


def _window_examples(name: str, tokenizer, seq_len: int, data_dir) -> list[dict]:
    """One token example per consecutive ``seq_len``-token window of an in-domain text (BOS first when the
    tokenizer adds one, as evaluation windows are)."""
    from depgraph.calibration import bos_prefix, bos_windows

    if tokenizer is None:
        raise ValueError(f"data source {name!r} cuts text into token windows: pass tokenizer=")
    text, path = in_domain_text(name, data_dir)
    lines = text.splitlines(keepends=True)
    ids = [t for enc in tokenizer(lines, add_special_tokens=False)["input_ids"] for t in enc]
    windows = bos_windows(ids, int(seq_len), bos_prefix(tokenizer))
    if windows.shape[0] == 0:
        raise ValueError(f"{path}: {len(ids)} tokens, fewer than one window of {seq_len}")
    return [{"input_ids": w} for w in windows.tolist()]


def load_examples(source, data_dir: str | os.PathLike | None = None, limit: int | None = None, *, model=None,
                  tokenizer=None, seq_len: int = 256, seed: int = 0) -> list[dict]:
    """The validated examples of ``source`` (see the module docstring); ``limit`` keeps the first ones.

    A ``+``-joined source is each part's examples in turn (``limit`` per part).
    ``model``/``tokenizer``/``seq_len``/``seed`` are used only by the ``"self"`` source (``limit`` samples,
    default 256, of ``seq_len`` tokens); ``tokenizer``/``seq_len`` by ``"wikitext2"`` (windows of ``seq_len``)."""
    if isinstance(source, str) and MIX_SEPARATOR in source and not Path(source).expanduser().exists():
        parts = [p.strip() for p in source.split(MIX_SEPARATOR)]
        if not all(parts):
            raise ValueError(f"data {source!r}: an empty part between {MIX_SEPARATOR!r}; join sources like "
                             f"'alpaca+wikitext2'")
        return [row for p in parts for row in load_examples(p, data_dir, limit, model=model, tokenizer=tokenizer,
                                                              seq_len=seq_len, seed=seed)]
    if isinstance(source, (list, tuple)):
        rows, where = list(source), "data"
    else:
        s = str(source)
        path = Path(s).expanduser()
        if s.lower() in SELF_SOURCES:
            rows = _generated_examples(model, tokenizer, int(limit or 256), int(seq_len), seed)
            where = "self-generated text"
        elif s.lower() in IN_DOMAIN_SOURCES:
            rows = _window_examples(s.lower(), tokenizer, int(seq_len), data_dir)
            where = f"{s} (validation split)"
        elif path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
            rows, where = _text_file_examples(path), str(path)
        elif s.lower() in _SHORTHANDS:
            path = resolve_data_dir(data_dir) / ALPACA_SUBSET
            if not path.is_file():
                raise DataNotFoundError(f"the shared Alpaca subset {path} is missing")
            rows, where = records_from_json(path), str(path)
        elif path.is_file():
            rows, where = records_from_json(path), str(path)
        elif path.is_dir():
            try:
                from datasets import load_from_disk

                ds = load_from_disk(str(path))
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{path}: a folder but not a datasets.save_to_disk folder ({e})") from e
            if hasattr(ds, "keys"):
                ds = ds["train"]
            rows, where = [dict(r) for r in ds], str(path)
        elif looks_like_path(s):
            raise FileNotFoundError(f"no such data file: {s!r}")
        else:
            try:
                from datasets import load_dataset

                ds = load_dataset(s, split="train")
            except Exception as e:  # noqa: BLE001 - offline, unknown name, ...
                raise DataNotFoundError(
                    f"cannot load data {s!r}: not a local file and loading it as a Hugging Face dataset failed "
                    f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); give a JSON/JSONL path, 'alpaca' "
                    f"for the shared subset, or a hub dataset name when online") from e
            rows, where = [dict(r) for r in ds], s
    if limit is not None:
        rows = rows[:limit]
    return validate_examples(rows, where)


# ============================================================================ prompts and tokens


def generate_prompt(instruction: str, input: str | None = None, output: str | None = None) -> str:
    """LLM-Pruner's ``Prompter.generate_prompt`` with the Alpaca template."""
    if input:
        res = ALPACA_TEMPLATE["prompt_input"].format(instruction=instruction, input=input)
    else:
        res = ALPACA_TEMPLATE["prompt_no_input"].format(instruction=instruction)
    if output:
        res = f"{res}{output}"
    return res


def _tokenize(tokenizer, text: str, cutoff_len: int, add_eos: bool) -> list[int]:
    ids = list(tokenizer(text, truncation=True, max_length=cutoff_len, padding=False,
                         return_tensors=None)["input_ids"])
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and (not ids or ids[-1] != eos) and len(ids) < cutoff_len:
        ids.append(eos)
    return ids


def tokenize_example(example: dict, tokenizer, cutoff_len: int = 256, train_on_inputs: bool = False,
                     add_eos: bool = True) -> dict[str, list[int]]:
    """``{"input_ids", "attention_mask", "labels"}`` of one example; prompt tokens carry ``-100`` in labels."""
    if cutoff_len < 2:
        raise ValueError(f"cutoff_len must be >= 2 tokens (got {cutoff_len})")
    if "input_ids" in example and "instruction" not in example:
        ids = list(example["input_ids"])[:cutoff_len]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}
    if "text" in example and "instruction" not in example:
        ids = _tokenize(tokenizer, example["text"], cutoff_len, add_eos)
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}
    full = generate_prompt(example["instruction"], example.get("input"), example["output"])
    ids = _tokenize(tokenizer, full, cutoff_len, add_eos)
    labels = list(ids)
    if not train_on_inputs:
        user = generate_prompt(example["instruction"], example.get("input"))
        n_user = len(_tokenize(tokenizer, user, cutoff_len, add_eos=False))
        labels = [IGNORE_INDEX] * min(n_user, len(ids)) + labels[n_user:]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


class TokenizedDataset(torch.utils.data.Dataset):
    """A list of tokenised examples (what ``Trainer`` consumes)."""

    def __init__(self, items: list[dict[str, list[int]]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]

    def num_tokens(self) -> int:
        return sum(len(x["input_ids"]) for x in self.items)

    def num_label_tokens(self) -> int:
        return sum(sum(1 for t in x["labels"] if t != IGNORE_INDEX) for x in self.items)


class DataCollator:
    """Right-pads a batch to a multiple of ``pad_to_multiple_of``: pad id in ``input_ids``, 0 in the mask, -100 in
    the labels (what ``DataCollatorForSeq2Seq`` does in LLM-Pruner, without touching the tokenizer's pad token)."""

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int | None = 8):
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def for_tokenizer(cls, tokenizer, pad_to_multiple_of: int | None = 8) -> "DataCollator":
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(pad, pad_to_multiple_of)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        m = self.pad_to_multiple_of
        if m:
            n = (n + m - 1) // m * m
        ids = torch.full((len(features), n), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE_INDEX, dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"], dtype=torch.long)
            mask[i, :k] = torch.tensor(f.get("attention_mask", [1] * k), dtype=torch.long)
            labels[i, :k] = torch.tensor(f.get("labels", f["input_ids"]), dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def split_examples(examples: list, val_size: int | float = 0, seed: int = 42) -> tuple[list, list]:
    """``(train, val)``: a shuffled hold-out of ``val_size`` examples (an int, or a fraction in (0, 1))."""
    n = len(examples)
    if isinstance(val_size, float) and 0 < val_size < 1:
        n_val = max(1, int(round(n * val_size)))
    else:
        n_val = int(val_size)
    if n_val < 0:
        raise ValueError(f"val_size must be >= 0 (got {val_size})")
    if n_val == 0:
        return list(examples), []
    if n_val >= n:
        raise ValueError(f"val_size={val_size} leaves no training examples out of {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [examples[i] for i in range(n) if i not in val_idx]
    val = [examples[i] for i in order[:n_val]]
    return train, val


def build_datasets(source, tokenizer, cutoff_len: int = 256, val_size: int | float = 0, seed: int = 42,
                   limit: int | None = None, train_on_inputs: bool = False,
                   data_dir: str | os.PathLike | None = None,
                   model=None) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """Load ``source``, hold out ``val_size`` examples, tokenise both parts.  Returns ``(train, val or None)``.

    ``model`` samples the text of the ``"self"`` source (``cutoff_len`` tokens each)."""
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to build the recovery data")
    examples = load_examples(source, data_dir=data_dir, limit=limit, model=model, tokenizer=tokenizer,
                             seq_len=cutoff_len, seed=seed)
    train, val = split_examples(examples, val_size, seed)

    def tok(rows: Iterable[dict]) -> TokenizedDataset:
        return TokenizedDataset([tokenize_example(r, tokenizer, cutoff_len, train_on_inputs) for r in rows])

    train_ds = tok(train)
    if train_ds.num_label_tokens() == 0:
        raise ValueError(f"no training tokens left after masking prompts at cutoff_len={cutoff_len}: every "
                         f"response was truncated away; raise cutoff_len")
    return train_ds, (tok(val) if val else None)
