"""Benchmark pruning on SmolLM2-135M: quality per method and target, cost of scoring, speed of the result.

    python bench/prune.py [--part quality|cost|speed|speed-kinds|study|headline|eval-speed|gram-cost|all] [--windows 48]

Writes bench/results/prune.json (updated after every row, so a partial run keeps its rows) and
bench/results/prune.md. Perplexity follows LLM-Pruner's protocol (non-overlapping 128-token windows) on the
first ``--windows`` windows of WikiText-2 test and PTB; dense is measured on the same windows. The evaluation is
float32-matmul-bound (``--part eval-speed``: 34.4 GFLOP a dense window, 2,382 WikiText-2 and 826 PTB test
windows): the full test sets take the model's FLOPs over this CPU's matmul rate, most of an hour per model on one
core, more under load, so the study rows use a fixed subset and only the headline rows the full sets.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import resource
import sys
import time
from pathlib import Path

from _common import RESULTS, Results, load_smollm2, md_table, perplexities, pre_schedule_sampling
from _common import load_avg as _load, peak_rss_mb as _peak_rss_mb, peak_rss_reset as _peak_rss_reset

import torch

METHODS = ("random", "l2", "l1", "taylor", "fisher", "taylor+fisher", "taylor-vector", "activation", "fluctuation")
TARGETS = (0.2, 0.3, 0.5)
LLM_PRUNER = {"removed": 0.211, "params_after": 106.2e6, "wikitext2": 405.0, "ptb": 586.0,
              "dense_wikitext2": 56.1, "dense_ptb": 87.1}


# study calibration names that are not load_calibration sources: (source, the SelfSampling factory). "self" rows were
# measured with the sampler before the temperature schedule (_common.pre_schedule_sampling) and keep it, so they re-run
# as measured; "self-sched" is today's `self` (depgraph.calibration.SelfSampling defaults)
STUDY_SOURCES = {"self": ("self", pre_schedule_sampling), "self-sched": ("self", None)}


def _calib(tok, model, source="alpaca", n=10, length=64, seed=0):
    from depgraph.calibration import load_calibration

    source, sampling = STUDY_SOURCES.get(source, (source, None))
    sampling = None if sampling is None else sampling()
    return load_calibration(source, tok, n_samples=n, seq_len=length, seed=seed, model=model, sampling=sampling)


def part_quality(res: Results, windows: int) -> None:
    import depgraph

    dense, tok = load_smollm2()
    q = res.data.setdefault("quality", {"windows": windows, "window": 128, "rows": []})
    if q.get("windows") != windows:
        q.update(windows=windows, rows=[])
    done = {(r["method"], r["target"], r.get("variant", "")) for r in q["rows"]}

    def row(method, target, variant="", **kw):
        if (method, target, variant) in done:
            return
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        calib = None if method in ("random", "l1", "l2") and not kw.get("compensate") else \
            _calib(tok, model, **kw.pop("calib", {}))
        kw.setdefault("reconstruct", False)  # these rows predate the re-fit default: scores and compensation alone
        _, report, _ = depgraph.prune(model, calib, target=target, method=method, progress=False, **kw)
        prune_s = time.perf_counter() - t
        r = {"method": method, "target": target, "variant": variant,
             "removed": round(report["removed_fraction"], 4), "params": report["params_after"],
             "prune_s": round(prune_s, 1), **perplexities(model, tok, windows)}
        q["rows"].append(r)
        res.save()
        print(r, flush=True)

    if ("dense", 0.0, "") not in done:
        q["rows"].append({"method": "dense", "target": 0.0, "variant": "", "removed": 0.0,
                          "params": sum(p.numel() for p in dense.parameters()), **perplexities(dense, tok, windows)})
        res.save()
    # the LLM-Pruner comparison point first (same parameter count), then the method x target table
    both = ("attention", "mlp")
    row("activation", LLM_PRUNER["removed"], "default (mlp, layers 1:29)")
    row("activation", LLM_PRUNER["removed"], "default, compensated", compensate=True)
    row("taylor", LLM_PRUNER["removed"], "default (mlp, layers 1:29)")
    row("taylor", LLM_PRUNER["removed"], "default, compensated", compensate=True)
    row("taylor", LLM_PRUNER["removed"], "heads+mlp, layers 3:27", kinds=both, layers=range(3, 27))
    row("taylor", LLM_PRUNER["removed"], "heads+mlp, all layers", kinds=both, layers=None)
    row("taylor", LLM_PRUNER["removed"], "mlp, all layers", layers=None)
    for target in TARGETS:
        for method in METHODS:
            row(method, target)
    for target in TARGETS:
        row("taylor", target, "compensated", compensate=True)
        row("activation", target, "compensated", compensate=True)
        row("fluctuation", target, "compensated (FLAP)", compensate=True)
    row("activation", 0.2, "calib 32x128", calib={"n": 32, "length": 128})
    row("activation", 0.2, "calib self-generated", calib={"source": "self"})
    row("activation", 0.2, "compensated, calib self-generated", compensate=True, calib={"source": "self"})
    row("fluctuation", 0.2, "calib self-generated", calib={"source": "self"})
    row("fluctuation", 0.2, "compensated, calib self-generated", compensate=True, calib={"source": "self"})
    row("taylor", 0.2, "calib 32x128", calib={"n": 32, "length": 128})
    row("taylor", 0.2, "calib self-generated", calib={"source": "self"})
    row("taylor", 0.2, "global policy", policy="global", normalize="mean")
    row("taylor", 0.2, "iterative 4 steps", steps=4)


def part_cost(res: Results) -> None:
    """Scoring time against a plain forward+backward over the same calibration set."""
    import depgraph

    model, tok = load_smollm2()
    graph = depgraph.trace(model)
    calib = _calib(tok, model)
    out = {}

    def plain():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=calib, labels=calib).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    plain()  # warm-up
    for method in ("taylor", "taylor+fisher", "activation"):
        t = time.perf_counter()
        plain()
        base = time.perf_counter() - t
        t = time.perf_counter()
        depgraph.score(model, graph, calib, method=method, progress=False)
        cost = time.perf_counter() - t
        out[method] = {"score_s": round(cost, 2), "plain_fwd_bwd_s": round(base, 2), "ratio": round(cost / base, 2)}
        print(method, out[method], flush=True)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out["calibration"] = "alpaca, 10 x 64 tokens"
    res.data["cost"] = out
    res.save()


# the issue-13 study: (variant, prune kwargs, calibration) per row; calibration (source, n, length)
STUDY = (
    ("default", {"reconstruct": False}, ("self", 10, 64)),  # the pre-study default: no re-fit
    ("+reconstruct", {"reconstruct": True}, ("alpaca", 16, 128)),
    ("+adaptive", {"policy": "adaptive"}, ("self", 10, 64)),
    ("+reconstruct, adaptive", {"reconstruct": True, "policy": "adaptive"}, ("alpaca", 16, 128)),
    ("+reconstruct, self calib", {"reconstruct": True}, ("self", 10, 64)),
    ("+reconstruct, adaptive, self calib", {"reconstruct": True, "policy": "adaptive"}, ("self", 10, 64)),
    ("+reconstruct, self calib, damp 1", {"reconstruct": True, "damp": 1.0}, ("self", 10, 64)),
    ("+reconstruct, self 32x128", {"reconstruct": True}, ("self", 32, 128)),
    # the dampening sweep around the best row (damp 1) and what joins it
    ("+reconstruct, self calib, damp 0.3", {"reconstruct": True, "damp": 0.3}, ("self", 10, 64)),
    ("+reconstruct, self calib, damp 3", {"reconstruct": True, "damp": 3.0}, ("self", 10, 64)),
    ("+reconstruct, self calib, damp 10", {"reconstruct": True, "damp": 10.0}, ("self", 10, 64)),
    ("+reconstruct, compensate, self calib, damp 1", {"reconstruct": True, "compensate": True, "damp": 1.0},
     ("self", 10, 64)),
    ("+reconstruct, adaptive, self calib, damp 1", {"reconstruct": True, "policy": "adaptive", "damp": 1.0},
     ("self", 10, 64)),
    ("+reconstruct, self 32x128, damp 1", {"reconstruct": True, "damp": 1.0}, ("self", 32, 128)),
    ("fluctuation, +reconstruct, self calib, damp 1", {"reconstruct": True, "damp": 1.0, "method": "fluctuation"},
     ("self", 10, 64)),
    ("+reconstruct, obs", {"reconstruct": True, "method": "obs"}, ("alpaca", 16, 128)),
    # depth (issue 13 item 3): whole layers and attention/MLP sub-blocks by Block Influence (depgraph.blocks);
    # depth + width: half the target as blocks, the rest MLP neurons
    ("depth", {"kinds": ("block",)}, ("alpaca", 16, 128)),
    ("depth + width, +reconstruct", {"kinds": ("block", "mlp"), "reconstruct": True}, ("alpaca", 16, 128)),
    ("+reconstruct, obs, adaptive", {"reconstruct": True, "method": "obs", "policy": "adaptive"},
     ("alpaca", 16, 128)),
    # calibration size and source for the re-fit (the Gram matrix of a down_proj is 1536 wide: the fit wants many
    # more tokens than that); wikitext2 = the WikiText-2 *validation* split, a different split from the test set
    # scored here (in-domain calibration, as FLAP and SliceGPT calibrate on the train split)
    ("+reconstruct, wikitext2 10x64, damp 1", {"reconstruct": True, "damp": 1.0}, ("wikitext2", 10, 64)),
    ("+reconstruct, wikitext2 32x128, damp 1", {"reconstruct": True, "damp": 1.0}, ("wikitext2", 32, 128)),
    ("+reconstruct, wikitext2 256x128, damp 1", {"reconstruct": True, "damp": 1.0}, ("wikitext2", 256, 128)),
    ("+reconstruct, alpaca 32x128, damp 1", {"reconstruct": True, "damp": 1.0}, ("alpaca", 32, 128)),
    # the dampening sweep again at 4,096 tokens (within the 2-minute prune bound; more than the Gram's 1536)
    ("+reconstruct, wikitext2 32x128, damp 0.1", {"reconstruct": True, "damp": 0.1}, ("wikitext2", 32, 128)),
    ("+reconstruct, wikitext2 32x128, damp 0.01", {"reconstruct": True, "damp": 0.01}, ("wikitext2", 32, 128)),
    ("+reconstruct, self 32x128, damp 0.1", {"reconstruct": True, "damp": 0.1}, ("self", 32, 128)),
    ("+reconstruct, self 32x128, damp 3", {"reconstruct": True, "damp": 3.0}, ("self", 32, 128)),
    # units re-chosen per block during the re-fit by greedy OBS on the sequential inputs (select="obs")
    ("select obs, +reconstruct, self calib, damp 1", {"reconstruct": True, "damp": 1.0, "select": "obs"},
     ("self", 10, 64)),
    ("select obs, +reconstruct, wikitext2 32x128, damp 0.1", {"reconstruct": True, "damp": 0.1, "select": "obs"},
     ("wikitext2", 32, 128)),
    # greedy OBS selection at the re-fit's best dampening, and with more calibration tokens (issue 13, quality lane)
    ("select obs, +reconstruct, wikitext2 32x128, damp 1", {"reconstruct": True, "damp": 1.0, "select": "obs"},
     ("wikitext2", 32, 128)),
    ("+reconstruct, wikitext2 128x128, damp 1", {"reconstruct": True, "damp": 1.0}, ("wikitext2", 128, 128)),
    ("select obs, +reconstruct, wikitext2 128x128, damp 1", {"reconstruct": True, "damp": 1.0, "select": "obs"},
     ("wikitext2", 128, 128)),
    ("select obs, +reconstruct, self 32x128, damp 1", {"reconstruct": True, "damp": 1.0, "select": "obs"},
     ("self", 32, 128)),
    ("shortlist obs, +reconstruct, wikitext2 32x128, damp 1",
     {"reconstruct": True, "damp": 1.0, "select": "shortlist"}, ("wikitext2", 32, 128)),
    # the re-fit's X^T X accumulated and solved in float32 instead of float64 (the 2-minute prune budget)
    ("+reconstruct, wikitext2 128x128, damp 1, gram float32",
     {"reconstruct": True, "damp": 1.0, "gram_dtype": torch.float32}, ("wikitext2", 128, 128)),
    ("+reconstruct, wikitext2 128x128, damp 1, gram float64",
     {"reconstruct": True, "damp": 1.0, "gram_dtype": torch.float64}, ("wikitext2", 128, 128)),
    # heads + MLP neurons under one budget, both re-fitted (o_proj is the heads' consumer)
    ("heads+mlp, +reconstruct, wikitext2 32x128, damp 1",
     {"reconstruct": True, "damp": 1.0, "kinds": ("attention", "mlp")}, ("wikitext2", 32, 128)),
    ("heads+mlp, +reconstruct, wikitext2 128x128, damp 1",
     {"reconstruct": True, "damp": 1.0, "kinds": ("attention", "mlp")}, ("wikitext2", 128, 128)),
    ("heads+mlp, +reconstruct, self calib, damp 1",
     {"reconstruct": True, "damp": 1.0, "kinds": ("attention", "mlp")}, ("self", 10, 64)),
    # the data-free sampler (depgraph.calibration.SelfSampling): temperature 2 -> 0.8 over the first 16 tokens,
    # special tokens banned; 32 x 64 tokens generated in one batch (the default since this row)
    ("+reconstruct, self-sched 10x64, damp 1", {"reconstruct": True, "damp": 1.0}, ("self-sched", 10, 64)),
    ("+reconstruct, self-sched 32x64, damp 1", {"reconstruct": True, "damp": 1.0}, ("self-sched", 32, 64)),
    ("+reconstruct, self 32x64, damp 1", {"reconstruct": True, "damp": 1.0}, ("self", 32, 64)),
)


def _cached_calib(tok, model, source: str, n: int, length: int):
    """(ids, seconds it took to build them): built once per machine (seed 0) and kept in /tmp, so runs side by side
    do not generate the same self-calibration twice; the recorded build time stays part of every prune time."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"depgraph-bench-calib-{source}-{n}x{length}.pt"  # per STUDY name
    if path.is_file():
        saved = torch.load(path)
        return saved["ids"], saved["seconds"]
    t = time.perf_counter()
    ids = _calib(tok, model, source, n, length)
    seconds = time.perf_counter() - t
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # a killed run never leaves a truncated cache
    torch.save({"ids": ids, "seconds": seconds}, partial)
    os.replace(partial, path)
    return ids, seconds


def part_study(res: Results, windows: int | None, targets, sets, variants=None, key: str = "study") -> None:
    """Rows of the reconstruction / adaptive-width study: prune time, peak RSS, perplexity per target.
    ``windows=None``: the full test sets (the headline rows, kept under ``key="headline"``)."""
    import depgraph

    dense, tok = load_smollm2()
    st = res.data.setdefault(key, {"windows": windows, "window": 128, "protocol": "bos", "rows": []})
    if st.get("windows") != windows:
        st.update(windows=windows, rows=[])
    done = {(r["variant"], r["target"]) for r in st["rows"] if all(k in r for k in sets)}
    partial = {(r["variant"], r["target"]): r for r in st["rows"] if (r["variant"], r["target"]) not in done}
    dense_row = next((r for r in st["rows"] if r["variant"] == "dense"), None)
    if variants and "dense" not in variants:  # --variants without dense: the rows only (dense comes from --merge)
        pass
    elif dense_row is None:
        dense_row = {"variant": "dense", "target": 0.0, "removed": 0.0,
                     "params": sum(p.numel() for p in dense.parameters())}
        st["rows"].append(dense_row)
    if dense_row is not None and (not variants or "dense" in variants) and any(k not in dense_row for k in sets):
        _eval_sets(res, dense_row, dense, tok, windows, sets)  # a set added later is measured on its own
        print(dense_row, flush=True)
    calib_cache = {}
    for target in targets:
        for variant, kw, (source, n, length) in STUDY:
            if (variants and variant not in variants) or (variant, target) in done:
                continue
            model = copy.deepcopy(dense)
            _peak_rss_reset()
            key = (source, n, length)
            if key not in calib_cache:  # calibration is part of the prune time (self-generation is not free)
                calib_cache[key] = _cached_calib(tok, model, source, n, length)
            calib, calib_s = calib_cache[key]
            t = time.perf_counter()
            _, report, _ = depgraph.prune(model, calib, target=target, progress=False, **kw)
            prune_s = time.perf_counter() - t + calib_s
            load = _load()
            r = {"variant": variant, "target": target, "method": report["method"], "policy": report["policy"],
                 "calibration": f"{source} {n}x{length}", "removed": round(report["removed_fraction"], 4),
                 "params": report["params_after"], "prune_s": round(prune_s, 1), "load_avg": load,
                 "peak_rss_mb": _peak_rss_mb(),
                 "times": {k: round(v, 1) for k, v in report["times"].items()},
                 "mlp_widths": [w.get("mlp") for w in report["widths"].values()], "calib_s": round(calib_s, 1),
                 "blocks": report.get("removed_blocks") or None, "threads": torch.get_num_threads()}
            if (variant, target) in partial:  # a run cut off between sets: the same prune again, the missing sets
                r = {**r, **{k: v for k, v in partial[(variant, target)].items() if k not in r},
                     "prune_s_first": partial[(variant, target)].get("prune_s")}
                st["rows"].remove(partial[(variant, target)])
            st["rows"].append(r)
            _eval_sets(res, r, model, tok, windows, sets)
            print(r, flush=True)
            del model


def _eval_sets(res: Results, row: dict, model, tok, windows, sets) -> None:
    """Perplexity of ``model`` on each of ``sets`` that ``row`` lacks, saved after every set (a full test set takes
    the better part of an hour here): ``row["eval_s"]`` the total, ``row["eval_s_sets"]`` per set, with the threads
    and the load average at the end of each."""
    per = row.setdefault("eval_s_sets", {})
    timed = {k for n in per for k in n.split("+")}
    had = [k for k in ("wikitext2", "ptb", "ptb-test") if k in row and k not in timed]
    if had and "eval_s" in row:  # measured before per-set times were kept: the old total stands for those sets
        per["+".join(had)] = {"s": row["eval_s"], "threads": row.get("threads"), "load": row.get("eval_load_avg")}
    for name in sets:
        if name in row:
            continue
        t = time.perf_counter()
        row.update(perplexities(model, tok, windows, sets=(name,)))
        per[name] = {"s": round(time.perf_counter() - t, 1), "threads": torch.get_num_threads(), "load": _load()}
        row.update(eval_s=round(sum(v["s"] for v in per.values()), 1), eval_load_avg=_load())
        res.save()


def _gemm_gflops(m: int = 1024, k: int = 576, n: int = 1536, reps: int = 10) -> float:
    """Throughput of a plain float32 matmul of the MLP's shape (8 windows x 128 tokens) on this machine, now."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9


def part_eval_speed(res: Results, windows: int = 32, batches=(1, 8, 32)) -> None:
    """Where the perplexity evaluation's time goes: seconds per 128-token window at each batch size (dense, the first
    ``windows`` WikiText-2 test windows), the share of one forward spent in aten::mm (torch.profiler), the model's
    FLOPs per window against a plain matmul's throughput measured alongside, and the full test sets extrapolated."""
    from torch.profiler import ProfilerActivity, profile

    from recover.evaluate import window_nll, perplexity

    model, tok = load_smollm2()
    n_tok = {"wikitext2": 2382, "ptb-test": 826}  # full windows of 128 tokens in each test set (SmolLM2 tokenizer)
    cfg = model.config
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    head = cfg.vocab_size * cfg.hidden_size
    flops = 2 * (body + head) * 128  # per window: every weight once per token, the tied head included
    rows, ppl = [], {}
    for bs in batches:
        gemm = _gemm_gflops()
        t = time.perf_counter()
        ppl[bs] = perplexity(model, tok, "wikitext2", window=128, limit=windows, batch_size=bs, progress=False)["ppl"]
        dt = time.perf_counter() - t
        rows.append({"batch": bs, "s_per_window": round(dt / windows, 3),
                     "model_gflops": round(flops * windows / dt / 1e9, 1), "gemm_gflops": round(gemm, 1),
                     "load": _load()})
        print(rows[-1], flush=True)
    ids = torch.randint(0, cfg.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, use_cache=False)
    ev = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    with torch.inference_mode():  # the loss step alone, before (a copy of the sliced logits) and now (in place)
        logits = model(input_ids=ids, use_cache=False).logits
        loss_s = {}
        for name, fn in (("sliced copy (before)", _sliced_nll), ("in place (now)", window_nll)):
            fn(logits, ids)
            t = time.perf_counter()
            for _ in range(3):
                fn(logits, ids)
            loss_s[name] = round((time.perf_counter() - t) / 3 / ids.shape[0], 4)
    best = min(rows, key=lambda r: r["s_per_window"])
    res.data["eval_speed"] = {
        "windows": windows, "threads": torch.get_num_threads(), "rows": rows,
        "ppl_by_batch": {str(k): round(v, 4) for k, v in ppl.items()},
        "ppl_max_rel_diff": max(abs(v / ppl[batches[0]] - 1) for v in ppl.values()),
        "loss_s_per_window": loss_s, "gflop_per_window": round(flops / 1e9, 1), "mm_share": round(ev.get("aten::mm", 0) / sum(ev.values()), 3),
        "full_s_estimate": {k: round(v * best["s_per_window"]) for k, v in n_tok.items()}, "best_batch": best["batch"]}
    print(res.data["eval_speed"], flush=True)
    res.save()


def part_gram_cost(res: Results, tokens: int = 16384, batch: int = 4 * 128, reps: int = 3) -> None:
    """Seconds to accumulate one consumer's ``X^T X`` over ``tokens`` calibration tokens (``batch`` rows per forward,
    as the re-fit's hooks add them) and to solve its re-fit, in float32 against float64, for SmolLM2's two consumer
    widths (down_proj 1536, o_proj 576) at 20% removed; alternating, medians of ``reps``."""
    from depgraph.refit import refit_solve
    from depgraph.stats import InputStats

    gen = torch.Generator().manual_seed(0)
    out = {"tokens": tokens, "batch": batch, "reps": reps, "threads": torch.get_num_threads(), "rows": []}
    for name, width, rows in (("down_proj", 1536, 576), ("o_proj", 576, 576)):
        X = torch.randn(tokens, width, generator=gen)
        W = torch.randn(rows, width, generator=gen)
        removed = list(range(0, width, 5))
        kept = [j for j in range(width) if j % 5]
        times = {"float32": {"gram": [], "solve": []}, "float64": {"gram": [], "solve": []}}
        for _ in range(reps):
            for dt in (torch.float32, torch.float64):
                t = time.perf_counter()
                st = InputStats.zeros(width, True, dt)
                for i in range(0, tokens, batch):
                    st.add(X[i:i + batch])
                t1 = time.perf_counter()
                refit_solve(W.to(dt), st.gram, removed, kept, 1.0, (), dt)
                t2 = time.perf_counter()
                times[str(dt).split(".")[1]]["gram"].append(t1 - t)
                times[str(dt).split(".")[1]]["solve"].append(t2 - t1)
        med = lambda xs: round(sorted(xs)[len(xs) // 2], 3)  # noqa: E731
        r = {"consumer": name, "width": width, **{f"{k}_{d}_s": med(v[k]) for d, v in times.items() for k in v},
             "load": _load()}
        out["rows"].append(r)
        print(r, flush=True)
    res.data["gram_cost"] = out
    res.save()


def _gram_cost_table(g) -> list:
    if not g:
        return []
    lines = ["## Cost of the re-fit's Gram matrix: float32 against float64", "",
             f"One consumer's X^T X accumulated over {g['tokens']:,} tokens ({g['batch']} rows at a time, as the "
             f"re-fit's hooks add them; 128x128 calibration), then its re-fit solved (20% of the columns removed, "
             f"damp 1); random inputs of the consumer's width, {g['threads']} thread(s), float32 and float64 "
             f"alternating, medians of {g['reps']}. SmolLM2 has 28 pruned layers: one down_proj (and at 50% one "
             f"o_proj) each.", "",
             ]
    lines += md_table(["consumer", "width", "Gram float32 (s)", "Gram float64 (s)", "solve float32 (s)",
                       "solve float64 (s)", "load"],
                      ([r["consumer"], r["width"], r["gram_float32_s"], r["gram_float64_s"], r["solve_float32_s"],
                        r["solve_float64_s"], "/".join(map(str, r["load"]))] for r in g["rows"]))
    return lines + [""]


def _sliced_nll(logits, ids):
    """The loss step as recover.evaluate computed it before: a copy of the (B, W-1, V) slice, then the loss."""
    shift = logits[:, :-1, :].float()
    return float(torch.nn.functional.cross_entropy(shift.reshape(-1, shift.size(-1)), ids[:, 1:].reshape(-1),
                                                   reduction="sum"))


def _eval_speed_table(e) -> list:
    if not e:
        return []
    lines = ["## Speed of the perplexity evaluation (dense, window 128)", "",
             f"First {e['windows']} windows of the WikiText-2 test set, protocol bos, {e['threads']} torch thread(s); "
             f"model GFLOP/s: {e['gflop_per_window']} GFLOP a window (2 x the weights incl. the tied 49,152 x 576 head "
             f"x 128 tokens) over the measured time; plain matmul: a 1024x576 @ 576x1536 float32 matmul measured just "
             f"before each row (the machine's rate at that moment, shared with other jobs). Perplexity is the same "
             f"at every batch size (largest relative difference {e['ppl_max_rel_diff']:.1e}).", "",
             ]
    lines += md_table(["batch", "s / window", "model GFLOP/s", "plain matmul GFLOP/s", "load"],
                      ([r["batch"], r["s_per_window"], r["model_gflops"], r["gemm_gflops"],
                        "/".join(map(str, r["load"]))] for r in e["rows"]))
    full = e["full_s_estimate"]
    lines += ["", f"aten::mm takes {100 * e['mm_share']:.0f}% of a batch-8 forward's CPU time (torch.profiler): the "
                  f"evaluation runs at the machine's float32 matmul rate, so its time is the model's FLOPs over that "
                  f"rate. At batch {e['best_batch']} the full test sets would take about {full['wikitext2']} s "
                  f"(WikiText-2, 2,382 windows) and {full['ptb-test']} s (PTB test, 826 windows) for the dense model "
                  f"at the load of this run. The loss step alone (batch 8, s a window): "
                  + ", ".join(f"{k} {v}" for k, v in e["loss_s_per_window"].items()) + ".", ""]
    return lines


def _decode_tps(model, ids, new_tokens=64):
    model.config.use_cache = True
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        dt = time.perf_counter() - t
    model.config.use_cache = False
    return (out.shape[1] - ids.shape[1]) / dt


def _latency(model, n=512, reps=5):
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def part_speed(res: Results) -> None:
    import depgraph

    dense, tok = load_smollm2()
    pruned = copy.deepcopy(dense)
    depgraph.prune(pruned, _calib(tok, pruned), target=0.2, method="taylor", progress=False)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    n_dense = sum(p.numel() for p in dense.parameters())
    n_pruned = sum(p.numel() for p in pruned.parameters())
    out = {"params_dense": n_dense, "params_pruned": n_pruned, "ideal_speedup": round(n_dense / n_pruned, 3),
           "threads": torch.get_num_threads()}
    # back to back, alternating, in one process
    d_tps, p_tps, d_lat, p_lat = [], [], [], []
    for _ in range(3):
        d_tps.append(_decode_tps(dense, ids))
        p_tps.append(_decode_tps(pruned, ids))
        d_lat.append(_latency(dense))
        p_lat.append(_latency(pruned))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    out.update(decode_tps_dense=round(med(d_tps), 1), decode_tps_pruned=round(med(p_tps), 1),
               latency_512_dense_s=round(med(d_lat), 3), latency_512_pruned_s=round(med(p_lat), 3))
    out["decode_speedup"] = round(out["decode_tps_pruned"] / out["decode_tps_dense"], 3)
    out["latency_speedup"] = round(out["latency_512_dense_s"] / out["latency_512_pruned_s"], 3)
    out["decode_share_of_ideal"] = round(out["decode_speedup"] / out["ideal_speedup"], 3)
    out["latency_share_of_ideal"] = round(out["latency_speedup"] / out["ideal_speedup"], 3)
    print(out, flush=True)
    res.data["speed"] = out
    res.save()


SPEED_KINDS = (  # issue 13: decode speed of width, depth and mixed pruning at 20%, each as the study prunes it
    ("width (the default: MLP neurons, re-fit)", {}, ("self", 10, 64)),
    ("depth", {"kinds": ("block",)}, ("alpaca", 16, 128)),
    ("depth + width, +reconstruct", {"kinds": ("block", "mlp"), "reconstruct": True}, ("alpaca", 16, 128)),
)


def part_speed_kinds(res: Results, target: float = 0.2, reps: int = 3) -> None:
    """Decode tokens/s and 1x512 forward latency of each SPEED_KINDS model against dense: every pruned model in
    memory at once and measured back to back, alternating with dense in one process (medians of ``reps``)."""
    import depgraph

    dense, tok = load_smollm2()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    n_dense = sum(p.numel() for p in dense.parameters())
    models = {}
    for name, kw, (src, n, length) in SPEED_KINDS:
        m = copy.deepcopy(dense)
        depgraph.prune(m, _calib(tok, m, src, n, length), target=target, progress=False, **kw)
        models[name] = m
    tps = {k: [] for k in ["dense", *models]}
    lat = {k: [] for k in tps}
    for _ in range(reps):
        for k, m in [("dense", dense), *models.items()]:
            tps[k].append(_decode_tps(m, ids))
            lat[k].append(_latency(m))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    rows = []
    for k in tps:
        m = dense if k == "dense" else models[k]
        n = sum(p.numel() for p in m.parameters())
        ideal = n_dense / n
        r = {"variant": k, "params": n, "ideal_speedup": round(ideal, 3), "decode_tps": round(med(tps[k]), 1),
             "latency_512_s": round(med(lat[k]), 3)}
        r["decode_speedup"] = round(r["decode_tps"] / (med(tps["dense"])), 3)
        r["latency_speedup"] = round(med(lat["dense"]) / r["latency_512_s"], 3)
        r["decode_share_of_ideal"] = round(r["decode_speedup"] / ideal, 3)
        r["latency_share_of_ideal"] = round(r["latency_speedup"] / ideal, 3)
        if k != "dense":
            r["layers"] = m.config.num_hidden_layers
        rows.append(r)
        print(r, flush=True)
    res.data["speed_kinds"] = {"target": target, "reps": reps, "threads": torch.get_num_threads(),
                               "load_avg_at_end": _load(), "rows": rows}
    res.save()


def _speed_kinds_table(sk) -> list:
    if not sk:
        return []
    lines = [f"## Speed of width, depth and mixed pruning ({100 * sk['target']:.0f}% of all parameters)", "",
             f"Each model pruned as in the study rows of the same name, all in memory at once, measured back to back "
             f"and alternating with dense in one process: medians of {sk['reps']} rounds of greedy decoding (64 "
             f"new tokens after a 6-token prompt, KV cache on) and of a 1x512 forward; {sk['threads']} torch "
             f"thread(s), load average {'/'.join(map(str, sk['load_avg_at_end']))} at the end (shared machine: "
             f"ratios of one round are more reliable than the absolute figures). Share of ideal: the speed-up over "
             f"the parameter ratio.", "",
             "| variant | params | layers | decode (tok/s) | decode speed-up | share of ideal | 1x512 forward (s) | "
             "forward speed-up | share of ideal |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sk["rows"]:
        lines.append(f"| {r['variant']} | {r['params'] / 1e6:.1f}M | {r.get('layers', 30)} | {r['decode_tps']} | "
                     f"{r['decode_speedup']} | {r['decode_share_of_ideal']} | {r['latency_512_s']} | "
                     f"{r['latency_speedup']} | {r['latency_share_of_ideal']} |")
    return lines + [""]


def write_markdown(res: Results) -> None:
    d = res.data
    lines = ["# Pruning benchmark: SmolLM2-135M-Instruct", "",
             f"Machine: {platform.machine()}, {__import__('os').cpu_count()} cores, CPU only.", ""]
    q = d.get("quality")
    if q:
        rows = q["rows"]
        dense = next((r for r in rows if r["method"] == "dense"), None)
        lines += [f"## Quality (perplexity, window {q['window']}, first {q['windows']} windows of WikiText-2 test "
                  f"and PTB; no recovery)", "",
                  "Unless the variant says otherwise: MLP neurons of layers 1-28 (first and last kept), the same "
                  "fraction in every layer, widths multiples of 8, 10 x 64 Alpaca calibration tokens. The two "
                  "gradient-free scores lead: activation (the default) and FLAP's fluctuation are within about 5% of "
                  "each other at 20% and 30% (each wins one), ahead of every gradient method; self-generated "
                  "calibration beats Alpaca for all of them, and FLAP's bias compensation on top gives the best "
                  "rows (fluctuation 1.89x, activation 1.96x at 20%). At 50% a 135M model collapses under every "
                  "method without recovery.", "",
                  "| method | target | variant | removed | params | WikiText-2 | x dense | PTB | x dense |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            xw = f"{r['wikitext2'] / dense['wikitext2']:.2f}" if dense else ""
            xp = f"{r['ptb'] / dense['ptb']:.2f}" if dense else ""
            lines.append(f"| {r['method']} | {r['target']:.3g} | {r.get('variant', '')} | {100 * r['removed']:.1f}% "
                         f"| {r['params'] / 1e6:.1f}M | {r['wikitext2']:.1f} | {xw} | {r['ptb']:.1f} | {xp} |")
        lp = LLM_PRUNER
        lines += ["", f"LLM-Pruner's own code on this model (measured on this machine, full test sets): "
                      f"{100 * lp['removed']:.1f}% removed, WikiText-2 {lp['dense_wikitext2']} -> {lp['wikitext2']} "
                      f"({lp['wikitext2'] / lp['dense_wikitext2']:.1f}x), PTB {lp['dense_ptb']} -> {lp['ptb']} "
                      f"({lp['ptb'] / lp['dense_ptb']:.1f}x). Target: at most 3.6x dense on WikiText-2.", ""]
    c = d.get("cost")
    if c:
        lines += ["## Cost of scoring (10 x 64 calibration tokens)", "",
                  "| method | scoring (s) | plain forward+backward (s) | ratio |", "|---|---|---|---|"]
        for m, v in c.items():
            if isinstance(v, dict):
                lines.append(f"| {m} | {v['score_s']} | {v['plain_fwd_bwd_s']} | {v['ratio']} |")
        lines += ["", f"Peak RSS of the cost run: {c.get('peak_rss_mb')} MB.", ""]
    s = d.get("speed")
    if s:
        lines += ["## Speed of the pruned model (taylor, 20%)", "",
                  f"Parameters {s['params_dense']:,} -> {s['params_pruned']:,}: ideal speed-up {s['ideal_speedup']}.",
                  "", "| measure | dense | pruned | speed-up | share of ideal |", "|---|---|---|---|---|",
                  f"| greedy decoding (tokens/s) | {s['decode_tps_dense']} | {s['decode_tps_pruned']} | "
                  f"{s['decode_speedup']} | {s['decode_share_of_ideal']} |",
                  f"| 1x512 forward (s) | {s['latency_512_dense_s']} | {s['latency_512_pruned_s']} | "
                  f"{s['latency_speedup']} | {s['latency_share_of_ideal']} |", ""]
    lines += _speed_kinds_table(d.get("speed_kinds"))
    lines += _eval_speed_table(d.get("eval_speed"))
    lines += _gram_cost_table(d.get("gram_cost"))
    for key in ["headline"] + sorted((k for k in d if k.startswith("study")), key=lambda k: -d[k]["windows"]):
        lines += _study_table(d.get(key), key)
    res.path.with_suffix(".md").write_text("\n".join(lines))


def _study_table(st, key: str) -> list:
    """Markdown lines of the study (first N windows) or headline (full test sets) rows."""
    if not st:
        return []
    rows = st["rows"]
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    sets = [k for k in ("wikitext2", "ptb", "ptb-test") if dense and k in dense]
    span = "the full test sets" if st["windows"] is None else f"first {st['windows']} windows"
    title = "Headline rows" if key == "headline" else "Reconstruction and per-layer widths"
    lines = [f"## {title} (window {st['window']}, {span} of {' and '.join(sets)}, protocol "
             f"{st.get('protocol', 'bos')}; no recovery)", ""]
    if dense and dense.get("eval_s_sets"):
        lines += ["Dense evaluation of these windows (batch 8): " + "; ".join(
            f"{k} {v['s']} s (load average {'/'.join(map(str, v['load'] or []))} at its end, 1/5/15 min)"
            for k, v in dense["eval_s_sets"].items()) + ".", ""]
    elif dense and "eval_s" in dense:
        lines += [f"Dense evaluation of these windows: {dense['eval_s']} s (batch 8; load average "
                  f"{'/'.join(map(str, dense['eval_load_avg']))} at its end, 1/5/15 min).", ""]
    if key == "headline":
        lines += ["Targets (full WikiText-2 test, no recovery): 20% <= 1.35x dense, 30% <= 1.8x, 50% <= 5x.", ""]
    lines += ["default: `depgraph prune --target T` before this study (activation scores, MLP neurons of layers 1-28, "
              "uniform widths, no re-fit); the default now is the row '+reconstruct, self-sched 32x64, damp 1' "
              "(before it: '+reconstruct, self calib, damp 1'); "
              "+reconstruct: kept columns of every down_proj re-fitted by least squares, block by block; obs: OBS "
              "scores; adaptive: per-layer widths (FLAP's standardised scores, min width 25%); damp: the ridge added to the "
              "Gram matrix as a fraction of its mean diagonal (0.01 unless stated). calibration: source and windows x tokens; "
              "self: sampled from the model (data-free) at temperature 1, special tokens allowed (the sampler "
              "before self-sched); self-sched: today's `--calib self`, the temperature falling from 2 to 0.8 over the "
              "first 16 tokens (Williams et al.'s self-calibration schedule), special tokens never sampled, all "
              "windows generated in one batch; wikitext2: the WikiText-2 *validation* split "
              "(wiki.valid.tokens), a different split from the test set scored here, i.e. in-domain calibration as "
              "FLAP and SliceGPT calibrate on the train split; alpaca: the 5,000-record Alpaca subset. select obs: "
              "the plan's widths, each layer's neurons re-chosen during the re-fit by greedy OBS on the sequential "
              "inputs (8 a round, H^-1 downdated); shortlist obs: the same, OBS choosing only among twice as many "
              "neurons of lowest activation score. heads+mlp: attention heads and MLP neurons under one budget, "
              "o_proj and down_proj re-fitted. Prune time includes building the calibration set; peak RSS of "
              "the process during the prune (the dense copy included); load: the machine's 1/5/15-minute load "
              "average at the end of the prune (2 cores shared with other jobs, run under nice); threads: torch's intra-op "
              "threads where recorded (1 under load: 2 threads on 2 shared cores spin at every op's barrier, up to 7x "
              "slower; empty: not recorded, torch's default of 2); eval: time of "
              "the perplexity evaluation of the row. depth: `--kinds block` (whole layers and attention/MLP "
              "sub-blocks of layers 1-28 by Block Influence, lowest score per parameter first); depth + width: half "
              "the target as blocks, the rest MLP neurons. gram float32 / float64: the re-fit's X^T X accumulated and "
              "solved in that dtype (the default for float32 weights: float64).", "",
              "| variant | target | calibration | removed | params | "
              + " | ".join(f"{k} | x dense" for k in sets) + " | prune (s) | load | threads | peak RSS (MB) | eval (s) |",
              "|---|---|---|---|---|" + "---|---|" * len(sets) + "---|---|---|---|---|"]
    for r in rows:
        cells = [r["variant"], f"{r['target']:.2g}", r.get("calibration", ""), f"{100 * r['removed']:.1f}%",
                 f"{r['params'] / 1e6:.1f}M"]
        for k in sets:  # a set added after the row was measured: empty cells
            cells += [f"{r[k]:.1f}", f"{r[k] / dense[k]:.2f}"] if k in r else ["", ""]
        cells += [str(r.get("prune_s", "")), "/".join(map(str, r.get("load_avg", []))), str(r.get("threads", "")),
                  str(r.get("peak_rss_mb", "")), str(r.get("eval_s", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _merge(res: Results, other: dict) -> None:
    """Add ``other``'s study/headline rows that ``res`` lacks (same windows), then save."""
    for key, st in other.items():
        if key in ("eval_speed", "gram_cost"):
            res.data[key] = st
        if not (key.startswith("study") or key == "headline"):
            continue
        mine = res.data.setdefault(key, {**st, "rows": []})
        if mine["windows"] != st["windows"]:
            raise SystemExit(f"--merge: {key} has {st['windows']} windows here, {mine['windows']} in the results")
        have = {(r["variant"], r["target"]): r for r in mine["rows"]}
        for r in st["rows"]:
            old = have.get((r["variant"], r["target"]))
            if old is None:
                mine["rows"].append(r)
                continue
            for k in ("wikitext2", "ptb", "ptb-test"):  # a set measured there only joins the row here
                if k in r and k not in old:
                    old[k] = r[k]
                    old.setdefault("eval_s_sets", {}).update({n: v for n, v in r.get("eval_s_sets", {}).items()
                                                              if k in n.split("+")})
                    old["eval_s"] = round(sum(v["s"] for v in old["eval_s_sets"].values()), 1)
    res.save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("quality", "cost", "speed", "speed-kinds", "study", "headline", "eval-speed",
                                       "gram-cost", "all", "markdown"),
                    default="all")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--targets", default="0.2,0.3,0.5", help="study: comma list of parameter targets")
    ap.add_argument("--sets", default="wikitext2,ptb-test", help="study: perplexity sets")
    ap.add_argument("--variants", default="", help="study/headline: only these variants (';' list)")
    ap.add_argument("--results", default=str(RESULTS / "prune.json"),
                    help="JSON file to write (runs side by side each write their own)")
    ap.add_argument("--merge", default="", help="';' list of JSON files whose study/headline rows join --results")
    args = ap.parse_args()
    res = Results(Path(args.results))
    for other in filter(None, args.merge.split(";")):
        _merge(res, Results(Path(other)).data)
    if args.part in ("study", "headline"):  # headline: the full test sets
        part_study(res, args.windows if args.part == "study" else None, [float(t) for t in args.targets.split(",")],
                   tuple(args.sets.split(",")), [v for v in args.variants.split(";") if v],
                   key="headline" if args.part == "headline" else f"study-{args.windows}")
    if args.part == "eval-speed":
        part_eval_speed(res)
    if args.part == "gram-cost":
        part_gram_cost(res)
    if args.part in ("cost", "all"):
        part_cost(res)
    if args.part in ("speed", "all"):
        part_speed(res)
    if args.part in ("speed-kinds", "all"):
        part_speed_kinds(res)
    if args.part in ("quality", "all"):
        part_quality(res, args.windows)
    write_markdown(res)


if __name__ == "__main__":
    main()
