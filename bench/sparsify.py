"""Benchmark sparsity on SmolLM2-135M: magnitude, Wanda and SparseGPT at 50% unstructured and 2:4, plus shrink + Wanda.

    python bench/sparsify.py [--windows 48] [--calib alpaca] [--n-samples 32] [--seq-len 128] [--markdown-only]

Writes bench/results/sparsify.json (updated after every row, so a partial run keeps its rows; rows already there for
the same windows and calibration are skipped) and bench/results/sparsify.md. Perplexity is WikiText-2 test with
LLM-Pruner's protocol (non-overlapping 128-token windows) on the first ``--windows`` windows; dense comes first, on the
same windows. Each row reports the wall time of the sparsify call (calibration forward passes included, model load
and evaluation excluded) and its peak memory: the highest resident set size sampled every 5 ms during the call, minus
the resident size just before it (and the CUDA peak when a GPU is used). The last rows prune 20% of the parameters
structurally (taylor, depgraph.prune) and then apply 50% Wanda to what is left.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import sys
import threading
import time

from _common import RESULTS, Results, load_smollm2, perplexities

import torch

METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = (("50%", {"sparsity": 0.5}), ("2:4", {"nm": (2, 4)}))
# LLaMA-7B, WikiText-2, 50% unstructured (Wanda paper, Sun et al. 2023): the ordering to expect
PUBLISHED = {"model": "LLaMA-7B", "dense": 5.68, "magnitude": 17.29, "wanda": 7.26, "sparsegpt": 7.22}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(fn):
    """Run ``fn()``; return (its result, wall seconds, peak extra RSS in MB, CUDA peak in MB or None)."""
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(0.005)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    t = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - t
        stop.set()
        thread.join()
    peak[0] = max(peak[0], _rss_bytes())
    cuda_mb = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if cuda else None
    return result, round(seconds, 2), round((peak[0] - base) / 2 ** 20, 1), cuda_mb


def run(res: Results, args) -> None:
    import depgraph
    from depgraph.calibration import load_calibration
    from depgraph.sparsify import sparsify

    setup = {"windows": args.windows, "window": 128, "calib": args.calib, "n_samples": args.n_samples,
             "seq_len": args.seq_len, "device": args.device or "cpu", "threads": torch.get_num_threads()}
    if res.data.get("setup") != setup:
        res.data = {"setup": setup, "rows": []}
    rows = res.data["rows"]
    done = {r["name"] for r in rows}
    dense, tok = load_smollm2()
    params = sum(p.numel() for p in dense.parameters())
    calib = load_calibration(args.calib, tok, n_samples=args.n_samples, seq_len=args.seq_len, seed=0, model=dense)

    def add(row):
        rows.append(row)
        res.save()
        print(json.dumps(row), flush=True)

    if "dense" not in done:
        add({"name": "dense", "method": "dense", "pattern": "", "sparsity": 0.0, "params": params,
             "wikitext2": perplexities(dense, tok, args.windows, ("wikitext2",), 3)["wikitext2"]})
    for label, kw in PATTERNS:
        for method in METHODS:
            name = f"{method} {label}"
            if name in done:
                continue
            model = copy.deepcopy(dense)
            (_, report), secs, mem, cuda_mb = measure(lambda: sparsify(model, method, calibration=calib,
                                                                       device=args.device, **kw))
            add({"name": name, "method": method, "pattern": report["pattern"], "sparsity": report["sparsity"],
                 "model_zero_fraction": report["model_zero_fraction"], "params": params, "seconds": secs,
                 "peak_extra_rss_mb": mem, "cuda_peak_mb": cuda_mb,
                 "layer_sparsity": [r["sparsity"] for r in report["layers"]],
                 "wikitext2": perplexities(model, tok, args.windows, ("wikitext2",), 3)["wikitext2"]})
            del model
    # 20% structured (taylor) then 50% Wanda on what is left
    if "shrink 20%" not in done or "shrink 20% + wanda 50%" not in done:
        model = copy.deepcopy(dense)
        (_, prep, _), p_secs, p_mem, p_cuda = measure(
            lambda: depgraph.prune(model, calib[:10, :64], target=0.2, method="taylor", progress=False))
        kept = sum(p.numel() for p in model.parameters())
        if "shrink 20%" not in done:
            add({"name": "shrink 20%", "method": "taylor (structured)", "pattern": "structured",
                 "sparsity": 0.0, "removed": round(prep["removed_fraction"], 4), "params": kept, "seconds": p_secs,
                 "peak_extra_rss_mb": p_mem, "cuda_peak_mb": p_cuda, "wikitext2": perplexities(model, tok, args.windows, ("wikitext2",), 3)["wikitext2"]})
        (_, report), secs, mem, cuda_mb = measure(lambda: sparsify(model, "wanda", sparsity=0.5, calibration=calib,
                                                                   device=args.device))
        add({"name": "shrink 20% + wanda 50%", "method": "taylor + wanda", "pattern": "structured + 50%",
             "sparsity": report["sparsity"], "model_zero_fraction": report["model_zero_fraction"],
             "removed": round(prep["removed_fraction"], 4), "params": kept,
             "seconds": round(p_secs + secs, 2), "shrink_seconds": p_secs, "sparsify_seconds": secs,
             "peak_extra_rss_mb": max(p_mem, mem), "cuda_peak_mb": cuda_mb,
             "layer_sparsity": [r["sparsity"] for r in report["layers"]],
             "wikitext2": perplexities(model, tok, args.windows, ("wikitext2",), 3)["wikitext2"]})
    res.data["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    res.save()


def write_markdown(res: Results) -> None:
    d = res.data
    s = d.get("setup", {})
    rows = d.get("rows", [])
    dense = next((r for r in rows if r["name"] == "dense"), None)
    lines = ["# Sparsity benchmark: SmolLM2-135M-Instruct", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, {s.get('device', 'cpu')}, "
             f"{s.get('threads')} torch threads.", "",
             f"WikiText-2 test perplexity, window {s.get('window', 128)}, first {s.get('windows')} windows; "
             f"calibration {s.get('calib')} {s.get('n_samples')} x {s.get('seq_len')} tokens, layer by layer. "
             f"Sparsity counts the linear layers of the decoder (embeddings and lm_head stay dense). Time and memory "
             f"are those of the sparsify call (memory: peak resident set above the level before the call).", "",
             "| row | pattern | linear sparsity | params | non-zero params | WikiText-2 | x dense | time (s) | "
             "peak extra RSS (MB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = f"{r['wikitext2'] / dense['wikitext2']:.2f}" if dense else ""
        nz = r["params"] * (1 - r.get("model_zero_fraction", 0.0))
        lines.append(f"| {r['name']} | {r['pattern']} | {100 * r['sparsity']:.1f}% | {r['params'] / 1e6:.1f}M | "
                     f"{nz / 1e6:.1f}M | "
                     f"{r['wikitext2']:.2f} | {x} | {r.get('seconds', '')} | {r.get('peak_extra_rss_mb', '')} |")
    p = PUBLISHED
    lines += ["", f"Published ordering at 50% unstructured on {p['model']} (WikiText-2): dense {p['dense']}, "
                  f"SparseGPT {p['sparsegpt']} ~ Wanda {p['wanda']} << magnitude {p['magnitude']}. "
                  f"A 135M model has far less redundancy, so expect larger ratios to dense at the same ordering.", ""]
    if d.get("peak_rss_mb"):
        lines += [f"Peak RSS of the whole run: {d['peak_rss_mb']} MB.", ""]
    (RESULTS / "sparsify.md").write_text("\n".join(lines))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=48, help="WikiText-2 windows of 128 tokens (default 48)")
    ap.add_argument("--calib", default="alpaca", help="calibration source (default alpaca)")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--device", default=None, help="process each layer on this device (e.g. cuda)")
    ap.add_argument("--markdown-only", action="store_true", help="only rewrite sparsify.md from sparsify.json")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    res = Results(RESULTS / "sparsify.json")
    if not args.markdown_only:
        run(res, args)
    write_markdown(res)


if __name__ == "__main__":
    main()
