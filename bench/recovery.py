"""Benchmark LoRA recovery (issue 4) on the bundled SmolLM2-135M-Instruct pruned by 20%.

1. dense SmolLM2 -> WikiText-2 / PTB perplexity and the seven zero-shot accuracies (first ``--zs-limit`` docs of
   each task, lm-eval 0.4.x on the local copies);
2. ``depgraph.prune(model, calib, target=0.2)`` with the library's defaults (activation scores on 10 x 64
   self-generated calibration tokens, MLP neurons, every layer but the first and last) -> same evaluation;
3. ``recover.lora.recover`` on the shared 5,000-example Alpaca subset (LLM-Pruner's settings, ``--val-size`` held out,
   early stopping, stopped by ``--max-minutes``, default 55, so recovery takes at most 60 minutes) -> same
   evaluation, and the share of the dense quality that recovery wins back;
4. training throughput (non-padding tokens/s over ``--tp-steps`` optimizer steps) of ``recover()`` against a plain
   PEFT + ``Trainer`` run of the same pruned model and data, interleaved ``--tp-reps`` times; target ratio >= 0.95.

Writes ``bench/results/recover.json`` and ``bench/results/recover.md`` (``--out`` to change).  Smoke run:
``python bench/recovery.py --max-steps 2 --limit 2 --ppl-limit 2 --tp-steps 2 --tp-reps 1 --out /tmp/rb``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

import depgraph  # noqa: E402
from _common import pre_schedule_sampling  # noqa: E402
from depgraph.calibration import load_calibration  # noqa: E402
from depgraph.models import load_model  # noqa: E402
from recover.data import DataCollator, build_datasets  # noqa: E402
from recover.evaluate import LM_EVAL_TASKS, perplexity, zero_shot  # noqa: E402
from recover.lora import default_target_modules, recover  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def evaluate(model, tok, args, out: dict, save=lambda: None) -> dict:
    """Perplexities then zero-shot accuracies into ``out``; ``save()`` after each part (a stop keeps the first)."""
    t0 = time.perf_counter()
    out.update({"ppl": {}, "tasks": {}})
    for ds in args.ppl:
        r = perplexity(model, tok, ds, window=args.window, limit=args.ppl_limit, progress=False)
        out["ppl"][ds] = r["ppl"]
        out.setdefault("ppl_windows", {})[ds] = r["windows"]
    out["eval_s"] = time.perf_counter() - t0
    save()
    if args.tasks:
        zs = zero_shot(model, tok, args.tasks, limit=args.zs_limit)
        out["tasks"] = {t: {"acc": v.get("acc"), "acc_norm": v.get("acc_norm"), "n": v.get("n")}
                        for t, v in zs["tasks"].items()}
        out["lm_eval_version"] = zs.get("lm_eval_version")
        out["zs_split"] = zs.get("split")
        out["mean_acc"] = zs["mean_acc"]
    out["eval_s"] = time.perf_counter() - t0
    save()
    return out


def recovered_share(dense: float, pruned: float, rec: float, min_gap: float = 1e-12) -> float | None:
    """(rec - pruned) / (dense - pruned): 1 = all of the lost quality back, 0 = none, < 0 = worse; None when
    pruning lost less than ``min_gap`` (the ratio of two noise-sized numbers means nothing)."""
    gap = dense - pruned
    return None if abs(gap) < min_gap else (rec - pruned) / gap


def boolq_yes_share(limit: int | None) -> float | None:
    """Share of "yes" answers among the BoolQ docs scored (the local HF copy), or None when it is not at hand."""
    from recover.datasets import zeroshot_file

    try:
        import datasets

        fmt, path = zeroshot_file("boolq", "validation")
        answers = datasets.Dataset.from_file(str(path))["answer"][:limit] if fmt == "hf" else None
    except Exception:  # noqa: BLE001 - a note in the table, never a failure
        return None
    return sum(map(bool, answers)) / len(answers) if answers else None


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def recovered_shares(res: dict) -> dict:
    """Share of the lost quality won back, per perplexity set and for mean zero-shot accuracies.

    BoolQ is also left out of one mean: a 135M model answers it near the majority class, so pruning can move it
    either way by chance (yes/no bias), which hides what happens on the other six tasks."""
    d, p, r = (res["evals"][k] for k in ("dense", "pruned", "recovered"))
    share = {}
    for ds in res["args"]["ppl"]:  # lower is better: negate
        share[f"{ds} ppl"] = recovered_share(-d["ppl"][ds], -p["ppl"][ds], -r["ppl"][ds])
    tasks = res["args"]["tasks"]
    if tasks:
        def mean(e, key, skip=()):
            return _mean([e["tasks"][t][key] for t in tasks if t not in skip and t in e["tasks"]])

        for label, key, skip in (("mean acc", "acc", ()), ("mean acc without BoolQ", "acc", ("boolq",)),
                                 ("mean acc_norm", "acc_norm", ())):
            vals = [mean(e, key, skip) for e in (d, p, r)]
            if None not in vals:  # accuracies on a few hundred docs: a gap under one point is noise
                share[label] = recovered_share(*vals, min_gap=0.01)
    return share


def plain_peft_run(model, tok, train_ds, args, out_dir) -> dict:
    """The reference: LoRA with PEFT and a stock Trainer + DataCollatorForSeq2Seq (LLM-Pruner's own setup)."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    set_seed(args.seed)
    tok = copy.deepcopy(tok)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.config.use_cache = False
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none",
                                                  task_type="CAUSAL_LM",
                                                  target_modules=default_target_modules(model)))
    targs = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.batch_size // args.micro_batch_size, max_steps=args.tp_steps,
        learning_rate=args.lr, warmup_steps=0, optim="adamw_torch", logging_steps=10, save_strategy="no",
        eval_strategy="no", report_to="none", seed=args.seed, data_seed=args.seed, remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding", disable_tqdm=True, dataloader_pin_memory=False,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    )
    trainer = Trainer(model=peft_model, args=targs, train_dataset=train_ds,
                      data_collator=DataCollatorForSeq2Seq(tok, pad_to_multiple_of=8, return_tensors="pt",
                                                           padding=True))
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    m = trainer.train().metrics
    return {"tokens": int(trainer.state.num_input_tokens_seen), "runtime_s": m["train_runtime"],
            "tokens_per_second": trainer.state.num_input_tokens_seen / m["train_runtime"]}


def ours_run(model, tok, train_ds, args, out_dir) -> dict:
    _, s = recover(model, tok, (train_ds, None), out_dir, max_steps=args.tp_steps, batch_size=args.batch_size,
                   micro_batch_size=args.micro_batch_size, lr=args.lr, warmup_steps=0, save=False, progress=False,
                   seed=args.seed, logging_steps=10, save_steps=10**9)
    return {"tokens": s["train_tokens"], "runtime_s": s["train_runtime_s"], "tokens_per_second": s["tokens_per_second"]}


def throughput(pruned, tok, args) -> dict:
    train_ds, _ = build_datasets("alpaca", tok, cutoff_len=args.cutoff_len, limit=args.tp_examples)
    ours, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.tp_reps):  # ABBA order: neither side always runs first (warm-up, thermal drift)
            order = ("plain", "ours") if i % 2 == 0 else ("ours", "plain")
            for who in order:
                run, into = (plain_peft_run, plain) if who == "plain" else (ours_run, ours)
                into.append(run(copy.deepcopy(pruned), tok, train_ds, args, Path(tmp) / f"{who}{i}"))
    o = statistics.median(r["tokens_per_second"] for r in ours)
    p = statistics.median(r["tokens_per_second"] for r in plain)
    return {"steps": args.tp_steps, "reps": args.tp_reps, "ours": ours, "plain": plain,
            "ours_tokens_per_second": o, "plain_tokens_per_second": p, "ratio": o / p, "target": 0.95,
            "meets_target": o / p >= 0.95,
            "note": "median over interleaved reps (ABBA order); both count non-padding tokens with Trainer's "
                    "include_num_input_tokens_seen over the same steps, data and order"}


def committed(path: str) -> str:
    """``path`` and the commit that last wrote it (what a carried figure was read from)."""
    import subprocess

    sha = subprocess.run(["git", "log", "-1", "--format=%h", "--", path], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    return f"{path} as of commit {sha}" if sha else path


def fmt(x, nd=2):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def write_md(res: dict, path: Path) -> None:
    rows = [r for r in ("dense", "pruned", "recovered") if r in res["evals"]]
    a, rec = res["args"], res.get("recovery", {})
    zs = res["evals"]["dense"].get("zs_split") or {}
    pr = res.get("prune", {})
    n, L = pr.get("calib_tokens", (10, 64))
    names = {"alpaca": "Alpaca" + (" (prompt tokens labelled too)" if a.get("train_on_inputs") else ""),
             "wikitext2": f"WikiText-2 validation-split ({a['cutoff_len']}-token windows)"}
    data = " + ".join(names.get(d, d) for d in a.get("data", "alpaca").split("+"))
    kd = a.get("distill_alpha") or 0
    lines = [f"# LoRA recovery of SmolLM2-135M-Instruct pruned by {a['target']:.0%} "
             f"({a['method']}, {a['calib']} calibration {n}x{L}, depgraph.prune's defaults)", "",
             f"{res['machine']}; torch {res['torch']}, transformers {res['transformers']}, peft {res['peft']}; "
             f"lm-eval {res['evals']['dense'].get('lm_eval_version')}. Command: `python bench/recovery.py "
             f"{res.get('argv', '')}`.", ""]
    if rec:
        stop = "stopped by the time budget" if rec.get("stopped_by_time_budget") else "ran to its planned end"
        lines += [f"Recovery: LoRA r={rec['rank']}, alpha={rec['alpha']} on {', '.join(rec['target_modules'])} "
                  f"({rec['trainable_params']:,} trainable); {rec['steps']} steps of {a['batch_size']} examples "
                  f"(lr {rec['lr']}, cutoff {a['cutoff_len']} tokens) in {rec['train_runtime_s'] / 60:.1f} min, "
                  f"{stop} ({rec['epochs']:.2f} epochs of {rec['train_examples']} {data or a.get('data')} examples, "
                  f"{rec['val_examples']} held out); loss "
                  + (f"(1 - {kd:g}) LM + {kd:g} KL(dense || pruned)" if kd else "LM") + "; "
                  f"{rec['tokens_per_second']:.0f} tokens/s counting the validation passes; "
                  f"validation loss "
                  + " -> ".join(f"{x:.3f}" for x in rec.get("eval_losses", [])) + ".", ""]
    for r in ("dense", "pruned"):
        if res["evals"].get(r, {}).get("carried_from"):
            why = ": the dense model does not change" if r == "dense" else " on the same saved pruned model"
            lines += [f"The {r} row is carried from `{res['evals'][r]['carried_from']}` (an earlier run of this "
                      f"script with the same evaluation protocol{why}).", ""]
    missing = [r for r in ("dense", "pruned", "recovered") if r not in res["evals"] or not res["evals"][r].get("tasks")]
    if missing:
        lines += [f"**Partial results**: not (fully) evaluated yet: {', '.join(missing)}.", ""]
    lines += [f"Perplexity: LLM-Pruner's protocol, windows of {a['window']} tokens, the first {a['ppl_limit'] or 'all'} "
              f"windows of each test set. Zero-shot: lm-eval, 0-shot, the first {a['zs_limit']} docs of each task "
              f"(splits: " + ", ".join(f"{t} {sp}" for t, sp in zs.items()) + ").", ""]
    ppl, tasks = a["ppl"], a["tasks"]
    for key in ("acc", "acc_norm"):
        shown = [t for t in tasks if any(res["evals"][r]["tasks"].get(t, {}).get(key) is not None for r in rows)]
        with_ppl = key == "acc"  # perplexity once, in the first table
        extra = ["mean without BoolQ"] if "boolq" in shown else []
        if not shown:
            continue
        head = ["model", "params"] + ([f"{d} ppl" for d in ppl] if with_ppl else []) + shown + ["mean"] + extra
        lines += [f"**{key}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            e = res["evals"][r]
            vals = [e["tasks"].get(t, {}).get(key) for t in shown]
            cells = [r, f"{res['params'][r]:,}"] + ([fmt(e["ppl"].get(d)) for d in ppl] if with_ppl else [])
            cells += [fmt(v, 3) for v in vals] + [fmt(_mean(vals), 3)]
            if extra:
                cells.append(fmt(_mean([v for t, v in zip(shown, vals) if t != "boolq"]), 3))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    yes = boolq_yes_share(a["zs_limit"]) if "boolq" in tasks else None
    if yes is not None:
        lines += [f"BoolQ at this size is a yes/no bias, not reading: {yes:.1%} of these answers are \"yes\", and a "
                  "model that leans to \"yes\" scores near that whatever it understands, so pruning can raise it. "
                  "The mean without BoolQ is the fairer summary.", ""]
    if tasks and a["zs_limit"]:
        lines += [f"With {a['zs_limit']} docs a task's standard error is up to {50 / a['zs_limit'] ** 0.5:.1f} points "
                  "(sqrt(p(1-p)/n)); smaller per-task differences are noise.", ""]
    if res.get("recovered_share"):
        lines += ["Share of the lost quality that recovery wins back, (recovered - pruned) / (dense - pruned):", ""]
        lines += [f"- {k}: " + (fmt(v, 3) if v is not None else "- (pruning lost under one point: no gap to win back)")
                  for k, v in res["recovered_share"].items()]
    tp = res.get("throughput")
    if tp:
        lines += ["", f"Training throughput over {tp['steps']} optimizer steps ({tp['reps']} interleaved reps, median): "
                      f"recover() {tp['ours_tokens_per_second']:.0f} tokens/s, plain PEFT + Trainer "
                      f"{tp['plain_tokens_per_second']:.0f} tokens/s, ratio {tp['ratio']:.3f} "
                      f"(target >= 0.95: {'met' if tp['meets_target'] else 'NOT met'})"
                      + (f"; measured separately with `python bench/recovery.py {tp['argv']}`" if tp.get("argv") else "")
                      + (f", carried from `{tp['carried_from']}` (measured on the earlier run's pruned model)"
                         if tp.get("carried_from") else "")
                      + ". Per run: recover() " + ", ".join(f"{r['tokens_per_second']:.0f}" for r in tp["ours"])
                      + "; plain " + ", ".join(f"{r['tokens_per_second']:.0f}" for r in tp["plain"]) + " tokens/s."]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.2)
    ap.add_argument("--method", default="activation", help="importance method (default: depgraph.prune's)")
    ap.add_argument("--calib", default="self", help="calibration source (default: the CLI's, self-generated)")
    ap.add_argument("--calib-samples", type=int, default=10, help="calibration sequences (default: the library's)")
    ap.add_argument("--calib-len", type=int, default=64, help="tokens per calibration sequence")
    ap.add_argument("--pruned", default=None, metavar="DIR", help="load this save_pruned folder (made by "
                    "bench/distill.py with the same --calib settings) instead of pruning again")
    ap.add_argument("--data", default="alpaca", help="recovery text: 'alpaca', 'wikitext2' (its validation "
                                                     "split), 'self', a file (recover.data.load_examples)")
    ap.add_argument("--distill-alpha", type=float, default=0.0, help="weight of KL to the dense model (0: LM "
                                                                     "loss only, 1: KL only)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=None, help="LoRA alpha (default: 2 x rank)")
    ap.add_argument("--warmup-steps", type=int, default=100, help="at most a tenth of the planned run")
    ap.add_argument("--dense-from", default=None, metavar="JSON", help="reuse the dense evaluation of an earlier "
                    "recover.json made with the same evaluation protocol (the dense model does not change)")
    ap.add_argument("--throughput-from", default=None, metavar="JSON", help="carry the throughput comparison of an "
                    "earlier recover.json (with --skip-throughput)")
    ap.add_argument("--pruned-from", default=None, metavar="JSON", help="reuse the pruned evaluation of an earlier "
                    "recover.json of the same --pruned folder and evaluation protocol (made with --eval-only)")
    ap.add_argument("--eval-only", action="store_true", help="evaluate dense and pruned, write them and stop (a "
                    "later run carries them with --dense-from / --pruned-from while other runs use the time)")
    ap.add_argument("--train-on-inputs", action="store_true", help="labels (and KL positions) on the Alpaca "
                    "prompt tokens too, not only on the responses")
    ap.add_argument("--ppl", default="wikitext2,ptb")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--ppl-limit", type=int, default=None, help="windows per perplexity set (default: all)")
    ap.add_argument("--tasks", default=",".join(LM_EVAL_TASKS))
    ap.add_argument("--zs-limit", type=int, default=200, help="first N docs of each zero-shot task")
    ap.add_argument("--limit", type=int, default=None, help="Alpaca examples to use (default: all 5,000); also "
                                                           "caps --zs-limit in smoke runs")
    ap.add_argument("--val-size", type=int, default=200)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--max-minutes", type=float, default=55.0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--cutoff-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--tp-steps", type=int, default=5)
    ap.add_argument("--tp-reps", type=int, default=2)
    ap.add_argument("--tp-examples", type=int, default=1000)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--markdown-only", action="store_true", help="rewrite recover.md from recover.json")
    ap.add_argument("--throughput-only", action="store_true",
                    help="prune, rerun only the throughput comparison and update recover.json / recover.md")
    args = ap.parse_args(argv)
    if args.markdown_only or args.throughput_only:
        path = Path(args.out) / "recover.json"
        res = json.loads(path.read_text())
        if args.throughput_only:
            model, tok = load_model()
            calib = load_calibration(res["args"]["calib"], tok, n_samples=10, seq_len=64, model=model,
                                 sampling=pre_schedule_sampling())
            depgraph.prune(model, calib, target=res["args"]["target"], method=res["args"]["method"], progress=False)
            print("== throughput", flush=True)
            res["throughput"] = throughput(model, tok, args)
            res["throughput"]["argv"] = " ".join(sys.argv[1:] if argv is None else argv)
        res["recovered_share"] = recovered_shares(res)
        path.write_text(json.dumps(res, indent=2, default=str))
        write_md(res, Path(args.out) / "recover.md")
        print((Path(args.out) / "recover.md").read_text())
        return 0
    args.ppl = [d for d in args.ppl.split(",") if d]
    args.tasks = [t for t in args.tasks.split(",") if t]
    if args.limit is not None:
        args.zs_limit = min(args.zs_limit, args.limit)
        args.tp_examples = min(args.tp_examples, max(args.limit, args.batch_size))
        args.val_size = min(args.val_size, max(1, args.limit // 4))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t_all = time.perf_counter()

    import peft
    import transformers

    args.alpha = args.alpha or 2 * args.rank
    earlier = {k: json.loads(Path(v).read_text()) for k, v in (("dense", args.dense_from),
                                                                 ("throughput", args.throughput_from)) if v}
    res = {"args": vars(args), "argv": " ".join(sys.argv[1:] if argv is None else argv), "machine": f"{platform.machine()} {os.cpu_count()} CPUs"
           + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "evals": {}, "params": {}}
    def save():  # partial results survive a stop: the JSON and the table say what finished
        (out / "recover.json").write_text(json.dumps(res, indent=2, default=str))
        write_md(res, out / "recover.md")

    if "throughput" in earlier:
        tp = earlier["throughput"]["throughput"]  # carried once already: keep where it was measured
        res["throughput"] = {**tp, "carried_from": tp.get("carried_from") or committed(args.throughput_from)}
    model, tok = load_model()
    res["params"]["dense"] = sum(p.numel() for p in model.parameters())
    dense = copy.deepcopy(model) if args.distill_alpha else None
    def carry(final: bool) -> None:
        """The dense / pruned rows of --dense-from / --pruned-from, read now: an --eval-only run still scoring them
        may finish while this one trains, so a row it lacks yet is read again before the recovered evaluation."""
        for row, src in (("dense", args.dense_from), ("pruned", args.pruned_from)):
            if not src or res["evals"].get(row, {}).get("carried_from"):
                continue
            e = json.loads(Path(src).read_text())
            same = ("ppl", "window", "ppl_limit", "tasks", "zs_limit") + (("pruned",) if row == "pruned" else ())
            diff = [k for k in same if e["args"].get(k) != getattr(args, k)]
            if diff or e["params"]["dense"] != res["params"]["dense"]:
                raise SystemExit(f"--{row}-from {src}: its evaluation protocol or model differs ({', '.join(diff)})")
            done = bool(e["evals"].get(row, {}).get("tasks")) or not args.tasks
            if done:
                res["evals"][row] = {**e["evals"][row], "carried_from": committed(src)}
            elif final:
                raise SystemExit(f"--{row}-from {src}: it has no finished {row} evaluation")

    carry(final=False)
    if "dense" not in res["evals"] and not args.dense_from:
        print("== dense", flush=True)
        evaluate(model, tok, args, res["evals"].setdefault("dense", {}), save)

    print("== prune", flush=True)
    t = time.perf_counter()
    res["prune"] = {"method": args.method, "calib": args.calib, "calib_tokens": [args.calib_samples, args.calib_len]}
    if args.pruned:  # made earlier with the same settings (bench/distill.py caches it with its prune time)
        model = depgraph.load_pruned(args.pruned)
        made = Path(args.pruned) / "bench_prune.json"
        res["prune"].update(loaded_from=args.pruned,
                            prune_s=json.loads(made.read_text())["prune_s"] if made.exists() else None)
    else:
        calib = load_calibration(args.calib, tok, n_samples=args.calib_samples, seq_len=args.calib_len, model=model,
                                 sampling=pre_schedule_sampling())
        model, report, _ = depgraph.prune(model, calib, target=args.target, method=args.method, progress=False)
        res["prune"].update(removed_fraction=report.get("removed_fraction"), prune_s=time.perf_counter() - t)
    res["params"]["pruned"] = sum(p.numel() for p in model.parameters())
    if "pruned" not in res["evals"] and not args.pruned_from:
        evaluate(model, tok, args, res["evals"].setdefault("pruned", {}), save)
    if args.eval_only:
        res["total_s"] = time.perf_counter() - t_all
        save()
        print((out / "recover.md").read_text())
        return 0
    pruned_copy = copy.deepcopy(model) if not args.skip_throughput else None

    print("== recover", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        merged, summary = recover(
            model, tok, args.data, tmp, teacher=dense, distill=bool(args.distill_alpha),
            distill_alpha=args.distill_alpha, rank=args.rank, alpha=args.alpha, warmup_steps=args.warmup_steps,
            max_steps=args.max_steps, epochs=args.epochs, batch_size=args.batch_size,
            micro_batch_size=args.micro_batch_size, cutoff_len=args.cutoff_len, lr=args.lr, val_size=args.val_size,
            eval_steps=args.eval_steps, save_steps=args.eval_steps, early_stopping_patience=args.patience,
            max_minutes=args.max_minutes, limit=args.limit, seed=args.seed, save_total_limit=2,
            train_on_inputs=args.train_on_inputs,
            progress=lambda *a, **k: print(*a, flush=True, **k))
    res["recovery"] = summary
    res["params"]["recovered"] = sum(p.numel() for p in merged.parameters())
    carry(final=True)
    evaluate(merged, tok, args, res["evals"].setdefault("recovered", {}), save)

    res["recovered_share"] = recovered_shares(res)

    if not args.skip_throughput:
        print("== throughput", flush=True)
        res["throughput"] = throughput(pruned_copy, tok, args)
    res["total_s"] = time.perf_counter() - t_all
    (out / "recover.json").write_text(json.dumps(res, indent=2, default=str))
    write_md(res, out / "recover.md")
    print((out / "recover.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
