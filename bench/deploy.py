"""Benchmark deployment of SmolLM2-135M-Instruct dense, uniform-pruned and default-pruned (20% of parameters).

    python bench/deploy.py [--new-tokens 64] [--rounds 3] [--threads 2] [--markdown-only]

Writes bench/results/deploy.json and bench/results/deploy.md. Per model: saved folder size, the time of
``AutoModelForCausalLM.from_pretrained`` in a fresh interpreter where depgraph is not importable (median of 3; the
non-uniform folder loads with ``trust_remote_code=True``), the GGUF file size per outtype, llama.cpp agreement with
transformers on the fixed prompt (f32 weights and f32 KV cache: max |logit difference|, top-1 equal at every position, 32 greedy tokens
identical), and greedy decode speed after that prompt (decode steps only, ``--new-tokens`` tokens, ``--threads``
threads in both runtimes, median of ``--rounds`` rounds; within a round every runtime and model runs back to back).
Pruning: ``depgraph.prune`` library defaults (activation scores, 10 x 64 self-generated calibration tokens, seed 0,
MLP neurons, layers 1-28) and the same with ``uniform=True`` (every layer the same width, stock-loadable).
Needs llama-cpp-python (not a project dependency) for the llama.cpp columns.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import RESULTS, Results, load_smollm2, pre_schedule_sampling  # first: it takes bench/ off sys.path

import torch

import depgraph
from depgraph.export.check import compare, hf_decode_tps, llama_decode_tps, open_llama
from depgraph.export.gguf import OUTTYPES, export_gguf, plan

PROMPT = "The capital of France is"
LOAD = """
import sys, time
sys.modules["depgraph"] = None
from transformers import AutoModelForCausalLM
t = time.perf_counter()
AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
print(time.perf_counter() - t)
"""


def folder_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def stock_load_s(folder: Path, tmp: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp / "hf_modules"), HF_HUB_OFFLINE="1")
    times = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", LOAD, str(folder)], cwd=tmp, env=env, capture_output=True,
                             text=True, check=True)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def variants(dense, tok):
    from depgraph.calibration import load_calibration

    calib = load_calibration("self", tok, n_samples=10, seq_len=64, seed=0, model=dense,
                             sampling=pre_schedule_sampling())
    yield "dense", dense
    yield "uniform-pruned", depgraph.prune(copy.deepcopy(dense), calib, target=0.2, uniform=True, progress=False)[0]
    # spelled out (the library default before issue 13's study): the shapes, not the fit, decide size and speed
    yield "default-pruned", depgraph.prune(copy.deepcopy(dense), calib, target=0.2, method="activation",
                                           policy="uniform", reconstruct=False, progress=False)[0]


def run(args, results: Results) -> None:
    torch.set_num_threads(args.threads)
    dense, tok = load_smollm2()
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    tmp = Path(tempfile.mkdtemp(prefix="depgraph-bench-deploy-"))
    models, llms = {}, {}
    for name, model in variants(dense, tok):
        model.eval()
        row = {"params": sum(p.numel() for p in model.parameters()), "gguf_arch": plan(model)[0]}
        folder = depgraph.save_pruned(model, tmp / name, tokenizer=tok)
        row["folder_mib"] = round(folder_mib(folder), 1)
        row["stock_remote_code"] = (folder / "modeling_depgraph.py").exists()
        row["stock_load_s"] = round(stock_load_s(folder, tmp), 2)
        row["load_avg"] = [round(x, 2) for x in os.getloadavg()]
        row["gguf_mib"] = {}
        for outtype in OUTTYPES:
            path = export_gguf(model, tok, tmp / f"{name}.{outtype}.gguf", outtype=outtype)
            row["gguf_mib"][outtype] = round(path.stat().st_size / 2**20, 1)
            llms[name, outtype] = open_llama(path, threads=args.threads)
        exact = open_llama(tmp / f"{name}.f32.gguf", threads=args.threads, f32_cache=True)
        check = compare(model, exact, ids, new_tokens=32)
        exact.close()
        row["f32_check"] = {k: check[k] for k in ("max_abs_diff", "logit_scale", "top1_equal_all", "greedy_equal")}
        row["greedy_text"] = tok.decode(check["greedy_llama"])
        models[name] = model
        results.data.setdefault("rows", {})[name] = row
        results.save()  # a partial run keeps its rows
        print(name, json.dumps(row), flush=True)
    speeds, load_start = {}, os.getloadavg()
    for _ in range(args.rounds):  # back to back: every runtime and model once per round
        for name, model in models.items():
            speeds.setdefault((name, "transformers"), []).append(hf_decode_tps(model, ids, args.new_tokens))
            for outtype in OUTTYPES:
                speeds.setdefault((name, outtype), []).append(llama_decode_tps(llms[name, outtype], ids,
                                                                               args.new_tokens))
    for name in models:
        row = results.data["rows"][name]
        row["decode_tps"] = {rt: round(statistics.median(v), 1) for (n, rt), v in speeds.items() if n == name}
    results.data["protocol"] = {"prompt": PROMPT, "new_tokens": args.new_tokens, "rounds": args.rounds,
                                "threads": args.threads, "machine": platform.processor() or platform.machine(),
                                "cpus": os.cpu_count(), "load_avg_at_start": load_start,
                                "load_avg_at_end": os.getloadavg()}
    results.save()
    for llm in llms.values():
        llm.close()


def markdown(data: dict) -> str:
    rows, p = data["rows"], data.get("protocol")
    speed = p is not None and all("decode_tps" in r for r in rows.values())
    dense = rows["dense"]["decode_tps"] if speed else None
    lines = [
        "# Deployment: stock transformers, GGUF / llama.cpp (SmolLM2-135M-Instruct)", "",
        "Generated by `bench/deploy.py`. Pruned models remove 20% of all parameters with `depgraph.prune`'s "
        "pre-study defaults, spelled out in the script (activation scores, no reconstruction, 10 x 64 "
        "self-generated calibration tokens, MLP neurons, layers 1-28); `uniform` keeps "
        "one width in every layer. Folder: `save_pruned` output (f32 safetensors, tokenizer, card). Stock load: "
        "`AutoModelForCausalLM.from_pretrained` in a fresh interpreter without depgraph, median of 3 (non-uniform: "
        "`trust_remote_code=True`). llama.cpp: llama-cpp-python 0.3.36 built from source, CPU; the agreement check uses "
        "f32 weights and an f32 KV cache, the speed runs llama.cpp's default f16 KV cache. "
        + (f"Decode: greedy tokens/s after the prompt {p['prompt']!r}, decode steps only, {p['new_tokens']} tokens, "
        f"{p['threads']} threads in both runtimes, median of {p['rounds']} back-to-back rounds on a shared "
        f"{p['cpus']}-core machine (1/5/15-minute load average at the start of the speed rounds "
        f"{'/'.join(f'{x:.1f}' for x in p.get('load_avg_at_start', []))}, at the end "
        f"{'/'.join(f'{x:.1f}' for x in p['load_avg_at_end'])})." if speed else
           f"**Partial run**: rows for {', '.join(rows)} only, the decode-speed rounds were not reached "
           f"(stock load times on the shared 2-core machine; load average "
           f"{'recorded per row' if all('load_avg' in r for r in rows.values()) else 'not recorded in this run'})."), "",
        "| model | params | folder MiB | stock load s | GGUF arch | GGUF MiB f32 / f16 / q8_0 | f32 max abs diff "
        "(logit scale) | top-1 all / greedy 32 equal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        c = r["f32_check"]
        g = r["gguf_mib"]
        lines.append(f"| {name} | {r['params']:,} | {r['folder_mib']} | {r['stock_load_s']}"
                     f"{' (remote code)' if r['stock_remote_code'] else ''} | {r['gguf_arch']} | "
                     f"{g['f32']} / {g['f16']} / {g['q8_0']} | {c['max_abs_diff']:.2e} ({c['logit_scale']:.1f}) | "
                     f"{'yes' if c['top1_equal_all'] else 'NO'} / {'yes' if c['greedy_equal'] else 'NO'} |")
    if not speed:
        return "\n".join(lines + ["", "Greedy continuations in llama.cpp (f32):", ""]
                         + [f"- {name}: {r['greedy_text']!r}" for name, r in rows.items()]) + "\n"
    lines += ["", "| model | transformers f32 tok/s | llama.cpp f32 / f16 / q8_0 tok/s | llama.cpp f32 / transformers | "
              "speed-up vs dense in llama.cpp f32 / f16 / q8_0 |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        s = r["decode_tps"]
        lines.append(f"| {name} | {s['transformers']} | {s['f32']} / {s['f16']} / {s['q8_0']} | "
                     f"{s['f32'] / s['transformers']:.2f}x | "
                     + " / ".join(f"{s[o] / dense[o]:.2f}x" for o in OUTTYPES) + " |")
    lines += ["", "Decode speed-up of each pruned model over dense in the same round-robin (issue 13: ideal = the "
              "parameter ratio; share = speed-up / ideal):", "",
              "| model | ideal | transformers speed-up (share) | llama.cpp f32 speed-up (share) | "
              "llama.cpp q8_0 speed-up (share) |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        if name == "dense":
            continue
        s, ideal = r["decode_tps"], rows["dense"]["params"] / r["params"]
        cells = [f"{s[rt] / dense[rt]:.3f} ({s[rt] / dense[rt] / ideal:.2f})" for rt in ("transformers", "f32", "q8_0")]
        lines.append(f"| {name} | {ideal:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "Greedy continuations in llama.cpp (f32):", ""]
    lines += [f"- {name}: {r['greedy_text']!r}" for name, r in rows.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown-only", action="store_true")
    args = parser.parse_args()
    results = Results(RESULTS / "deploy.json")
    if not args.markdown_only:
        results.data = {}
        run(args, results)
    (RESULTS / "deploy.md").write_text(markdown(results.data))
    print((RESULTS / "deploy.md").read_text())


if __name__ == "__main__":
    main()
