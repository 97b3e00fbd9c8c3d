"""Offline evaluation: windowed perplexity and lm-eval zero-shot accuracy.

* :func:`perplexity` cuts the evaluation text into non-overlapping windows of ``window`` tokens
  (last partial window dropped); ppl = exp(mean next-token NLL over every predicted position of
  every window), the windows run ``batch_size`` at a time. Two protocols:

  - ``"bos"`` (default): when the tokenizer adds a BOS token (LLaMA, Gemma), every window is that
    BOS followed by ``window - 1`` text tokens (tokenized without special tokens), as lm-eval
    scores every rolling window after a prefix token; a model trained with a BOS in front is
    then scored the way it reads text. With a tokenizer that adds no BOS (GPT-2, SmolLM2) this
    is the same as ``"llm-pruner"``.
  - ``"llm-pruner"``: ``LLMPruner/evaluator/ppl.py`` + ``datasets/ppl_dataset.py``: the text is
    tokenized once with the tokenizer's default special tokens (one BOS at the very start) and
    cut into bare windows, for comparison with published tables.
* :func:`zero_shot` runs **lm-eval** on local copies of the seven LLM-Pruner tasks: task
  YAMLs mirroring lm-eval's own configs (same ``doc_to_text`` / ``doc_to_choice`` /
  ``doc_to_target`` / metrics, helper functions copied from the installed package) are
  written to a temp dir, pointed at the files under the shared data dir, loaded through
  ``lm_eval.tasks.TaskManager(include_path=...)`` and scored with ``simple_evaluate``.
* :func:`choice_loglikelihoods` is a tiny pure-torch re-implementation of lm-eval's
  ``loglikelihood`` for one context and several continuations, for checking by hand.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from recover.datasets import DEFAULT_SPLITS, ppl_text, zeroshot_file

__all__ = [
    "LM_EVAL_TASKS",
    "perplexity",
    "window_nll",
    "zero_shot",
    "choice_loglikelihoods",
    "task_configs",
]

LM_EVAL_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
TASK_PREFIX = "depgraph_"


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


# ============================================================================ perplexity


def perplexity(
    model,
    tokenizer,
    dataset: str = "wikitext2",
    window: int = 128,
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    *,
    text: str | None = None,
    progress: bool = True,
    protocol: str = "bos",
) -> dict[str, Any]:
    """Perplexity on non-overlapping ``window``-token windows (``protocol``: ``"bos"`` or ``"llm-pruner"``,
    see the module docstring).

    ``dataset``: ``"wikitext2"`` (raw test split), ``"ptb"`` (validation split, as
    LLM-Pruner's ``get_ptb``) or ``"ptb-test"``; or pass ``text=`` to score any string
    (``dataset`` is then only a label).  ``limit``: at most this many windows (the first
    ones).  Returns ``{"dataset", "ppl", "window", "tokens", "windows", "source", ...}``
    where ``tokens`` counts the whole tokenized text and ``windows`` the windows scored.
    """
    from depgraph.calibration import bos_prefix, bos_windows, check_protocol

    check_protocol(protocol)
    if window < 2:
        raise ValueError(f"perplexity: window must be >= 2 tokens (got {window})")
    if text is None:
        pt = ppl_text(dataset, data_dir)
        text, source, split, note = pt.text, pt.source, pt.split, pt.note
        dataset = pt.dataset
    else:
        source, split, note = "<text>", None, "text passed by the caller"

    bos = bos_prefix(tokenizer) if protocol == "bos" else None
    ids = tokenizer(text, add_special_tokens=bos is None, verbose=False)["input_ids"]
    n_tokens = len(ids)
    all_windows = bos_windows(ids, window, bos)
    n_avail = int(all_windows.shape[0])
    n_windows = n_avail if limit is None else max(0, min(n_avail, int(limit)))
    if n_windows == 0:
        raise ValueError(
            f"perplexity on {dataset!r}: no full window of {window} tokens to score "
            f"({n_tokens} tokens, limit={limit})"
        )
    windows = all_windows[:n_windows]

    device = _model_device(model)
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    count = 0
    try:
        from tqdm.auto import tqdm

        starts = range(0, n_windows, batch_size)
        with torch.inference_mode():
            for s in tqdm(starts, desc=f"ppl {dataset} w={window}", disable=not progress, leave=False):
                batch = windows[s : s + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits  # (B, W, V)
                loss, n = window_nll(logits, batch)
                nll_sum += loss
                count += n
    finally:
        model.train(was_training)

    mean_nll = nll_sum / count
    return {
        "dataset": dataset,
        "ppl": math.exp(mean_nll),
        "window": int(window),
        "tokens": n_tokens,
        "windows": int(n_windows),
        "windows_available": int(n_avail),
        "predicted_tokens": int(count),
        "mean_nll": mean_nll,
        "limit": limit,
        "split": split,
        "source": source,
        "protocol": protocol,
        "bos": bos,
        "protocol_note": (f"every window: BOS id {bos} + {window - 1} text tokens; " if bos is not None else
                          "LLM-Pruner PPLMetric, bare windows; " if protocol == "llm-pruner" else
                          "tokenizer adds no BOS: bare windows (same as llm-pruner); ")
        + note + f"; non-overlapping {window}-token windows, last partial dropped",
    }


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """(summed next-token NLL, predicted positions) of windows ``ids`` (B, W) under ``logits`` (B, W, V).

    The last position predicts nothing: its label is ``ignore_index`` rather than the logits being sliced, so the
    (B*W, V) logits are read in place (no copy of a non-contiguous slice; a float32 model's ``.float()`` is a no-op).
    """
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return float(loss.double()), ids.shape[0] * (ids.shape[1] - 1)


# ============================================================================ hand check


@torch.no_grad()
def choice_loglikelihoods(model, tokenizer, context: str, choices: Sequence[str]) -> list[float]:
    """Sum of log-probs of each continuation given ``context``, as lm-eval's HFLM computes it.

    Mirrors ``lm_eval.api.model.TemplateLM._encode_pair``: trailing whitespace of the
    context moves onto the continuation, ``whole = encode(context + continuation)``,
    ``ctx = encode(context)`` and the continuation tokens are ``whole[len(ctx):]``
    (``tokenizer.encode`` with its default special tokens, like HFLM's ``tok_encode``).
    The model sees ``(ctx + cont)[:-1]``; no truncation (keep inputs short).
    """
    device = _model_device(model)
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for choice in choices:
            ctx, cont = context, choice
            n_sp = len(ctx) - len(ctx.rstrip())
            if n_sp:
                cont = ctx[-n_sp:] + cont
                ctx = ctx[:-n_sp]
            if ctx:
                whole = tokenizer.encode(ctx + cont)
                ctx_enc = tokenizer.encode(ctx)
                cont_enc = whole[len(ctx_enc) :]
            else:  # lm-eval: empty context -> prefix token (BOS, else EOS)
                cont_enc = tokenizer.encode(cont, add_special_tokens=False)
                prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
                ctx_enc = [prefix]
            inp = torch.tensor([(ctx_enc + cont_enc)[:-1]], device=device)
            logp = torch.log_softmax(model(input_ids=inp, use_cache=False).logits[0].float(), dim=-1)
            n = len(cont_enc)
            tgt = torch.tensor(cont_enc, device=device)
            out.append(float(logp[-n:].gather(1, tgt[:, None]).sum()))
    finally:
        model.train(was_training)
    return out


# ============================================================================ zero-shot

# Templates copied from lm-eval 0.4.13's own task YAMLs (tests/test_evaluate.py checks they
# still match the installed package).  ``hf`` = original HF fields (save_to_disk arrow
# file), ``jsonl`` = llm-foundry {query, choices, gold} copies (ARC/OBQA *test* splits).
_TEMPLATES: dict[tuple[str, str], dict[str, Any]] = {
    ("boolq", "hf"): {
        # lm-eval's super_glue boolq uses `label`; the local copy (HF `boolq`) has bool `answer`
        "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
        "doc_to_target": "{{answer|int}}",
        "doc_to_choice": ["no", "yes"],
        "metrics": ["acc"],
        "upstream": ("super_glue/boolq/default.yaml", {"doc_to_target": "label"}),
    },
    ("piqa", "hf"): {
        "doc_to_text": "Question: {{goal}}\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": "{{[sol1, sol2]}}",
        "metrics": ["acc", "acc_norm"],
        "upstream": ("piqa/piqa.yaml", {}),
    },
    ("hellaswag", "hf"): {
        "process_docs": ("hellaswag/utils.py", "process_docs"),
        "doc_to_text": "{{query}}",
        "doc_to_target": "{{label}}",
        "doc_to_choice": "choices",
        "metrics": ["acc", "acc_norm"],
        "upstream": ("hellaswag/hellaswag.yaml", {}),
    },
    ("winogrande", "hf"): {
        "doc_to_text": ("winogrande/preprocess_winogrande.py", "doc_to_text"),
        "doc_to_target": ("winogrande/preprocess_winogrande.py", "doc_to_target"),
        "doc_to_choice": ("winogrande/preprocess_winogrande.py", "doc_to_choice"),
        "metrics": ["acc"],
        "upstream": ("winogrande/default.yaml", {}),
    },
    ("arc_easy", "hf"): {
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{choices.label.index(answerKey)}}",
        "doc_to_choice": "{{choices.text}}",
        "metrics": ["acc", "acc_norm"],
        "upstream": ("arc/arc_easy.yaml", {}),
    },
    ("openbookqa", "hf"): {
        "doc_to_text": "question_stem",
        "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
        "doc_to_choice": "{{choices.text}}",
        "metrics": ["acc", "acc_norm"],
        "upstream": ("openbookqa/openbookqa.yaml", {}),
    },
    # jsonl (test split): query already holds "Question: <question>" (ARC) / the stem (OBQA),
    # so the rendered context is identical to lm-eval's template on the HF fields
    ("arc_easy", "jsonl"): {
        "doc_to_text": "{{query}}\nAnswer:",
        "doc_to_target": "gold",
        "doc_to_choice": "choices",
        "metrics": ["acc", "acc_norm"],
    },
    ("openbookqa", "jsonl"): {
        "doc_to_text": "{{query}}",
        "doc_to_target": "gold",
        "doc_to_choice": "choices",
        "metrics": ["acc", "acc_norm"],
    },
}
_TEMPLATES[("arc_challenge", "hf")] = dict(_TEMPLATES[("arc_easy", "hf")], upstream=("arc/arc_easy.yaml", {}))
_TEMPLATES[("arc_challenge", "jsonl")] = dict(_TEMPLATES[("arc_easy", "jsonl")])


def _lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def _yaml_scalar(v: Any) -> str:
    import json

    return json.dumps(v, ensure_ascii=False)  # JSON strings/lists are valid YAML flow scalars


def task_configs(
    tasks: Sequence[str] = LM_EVAL_TASKS,
    data_dir: str | os.PathLike | None = None,
    splits: Mapping[str, str] | None = None,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, dict[str, Any]]:
    """Write the local task YAMLs into ``out_dir`` (a new temp dir when None).

    Returns ``{task: {"name", "yaml", "split", "format", "data_file"}}``; the dir is
    ``Path(result[task]["yaml"]).parent``.
    """
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="depgraph_lm_eval_"))
    out.mkdir(parents=True, exist_ok=True)
    src_tasks = _lm_eval_tasks_dir()
    info: dict[str, dict[str, Any]] = {}
    for task in tasks:
        if task not in DEFAULT_SPLITS:
            raise ValueError(f"zero_shot: unsupported task {task!r}; supported: {', '.join(LM_EVAL_TASKS)}")
        split = (splits or {}).get(task, DEFAULT_SPLITS[task])
        fmt, data_file = zeroshot_file(task, split, data_dir)
        tpl = _TEMPLATES[(task, fmt)]
        name = TASK_PREFIX + task
        lines = [
            f"task: {name}",
            f"dataset_path: {'arrow' if fmt == 'hf' else 'json'}",
            "dataset_kwargs:",
            "  data_files:",
            f"    {split}: {_yaml_scalar(str(data_file))}",
            "output_type: multiple_choice",
            "training_split: null",
            f"validation_split: {split if split == 'validation' else 'null'}",
            f"test_split: {split if split == 'test' else 'null'}",
        ]
        for key in ("process_docs", "doc_to_text", "doc_to_target", "doc_to_choice"):
            if key not in tpl:
                continue
            v = tpl[key]
            if isinstance(v, tuple):  # (file in lm_eval/tasks, function): copy the helper verbatim
                rel, fn = v
                src = src_tasks / rel
                if not src.exists():
                    raise RuntimeError(f"lm-eval helper {src} not found; is lm-eval 0.4.x installed?")
                mod = f"{name}_{Path(rel).stem}"
                shutil.copyfile(src, out / f"{mod}.py")
                lines.append(f"{key}: !function {mod}.{fn}")
            else:
                lines.append(f"{key}: {_yaml_scalar(v)}")
        lines.append("metric_list:")
        for m in tpl["metrics"]:
            lines += [f"  - metric: {m}", "    aggregation: mean", "    higher_is_better: true"]
        lines += ["metadata:", "  version: 1.0", ""]
        yml = out / f"{name}.yaml"
        yml.write_text("\n".join(lines), encoding="utf-8")
        info[task] = {"name": name, "yaml": str(yml), "split": split, "format": fmt, "data_file": str(data_file)}
    return info


def zero_shot(
    model,
    tokenizer,
    tasks: Sequence[str] = LM_EVAL_TASKS,
    limit: int | float | None = None,
    data_dir: str | os.PathLike | None = None,
    num_fewshot: int = 0,
    batch_size: int = 8,
    *,
    splits: Mapping[str, str] | None = None,
    return_samples: bool = False,
    max_length: int | None = None,
    seed: int = 1234,
) -> dict[str, Any]:
    """Zero-/few-shot accuracy through lm-eval, offline, on the local data copies.

    Splits default to the ones lm-eval and LLM-Pruner's tables use: validation for
    BoolQ/PIQA/HellaSwag/WinoGrande, **test** for ARC-e/ARC-c/OBQA (jsonl copies); pass
    ``splits={"arc_easy": "validation", ...}`` to score the local HF validation copies.
    ``limit``: first N docs per task (lm-eval semantics; a float < 1 is a fraction).
    Returns ``{"tasks": {task: {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n"}},
    "lm_eval_version", "num_fewshot", "limit", "split": {task: split}, "data": {task: file}}``
    plus ``"samples"`` (``{task: [{"doc_id", "target", "loglikelihoods", "pred", "acc",
    "requests"}]}``) when ``return_samples``.  ``acc_norm`` is None for tasks whose lm-eval
    config has no acc_norm (BoolQ, WinoGrande).  Side effects: lm-eval seeds python/numpy/
    torch RNGs with ``seed``; the model is put in eval mode and restored afterwards.
    """
    import logging

    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = list(tasks)
    was_training = model.training
    tmp = tempfile.mkdtemp(prefix="depgraph_lm_eval_")
    prev_level = logging.getLogger("lm_eval").level
    try:
        info = task_configs(tasks, data_dir=data_dir, splits=splits, out_dir=tmp)
        tm = TaskManager(include_path=tmp, include_defaults=False)
        # HFLM sets a pad token on the tokenizer it gets: give it a copy
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size, max_length=max_length)
        if logging.getLogger("lm_eval").level == logging.NOTSET:
            logging.getLogger("lm_eval").setLevel(logging.WARNING)
        res = simple_evaluate(
            model=lm,
            tasks=[info[t]["name"] for t in tasks],
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=tm,
            log_samples=return_samples,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        logging.getLogger("lm_eval").setLevel(prev_level)
        model.train(was_training)
        shutil.rmtree(tmp, ignore_errors=True)

    out_tasks: dict[str, dict[str, Any]] = {}
    for t in tasks:
        r = res["results"][info[t]["name"]]
        n = res.get("n-samples", {}).get(info[t]["name"], {})

        def get(key):
            v = r.get(key)
            return None if v in (None, "N/A") else float(v)

        out_tasks[t] = {
            "acc": get("acc,none"),
            "acc_norm": get("acc_norm,none"),
            "acc_stderr": get("acc_stderr,none"),
            "acc_norm_stderr": get("acc_norm_stderr,none"),
            "n": n.get("effective"),
        }
    result: dict[str, Any] = {
        "tasks": out_tasks,
        "lm_eval_version": lm_eval.__version__,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "split": {t: info[t]["split"] for t in tasks},
        "data": {t: info[t]["data_file"] for t in tasks},
    }
    accs = [v["acc"] for v in out_tasks.values() if v["acc"] is not None]
    result["mean_acc"] = sum(accs) / len(accs) if accs else None
    if return_samples:
        result["samples"] = {t: [_sample_record(s) for s in res["samples"][info[t]["name"]]] for t in tasks}
    return result


def _sample_record(s: Mapping[str, Any]) -> dict[str, Any]:
    lls = [float(r[0]) for r in s["filtered_resps"]]
    args = s.get("arguments")
    reqs: list[tuple[str, str]] = []
    if isinstance(args, Mapping):  # {"gen_args_i": {"arg_0": ctx, "arg_1": cont}}
        for k in sorted(args, key=lambda k: int(str(k).rsplit("_", 1)[-1])):
            a = args[k]
            reqs.append((a["arg_0"], a["arg_1"]))
    elif args is not None:
        reqs = [(a[0], a[1]) for a in args]
    return {
        "doc_id": s["doc_id"],
        "target": s["target"],
        "loglikelihoods": lls,
        "pred": max(range(len(lls)), key=lls.__getitem__),
        "acc": s.get("acc"),
        "requests": reqs,
    }
