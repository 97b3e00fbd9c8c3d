"""Short recovery comparisons at equal wall time on SmolLM2-135M pruned by 20% (library defaults).

    python bench/distill.py [--rows KEY,KEY] [--minutes 7] [--calib self] [--ppl-limit 64]
    python bench/distill.py --markdown-only

Every row LoRA-trains one copy of the same pruned model for ``--minutes`` of training time with one setting of
:data:`ROWS` (objective: LM loss, LM + KL to the dense model, KL alone; learning rate; LoRA rank; training text:
Alpaca, WikiText-2's *validation* split cut into windows, text sampled from the dense model) and scores WikiText-2
and PTB perplexity (window 128, the first ``--ppl-limit`` windows; the test split for WikiText-2, which no row
trains on). Distillation's extra teacher forward means fewer steps in the same time: that is the trade measured.
The pruned model is made once per calibration (``--calib``, ``--calib-samples`` x ``--calib-len`` tokens) and cached
under ~/.cache/depgraph/bench/. Rows run in separate processes merge into bench/results/distill.json (a file lock
guards the read-modify-write); distill.md is regenerated from it after every row, so a killed sweep keeps what
finished. Each row records its protocol, steps, throughput and the machine's load average.
"""
from __future__ import annotations

import argparse
import copy
import fcntl
import json
import os
import platform
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from _common import RESULTS, load_smollm2, perplexities, pre_schedule_sampling

import torch

OUT_JSON, OUT_MD = RESULTS / "distill.json", RESULTS / "distill.md"
CACHE = Path.home() / ".cache" / "depgraph" / "bench"


@dataclass(frozen=True)
class Row:
    """One recovery setting; ``kd`` is the weight of KL to the dense model (0: LM loss only, 1: KL only)."""

    label: str
    data: str = "alpaca"
    lr: float = 2e-4
    rank: int = 8
    kd: float = 0.0
    cutoff: int = 256
    limit: int | None = None  # examples ("self": texts sampled from the dense model)
    decay: str = "epochs"  # linear decay planned over 2 epochs (cut short by the time budget), or over the "time"
    inputs: bool = False  # labels (and KL positions) on the Alpaca prompt tokens too (train_on_inputs)


ROWS = {
    "alpaca-lm": Row("LM loss on Alpaca (LLM-Pruner's recipe)"),
    "alpaca-lm-lr1e-3": Row("LM loss on Alpaca, lr 1e-3", lr=1e-3),
    "alpaca-kd0.5": Row("LM + KL to dense (0.5) on Alpaca", kd=0.5),
    "self-kd1": Row("KL to dense on dense-generated text", data="self", kd=1.0, limit=128),
    "wt2-lm": Row("LM loss on WikiText-2 valid", data="wikitext2", cutoff=128),
    "wt2-lm-lr5e-4": Row("LM loss on WikiText-2 valid, lr 5e-4", data="wikitext2", cutoff=128, lr=5e-4),
    "wt2-lm-lr1e-3": Row("LM loss on WikiText-2 valid, lr 1e-3", data="wikitext2", cutoff=128, lr=1e-3),
    "wt2-lm-lr1e-3-r32": Row("LM loss on WikiText-2 valid, lr 1e-3, rank 32", data="wikitext2", cutoff=128,
                             lr=1e-3, rank=32),
    "wt2-lm-lr1e-3-time": Row("LM loss on WikiText-2 valid, lr 1e-3, decay over the time budget", data="wikitext2",
                              cutoff=128, lr=1e-3, decay="time"),
    "wt2-kd0.5-lr1e-3": Row("LM + KL to dense (0.5) on WikiText-2 valid, lr 1e-3", data="wikitext2", cutoff=128,
                            lr=1e-3, kd=0.5),
    "wt2-kd1-lr1e-3": Row("KL to dense on WikiText-2 valid, lr 1e-3", data="wikitext2", cutoff=128, lr=1e-3,
                          kd=1.0),
    "mix-lm-lr1e-3": Row("LM loss on Alpaca + WikiText-2 valid, lr 1e-3", data="alpaca+wikitext2", cutoff=128,
                         lr=1e-3, inputs=True),
    "mix-kd0.5-lr1e-3": Row("LM + KL to dense (0.5) on Alpaca + WikiText-2 valid, lr 1e-3", data="alpaca+wikitext2",
                            cutoff=128, lr=1e-3, kd=0.5, inputs=True),
    "mix-kd1-lr1e-3": Row("KL to dense on Alpaca + WikiText-2 valid, lr 1e-3", data="alpaca+wikitext2", cutoff=128,
                          lr=1e-3, kd=1.0, inputs=True),
    "alpaca-kd1-lr1e-3": Row("KL to dense on Alpaca (prompts too), lr 1e-3", cutoff=128, lr=1e-3, kd=1.0,
                             inputs=True),
}
ZS_TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")  # the six without BoolQ


def carried_zero_shots(path: str, limit: int) -> dict:
    """{"dense": scores, key of the pruned folder: scores} from a bench/recovery.py recover.json evaluated on the
    same first ``limit`` docs (lm-eval is deterministic: the same model scores the same), {} where it has none."""
    r = json.loads(Path(path).read_text())
    if r["args"].get("zs_limit") != limit:
        raise SystemExit(f"--zs-from {path}: scored on {r['args'].get('zs_limit')} docs, not {limit}")
    out = {}
    for row, key in (("dense", "dense"), ("pruned", Path(r.get("prune", {}).get("loaded_from") or "-").name)):
        tasks = r["evals"].get(row, {}).get("tasks", {})
        if all(tasks.get(t, {}).get("acc") is not None for t in ZS_TASKS):
            zs = {t: tasks[t]["acc"] for t in ZS_TASKS}
            out[key.removeprefix("pruned-")] = {"zs": zs, "zs_mean": round(sum(zs.values()) / len(zs), 4),
                                                "zs_from": path}
    return out


def zero_shots(model, tok, limit: int | None) -> dict:
    """{"zs": {task: acc}, "zs_mean": mean} on the first ``limit`` docs of :data:`ZS_TASKS` ({} when None)."""
    if not limit:
        return {}
    from recover.evaluate import zero_shot

    r = zero_shot(model, tok, ZS_TASKS, limit=limit)
    return {"zs": {t: v["acc"] for t, v in r["tasks"].items()}, "zs_mean": round(r["mean_acc"], 4)}


@contextmanager
def locked_results():
    """The results dict, re-read and written back under an exclusive lock (rows of parallel processes merge)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / ".distill.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        res = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {}
        yield res
        OUT_JSON.write_text(json.dumps(res, indent=1) + "\n")
        write_md(res)


def pruned_model(dense, tok, args):
    """The 20%-pruned model for ``args.calib``, from the cache or made now (depgraph.prune's defaults)."""
    import depgraph
    from depgraph.calibration import load_calibration

    key = f"{args.calib}-{args.calib_samples}x{args.calib_len}-t{args.target:g}"
    path = CACHE / f"pruned-{key}"
    if path.exists() and not args.fresh:
        model = depgraph.load_pruned(path)
        prune_s = json.loads((path / "bench_prune.json").read_text())["prune_s"]
    else:
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        calib = load_calibration(args.calib, tok, n_samples=args.calib_samples, seq_len=args.calib_len, model=model,
                                 sampling=pre_schedule_sampling())
        depgraph.prune(model, calib, target=args.target, progress=False)
        prune_s = time.perf_counter() - t
        depgraph.save_pruned(model, path, tokenizer=tok, overwrite=True)
        (path / "bench_prune.json").write_text(json.dumps({"prune_s": prune_s}))
    model.config.use_cache = False
    return model.eval(), key, prune_s


def run_row(key: str, pruned, dense, tok, args) -> dict:
    from recover.lora import recover

    row = ROWS[key]
    model = copy.deepcopy(pruned)
    kw = dict(distill=True, distill_alpha=row.kd) if row.kd else {}
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        budget = dict(max_steps=args.steps) if args.steps else dict(max_minutes=args.minutes)
        merged, s = recover(model, tok, row.data, tmp, teacher=dense if row.kd else None, **budget,
                            epochs=2.0, batch_size=args.batch_size, micro_batch_size=4, lr=row.lr, rank=row.rank,
                            alpha=2 * row.rank, cutoff_len=row.cutoff, limit=row.limit, warmup_steps=args.warmup,
                            decay_by_time=row.decay == "time", train_on_inputs=row.inputs, save=False,
                            progress=False, seed=42, **kw)
    return {**asdict(row), "alpha": 2 * row.rank, "minutes": None if args.steps else args.minutes,
            "planned_steps": args.steps, "batch_size": args.batch_size,
            "warmup": args.warmup, "steps": s["steps"], "train_examples": s["train_examples"],
            "epochs": round(s["epochs"], 3), "train_s": round(s["train_runtime_s"]),
            "total_s": round(time.perf_counter() - t), "tokens_per_second": round(s["tokens_per_second"]),
            "load": [round(load0, 1), round(os.getloadavg()[0], 1)], "when": time.strftime("%H:%M UTC", time.gmtime()),
            **perplexities(merged, tok, args.ppl_limit), **zero_shots(merged, tok, args.zs_limit)}


def write_md(res: dict) -> None:
    a, d = res["args"], res["dense"]
    lines = ["# Recovery settings at equal training time: SmolLM2-135M-Instruct pruned by 20%", "",
             f"{res['machine']}, torch {res['torch']}, 1 thread (OMP_NUM_THREADS=1) on 2 cores shared with other "
             f"jobs: 'load' is the 1-minute load average at the row's start and end (a loaded machine trains fewer "
             f"steps in the same time). Pruned with depgraph.prune's defaults (activation scores, least-squares "
             f"re-fit of the consumers, MLP neurons) on the calibration named in each table. Each row: LoRA on every "
             f"linear layer but lm_head (alpha = 2 x rank), "
             + (f"{a['steps']} optimizer steps (equal work per row whatever the load; distillation's teacher forward "
                f"makes its steps slower: see train (s) and tokens/s), batch {a['batch_size']} (micro-batches of 4), "
                f"{min(a['warmup'], a['steps'] // 10)} warm-up step(s) then linear decay to 0 at the last step"
                if a.get("steps") else
                f"{a['minutes']:g} minutes of training, batch {a['batch_size']} (micro-batches of 4), {a['warmup']} "
                f"warm-up steps then linear decay planned over 2 epochs (a time budget stops it early; decay 'time': "
                f"the decay reaches 0 at the time budget)")
             + f", seed 42. Training text: Alpaca = the shared 5,000-example "
             f"subset, prompt tokens masked, cutoff 256; WikiText-2 valid = the *validation* split cut into "
             f"consecutive 128-token windows, every token a label (v1's <unk> markers dropped); dense-generated = "
             f"texts of 256 tokens sampled from the dense model first (their time is in 'total', not 'train'). KD "
             f"weight w: loss = (1 - w) LM + w KL(dense || pruned). Perplexity: window 128, the first "
             f"{a['ppl_limit']} windows of the WikiText-2 **test** split (never trained on) and of PTB (LLM-Pruner's "
             f"PTB set). Dense: WikiText-2 {d['wikitext2']:.2f}, PTB {d['ptb']:.2f}."
             + (f" Zero-shot: lm-eval 0-shot acc, mean of the six tasks without BoolQ ({', '.join(ZS_TASKS)}), the "
                f"first {a['zs_limit']} docs of each (standard error of the mean about 1.4 points); dense "
                f"{d['zs_mean']:.3f}; rows without it were not scored"
                + (f"; the dense and pruned scores are carried from `{d['zs_from']}` (bench/recovery.py, same docs)"
                   if d.get("zs_from") else "") + "." if d.get("zs_mean") else ""), ""]
    zs = bool(d.get("zs_mean"))

    def zcells(r):
        m = r.get("zs_mean")
        return ([f"{m:.3f}" if m is not None else "-", f"{m / d['zs_mean']:.1%}" if m is not None else "-"]
                if zs else [])
    for pk, p in res.get("prunes", {}).items():
        rows = [r for r in res.get("rows", {}).values() if r["prune"] == pk]
        rows.sort(key=lambda r: r["wikitext2"])
        head = ("| row | data | lr | rank | KD w | decay | steps | epochs | train (s) | total (s) | tokens/s | load | "
                "WikiText-2 | x dense | PTB | x dense |" + (" zero-shot | % dense |" if zs else ""))
        lines += [f"## Pruned with calibration {pk} ({p['params']:,} parameters, prune {p['prune_s']:.0f} s): "
                  f"WikiText-2 {p['wikitext2']:.2f} ({p['wikitext2'] / d['wikitext2']:.2f}x dense), PTB "
                  f"{p['ptb']:.2f} ({p['ptb'] / d['ptb']:.2f}x)"
                  + (f", zero-shot {p['zs_mean']:.3f} ({p['zs_mean'] / d['zs_mean']:.1%} of dense)"
                     if zs and p.get("zs_mean") else ""), "",
                  head, "|" + "---|" * head.count(" |")]
        for r in rows:
            lines.append(f"| {r['label']}{' (prompts labelled)' if r.get('inputs') else ''} | {r['data']} | {r['lr']:g} | {r['rank']} | {r['kd']:g} | {'steps' if r.get('planned_steps') else r.get('decay', 'epochs')} | "
                         f"{r['steps']} | "
                         f"{r['epochs']:.2f} | {r['train_s']} | {r['total_s']} | {r['tokens_per_second']} | "
                         f"{r['load'][0]:.1f}-{r['load'][1]:.1f} | {r['wikitext2']:.2f} | "
                         f"{r['wikitext2'] / d['wikitext2']:.2f} | {r['ptb']:.2f} | {r['ptb'] / d['ptb']:.2f} |"
                         + "".join(f" {c} |" for c in zcells(r)))
        lines.append("")
    OUT_MD.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated keys of ROWS (default: all)")
    ap.add_argument("--minutes", type=float, default=7.0)
    ap.add_argument("--steps", type=int, default=None, help="train every row for this many optimizer steps instead "
                    "of --minutes (equal work whatever the machine's load; linear decay to 0 at the last step)")
    ap.add_argument("--ppl-limit", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=5, help="warm-up steps, the same for every run (recover() "
                    "otherwise sizes it from the planned epochs, which a time budget cuts short)")
    ap.add_argument("--target", type=float, default=0.2)
    ap.add_argument("--calib", default="self", help="calibration of the prune (default: the library's, 'self')")
    ap.add_argument("--calib-samples", type=int, default=10)
    ap.add_argument("--calib-len", type=int, default=64)
    ap.add_argument("--zs-limit", type=int, default=None, help="also score each row zero-shot on the first N docs "
                    "of the six tasks without BoolQ (lm-eval; default: perplexity only)")
    ap.add_argument("--zs-from", default=None, metavar="JSON", help="take the dense and pruned zero-shot scores "
                    "from a bench/recovery.py recover.json of the same pruned folder and --zs-limit (no re-scoring)")
    ap.add_argument("--fresh", action="store_true", help="prune again instead of loading the cached pruned model")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite distill.md from distill.json")
    args = ap.parse_args(argv)
    def carry(res):  # the dense and pruned zero-shot scores of a recover.json, when it has them
        if args.zs_from:
            for key, zs in carried_zero_shots(args.zs_from, args.zs_limit).items():
                (res.setdefault("dense", {}) if key == "dense" else res.get("prunes", {}).get(key, {})).update(zs)
            res.setdefault("args", {})["zs_limit"] = args.zs_limit

    with locked_results() as res:
        carry(res)
    if args.markdown_only:
        write_md(json.loads(OUT_JSON.read_text()))
        print(OUT_MD.read_text())
        return
    keys = [k for k in args.rows.split(",") if k]
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row(s) {', '.join(unknown)}; ROWS: {', '.join(ROWS)}")
    torch.manual_seed(0)
    dense, tok = load_smollm2()
    for p in dense.parameters():
        p.requires_grad_(False)
    with locked_results() as res:
        if res.get("args", {}).get("ppl_limit") not in (None, args.ppl_limit):
            raise SystemExit(f"{OUT_JSON} holds rows at --ppl-limit {res['args']['ppl_limit']}; keep it or move it")
        if res.get("args", {}).get("steps") not in (None, args.steps):
            raise SystemExit(f"{OUT_JSON} holds rows of {res['args']['steps']} steps; keep it or move it")
        if args.zs_limit and res.get("args", {}).get("zs_limit") not in (None, args.zs_limit):
            raise SystemExit(f"{OUT_JSON} holds zero-shot scores on {res['args']['zs_limit']} docs; keep it or move it")
        res["args"] = {"minutes": args.minutes, "steps": args.steps, "ppl_limit": args.ppl_limit, "batch_size": args.batch_size,
                       "warmup": args.warmup, "target": args.target,
                       "zs_limit": args.zs_limit or res.get("args", {}).get("zs_limit")}
        res["machine"], res["torch"] = f"{platform.machine()}, {os.cpu_count()} CPUs", torch.__version__
        if "dense" not in res:
            res["dense"] = perplexities(dense, tok, args.ppl_limit)
        carry(res)
        if args.zs_limit and "zs_mean" not in res["dense"]:
            res["dense"].update(zero_shots(dense, tok, args.zs_limit))
    pruned, pk, prune_s = pruned_model(dense, tok, args)
    with locked_results() as res:
        known = res.get("prunes", {}).get(pk, {})
        if known.get("prune_s") != round(prune_s, 1):  # not this cached pruned model's evaluation
            known = {"params": sum(p.numel() for p in pruned.parameters()), "prune_s": round(prune_s, 1),
                     **perplexities(pruned, tok, args.ppl_limit)}
        res.setdefault("prunes", {})[pk] = known
        carry(res)
        if args.zs_limit and "zs_mean" not in known:  # not carried either: score it now
            known.update(zero_shots(pruned, tok, args.zs_limit))
        res.setdefault("rows", {})
    for key in keys:
        print("==", key, ROWS[key].label, flush=True)
        r = {"prune": pk, **run_row(key, pruned, dense, tok, args)}
        with locked_results() as res:
            res["rows"][f"{pk}/{key}"] = r
        print(r, flush=True)
    print(OUT_MD.read_text())


if __name__ == "__main__":
    main()
