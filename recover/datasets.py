"""Local copies of the public evaluation data sets (no hub access needed).

The folder is resolved as: the ``data_dir`` argument, env var ``DEPGRAPH_DATA``,
``<repo root>/../shared/data``, ``./shared/data``.  Nothing is ever copied into the repo.

Perplexity texts follow LLM-Pruner (``LLMPruner/datasets/ppl_dataset.py``): the rows of
the split are joined with ``"\\n\\n"`` and tokenized once.  Note that LLM-Pruner's
``get_ptb`` loads ``ptb_text_only`` split **validation** (not test), so ``"ptb"`` here
means ``ptb.valid.txt``; ``"ptb-test"`` gives the test file for completeness.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DataNotFoundError",
    "PPL_DATASETS",
    "ZEROSHOT_FILES",
    "PplText",
    "resolve_data_dir",
    "DEFAULT_SPLITS",
    "ppl_text",
    "zeroshot_file",
    "load_jsonl",
]


class DataNotFoundError(FileNotFoundError):
    """The shared data folder or one of its files is missing."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The shared data folder (same search as calibration); raises :class:`DataNotFoundError`."""
    from depgraph.calibration import CalibrationError, shared_data_dir

    try:
        return shared_data_dir(data_dir).resolve()
    except CalibrationError as e:
        raise DataNotFoundError(str(e)) from None


def _need(path: Path) -> Path:
    if not path.exists():
        raise DataNotFoundError(f"expected data file {path} is missing")
    return path


@dataclass(frozen=True)
class PplText:
    dataset: str
    text: str
    source: str  # file path
    split: str
    note: str


def _wikitext2(root: Path) -> PplText:
    p = _need(root / "wikitext2" / "test_rows.json")
    rows = json.loads(p.read_text(encoding="utf-8"))
    return PplText("wikitext2", "\n\n".join(rows), str(p), "test",
                   "wikitext-2-raw-v1 test rows joined with '\\n\\n' (LLM-Pruner)")


def _ptb(root: Path, split: str) -> PplText:
    fname = {"validation": "ptb.valid.txt", "test": "ptb.test.txt"}[split]
    p = _need(root / "ptb" / fname)
    # HF ptb_text_only yields one stripped line per row as `sentence`
    sentences = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    return PplText("ptb" if split == "validation" else "ptb-test", "\n\n".join(sentences), str(p), split,
                   f"PTB {split} sentences joined with '\\n\\n' (LLM-Pruner get_ptb uses the validation split)")


PPL_DATASETS = ("wikitext2", "ptb", "ptb-test")


def ppl_text(dataset: str = "wikitext2", data_dir: str | os.PathLike | None = None) -> PplText:
    """The evaluation text of a perplexity data set (``wikitext2``, ``ptb``, ``ptb-test``)."""
    root = resolve_data_dir(data_dir)
    key = dataset.lower().replace("_", "-")
    if key in ("wikitext2", "wikitext-2", "wikitext"):
        return _wikitext2(root)
    if key in ("ptb", "ptb-valid", "ptb-validation"):
        return _ptb(root, "validation")
    if key == "ptb-test":
        return _ptb(root, "test")
    raise ValueError(f"unknown perplexity dataset {dataset!r}; choose one of {', '.join(PPL_DATASETS)}")


# zero-shot files: lm-eval task name -> {split: (format, relative path)}
# "hf" = datasets.save_to_disk folder (original HF fields), "jsonl" = llm-foundry {query, choices, gold}
ZEROSHOT_FILES: dict[str, dict[str, tuple[str, str]]] = {
    "boolq": {"validation": ("hf", "zeroshot/hf/boolq/none/validation")},
    "piqa": {"validation": ("hf", "zeroshot/hf/piqa/plain_text/validation")},
    "hellaswag": {"validation": ("hf", "zeroshot/hf/hellaswag/none/validation")},
    "winogrande": {"validation": ("hf", "zeroshot/hf/winogrande/winogrande_xl/validation")},
    "arc_easy": {
        "test": ("jsonl", "zeroshot/jsonl/arc_easy.jsonl"),
        "validation": ("hf", "zeroshot/hf/ai2_arc/ARC-Easy/validation"),
    },
    "arc_challenge": {
        "test": ("jsonl", "zeroshot/jsonl/arc_challenge.jsonl"),
        "validation": ("hf", "zeroshot/hf/ai2_arc/ARC-Challenge/validation"),
    },
    "openbookqa": {
        "test": ("jsonl", "zeroshot/jsonl/openbook_qa.jsonl"),
        "validation": ("hf", "zeroshot/hf/openbookqa/main/validation"),
    },
}
# the split lm-eval (and LLM-Pruner's tables) score each task on
DEFAULT_SPLITS = {
    "boolq": "validation",
    "piqa": "validation",
    "hellaswag": "validation",
    "winogrande": "validation",
    "arc_easy": "test",
    "arc_challenge": "test",
    "openbookqa": "test",
}


def zeroshot_file(task: str, split: str | None = None, data_dir: str | os.PathLike | None = None) -> tuple[str, Path]:
    """``(format, path)`` of a task's local copy; for ``hf`` the path is the ``.arrow`` file."""
    if task not in ZEROSHOT_FILES:
        raise ValueError(f"no local data for task {task!r}; known: {', '.join(ZEROSHOT_FILES)}")
    split = split or DEFAULT_SPLITS[task]
    if split not in ZEROSHOT_FILES[task]:
        raise ValueError(f"task {task!r} has no local {split!r} split; local: {', '.join(ZEROSHOT_FILES[task])}")
    fmt, rel = ZEROSHOT_FILES[task][split]
    p = resolve_data_dir(data_dir) / rel
    if fmt == "hf":
        arrows = sorted(_need(p).glob("data-*.arrow"))
        if not arrows:
            raise DataNotFoundError(f"no data-*.arrow file in {p}")
        if len(arrows) > 1:  # pragma: no cover - the shared copies are single-shard
            raise DataNotFoundError(f"{p} has {len(arrows)} arrow shards; expected one")
        return fmt, arrows[0]
    return fmt, _need(p)


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]
