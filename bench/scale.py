"""Benchmark streamed pruning (issue 14): models larger than memory, one decoder block resident at a time.

    nice -n 10 python bench/scale.py smollm2          # streamed vs in-memory on SmolLM2 (ratio of time and RSS)
    nice -n 10 python bench/scale.py llama2-7b        # random bf16 checkpoint with Llama-2-7B's exact config
    nice -n 10 python bench/scale.py llama3-8b        # the same with Llama-3-8B's config (GQA, 128k vocab)
    nice -n 10 python bench/scale.py llama2-7b --refit  # with the least-squares re-fit (today's default), damp 1
    python bench/scale.py table                       # rewrite scale.md from scale.json

Every measurement runs in its own process, so each peak RSS (``ru_maxrss``) is that run's alone. The random
checkpoints are generated once (seeded, N(0, 0.02) weights, unit norms, bf16 safetensors, one shard per block) into
``$DEPGRAPH_CACHE/bench`` (default ``~/.cache/depgraph/bench``); the numbers are about memory and time, not quality.
Protocol: 20% of all parameters, the default method (activation scores, MLP neurons, every layer but the first and the
last, uniform policy), without the least-squares re-fit (``reconstruct=False``: the re-fit became the default after the
first rows) or, in the rows marked "+ re-fit", with it (``reconstruct=True``, damp 1: every block's ``down_proj``
re-fitted on the hidden states of the already-pruned blocks before it; the Gram matrix and the solve in float32 for
these bf16 checkpoints, ``gram_dtype`` by the checkpoint; float64 Gram matrices in the 4.12 GB row of session 6, a
float64 solve in the 3.59 GB / 2363 s row of session 7), 10 x 64 calibration tokens (random ids, seeded: no Llama tokenizer is
available offline; SmolLM2 uses its WikiText-2 windows), block math in fp32 on the CPU (``compute_dtype=float32``: bf16 matmuls are
~10x slower on this CPU), output weights bf16. Checks: the output's safetensors headers give exactly the shapes in
its config record (the model builds on the meta device with them), and block 1 (block 0 is left whole by
``layers="auto"``) pruned in memory from the same checkpoint (a 2-block model in fp32 on the same calibration rows)
gets the same scores, the same removed units, bit-identical bf16 tensors and the same output on the same inputs
(with the re-fit: block 1 re-fitted in memory by ``depgraph.reconstruct`` on the same calibration rows; its re-fitted
fp32 weights are rounded to bf16, the written dtype, before they are compared and run).
Results: bench/results/scale.json and scale.md (partial results are written after every run).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, Results

CONFIGS = {
    "llama2-7b": dict(name="Llama-2-7B", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
    "llama3-8b": dict(name="Llama-3-8B", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False),
}
LLAMA3_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=128256)
N_SAMPLES, SEQ_LEN, TARGET = 10, 64, 0.2
RSS_TARGET_GB, WALL_TARGET_S = 4.0, 1800
REFIT = "+refit"  # results key suffix of the rows with the least-squares re-fit
OUT = RESULTS / "scale.json"


def _cache() -> Path:
    root = os.environ.get("DEPGRAPH_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "depgraph") / "bench"


def _peak_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def _load() -> list:
    """The machine's 1/5/15-minute load averages (shared CPU: every wall-clock figure carries them)."""
    return [round(x, 2) for x in os.getloadavg()]


def _config(key: str):
    from transformers import LlamaConfig

    fields = {k: v for k, v in CONFIGS[key].items() if k != "name"}
    return LlamaConfig(**fields, dtype="bfloat16", architectures=["LlamaForCausalLM"], use_cache=False)


# -- jobs (each in its own process) --------------------------------------------------------------
def job_generate(key: str) -> dict:
    """Write the random bf16 checkpoint of ``key`` block by block (never more than one block in memory)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from depgraph.io import atomic_folder

    dest = _cache() / key
    if (dest / "model.safetensors.index.json").is_file():
        total = json.loads((dest / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        return {"generated": False, "folder": str(dest), "bytes": total}
    t0 = time.perf_counter()
    config = _config(key)
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    layers = config.num_hidden_layers
    groups = [[n for n in shapes if n.startswith(f"model.layers.{i}.")] for i in range(layers)]
    groups.append([n for n in shapes if not n.startswith("model.layers.")])
    weight_map, total = {}, 0
    with atomic_folder(dest) as tmp:
        for k, names in enumerate(groups):
            tensors = {}
            for j, n in enumerate(names):
                if n.endswith("norm.weight"):
                    tensors[n] = torch.ones(shapes[n], dtype=torch.bfloat16)
                else:
                    g = torch.Generator().manual_seed(1000 * k + j)
                    tensors[n] = (torch.randn(shapes[n], generator=g) * 0.02).to(torch.bfloat16)
            name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({n: name for n in tensors})
            total += sum(t.numel() * 2 for t in tensors.values())
            del tensors
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        config.save_pretrained(tmp)
    return {"generated": True, "folder": str(dest), "bytes": total, "generate_s": round(time.perf_counter() - t0, 1),
            "peak_rss_gb": _peak_gb()}


def _random_calibration(vocab: int):
    import torch

    return torch.randint(0, vocab, (N_SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(0))


def _smollm2_calibration():
    from depgraph.calibration import load_calibration
    from depgraph.models import load_model

    _, tok = load_model()
    return load_calibration("wikitext2", tok, n_samples=N_SAMPLES, seq_len=SEQ_LEN, seed=0)


def job_stream(key: str, out: str, log: str = "", refit: str = "") -> dict:
    import torch

    from depgraph.stream import StreamSettings, prune_streamed

    if key == "smollm2":
        from depgraph.models import smollm2_path

        folder, calib, compute = smollm2_path(), _smollm2_calibration(), None
    else:
        folder, calib, compute = _cache() / key, _random_calibration(CONFIGS[key]["vocab_size"]), torch.float32
    t0 = time.perf_counter()
    settings = StreamSettings(target=TARGET, reconstruct=bool(refit), compute_dtype=compute, progress=False,
                              log=log or None)
    _, report, _ = prune_streamed(folder, calib, out, settings)
    s = report["stream"]
    blocks = s["blocks"]
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gb": _peak_gb(), "load_avg_at_end": _load(),
            "trace_s": round(report["times"]["trace_s"], 2), "capture_s": round(report["times"]["capture_s"], 2),
            "score_pass_s": round(report["times"]["score_s"], 1), "write_pass_s": round(report["times"]["shrink_s"], 1),
            "block_score_s": round(sum(b["score_s"] for b in blocks) / len(blocks), 2),
            "block_write_s": round(sum(b["write_s"] for b in blocks) / len(blocks), 2),
            "max_block_rss_gb": round(max(max(b["rss_gb_score"], b["rss_gb_write"]) for b in blocks), 3),
            "removed_fraction": round(report["removed_fraction"], 4), "params_before": report["params_before"],
            "params_after": report["params_after"], "dtype": s["dtype"], "compute_dtype": s["compute_dtype"],
            "verify_max_abs": max((b["verify_max_abs"] or 0.0) for b in blocks), "blocks": len(blocks),
            "reconstruct": bool(refit), "damp": report["damp"]}


def job_memory(out: str) -> dict:
    """SmolLM2 pruned in memory with the same settings (load, prune, save)."""
    import depgraph
    from depgraph.models import load_model

    calib = _smollm2_calibration()
    t0 = time.perf_counter()
    model, _ = load_model()
    _, report, plans = depgraph.prune(model, calib, target=TARGET, reconstruct=False, progress=False)
    depgraph.save_pruned(model, out, extra_files={"plan.json": plans[0].to_json(indent=1)})
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gb": _peak_gb(), "load_avg_at_end": _load(),
            "removed_fraction": round(report["removed_fraction"], 4), "params_after": report["params_after"]}


def job_compare(a: str, b: str) -> dict:
    import torch

    from depgraph.io import load_pruned

    x, y = load_pruned(a), load_pruned(b)
    sx, sy = x.state_dict(), y.state_dict()
    same = sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)
    diff = max(float((sx[k].float() - sy[k].float()).abs().max()) for k in sx) if sx.keys() == sy.keys() else None
    pa, pb = (json.loads((Path(f) / "plan.json").read_text()) for f in (a, b))
    out = {"bit_identical": same, "max_abs_diff": diff, "same_plan": pa == pb}
    if pa != pb:  # say where they differ
        out["plan_diff"] = _first_diff(pa, pb)
    return out


def _first_diff(x, y, path="") -> str:
    """The first path at which two JSON values differ, with both values (cut short)."""
    if isinstance(x, dict) and isinstance(y, dict):
        for k in sorted(set(x) | set(y), key=str):
            if x.get(k) != y.get(k):
                return _first_diff(x.get(k), y.get(k), f"{path}.{k}")
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        for i, (u, v) in enumerate(zip(x, y)):
            if u != v:
                return _first_diff(u, v, f"{path}[{i}]")
    return f"{path}: {str(x)[:120]} != {str(y)[:120]}"


def job_check(key: str, out: str, refit: str = "") -> dict:
    """Shapes of the output on the meta device, and block 1 against an in-memory prune of a 2-block model."""
    import numpy as np
    import torch
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    import depgraph
    from depgraph.importance import score
    from depgraph.plan import Plan
    from depgraph.sparsify import capture_layer_inputs, run_layer
    from depgraph.stream import Checkpoint

    out = Path(out)
    record = json.loads((out / "config.json").read_text())["depgraph"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    header = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(out / shard), framework="pt") as f:
            header.update({k: list(f.get_slice(k).get_shape()) for k in f.keys()})
    shapes_ok = all(header[k] == v for k, v in record["shapes"].items() if k in header) and \
        set(header) <= set(record["shapes"])
    with init_empty_weights():
        meta = LlamaForCausalLM(_config(key))
    meta_ok = True
    for name, shape in record["shapes"].items():  # the record rebuilds every planned shape on the meta twin
        mod, _, attr = name.rpartition(".")
        p = meta.get_submodule(mod)._parameters.get(attr)
        meta_ok &= p is not None and len(p.shape) == len(shape)

    # block 1 in memory: a 2-block model of the same checkpoint, fp32 (the streamed block math's dtype)
    config = _config(key)
    config.num_hidden_layers = 2
    src = Checkpoint(_cache() / key)
    with init_empty_weights(include_buffers=False):
        small = LlamaForCausalLM(config)
    names = [n for n in small.state_dict() if n in src.where]
    small.load_state_dict({k: v.float() for k, v in src.read(names).items()}, strict=True, assign=True)
    small.eval()
    calib = _random_calibration(config.vocab_size)
    graph = depgraph.trace(small)
    mem_scores = score(small, graph, calib, method="activation", kinds=("mlp",), progress=False)
    plan = Plan.from_json((out / "plan.json").read_text())
    report = json.loads((out / "report.json").read_text())
    stream_scores = {g["group"]: np.asarray(g["scores"]) for g in report["groups"]}
    entry = next(e for e in plan.entries if e.layer == 1)
    same_scores = bool(np.array_equal(mem_scores[entry.group], stream_scores[entry.group]))
    k = len(entry.units)
    same_units = sorted(np.argsort(mem_scores[entry.group], kind="stable")[:k].tolist()) == entry.units
    touched = {p for p in entry.removed}
    sub = Plan([entry], {p: s for p, s in plan.shapes.items() if p in touched})
    if refit:  # block 1's down_proj re-fitted in memory on the same rows (block 0 is whole: the same inputs)
        from depgraph.reconstruct import ReconstructConfig, reconstruct

        gram = getattr(torch, str(report["stream"]["gram_dtype"]).removeprefix("torch."))  # the streamed run's
        reconstruct(small, sub, calib, ReconstructConfig(damp=float(report["damp"]), gram_dtype=gram))
    item = capture_layer_inputs(small, small.model.layers, [calib[:1]], torch.device("cpu"))[0]
    item[0] = run_layer(small.model.layers[0], item)
    depgraph.shrink(small, sub)
    with torch.no_grad():
        for p in small.model.layers[1].parameters():  # the written dtype's values (a no-op unless re-fitted)
            p.copy_(p.bfloat16().float())
        y_mem = run_layer(small.model.layers[1], item)
    written = {}
    for shard in sorted({index[n] for n in index if n.startswith("model.layers.1.")}):
        with safe_open(str(out / shard), framework="pt") as f:
            written.update({n: f.get_tensor(n) for n in f.keys() if n.startswith("model.layers.1.")})
    state = small.state_dict()
    same_tensors = all(torch.equal(state[n].bfloat16(), t) for n, t in written.items())
    block = small.model.layers[1]
    block.load_state_dict({n.removeprefix("model.layers.1."): t.float() for n, t in written.items()})
    with torch.no_grad():
        y_out = run_layer(block, item)
    return {"shapes_match_headers": shapes_ok, "meta_rebuild": meta_ok, "block1_same_scores": same_scores,
            "block1_same_units": same_units, "block1_bit_identical": same_tensors,
            "block1_output_max_abs": float((y_mem - y_out).abs().max()), "peak_rss_gb": _peak_gb()}


JOBS = {"generate": job_generate, "stream": job_stream, "memory": job_memory, "compare": job_compare,
        "check": job_check}


def _run(*args, timeout=3600) -> dict:
    cmd = [sys.executable, __file__, "--job", *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout} s", "process_s": round(time.perf_counter() - t0)}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "process_s": round(time.perf_counter() - t0)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- driver ---------------------------------------------------------------------------------------
def _save(results: Results, key: str, row: dict) -> None:
    """Write ``row`` under ``key``, re-reading the file first (the benchmarks may run side by side)."""
    results.data = {**Results(OUT).data, "machine": results.data.get("machine"), key: row}
    results.save()


def bench_smollm2(results: Results) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="scale-smollm2-") as tmp:
        mem = _run("memory", f"{tmp}/memory")
        stream = _run("stream", "smollm2", f"{tmp}/stream")
        compare = _run("compare", f"{tmp}/memory", f"{tmp}/stream")
    row = {"memory": mem, "stream": stream, "compare": compare}
    if "error" not in mem and "error" not in stream:
        row["time_ratio"] = round(stream["wall_s"] / mem["wall_s"], 2)
        row["rss_ratio"] = round(stream["peak_rss_gb"] / mem["peak_rss_gb"], 2)
    _save(results, "smollm2", row)


def bench_big(results: Results, key: str, refit: bool = False) -> None:
    row, name, flag = {"generate": _run("generate", key)}, key + REFIT * refit, "1" * refit
    _save(results, name, row)
    out, log = _cache() / f"{name}-pruned", _cache() / f"{name}-stream.jsonl"
    log.unlink(missing_ok=True)
    row["stream"] = _run("stream", key, str(out), str(log), flag, timeout=int(os.environ.get("SCALE_TIMEOUT", 5400)))
    row["blocks"] = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    _save(results, name, row)
    if "error" not in row["stream"]:
        row["check"] = _run("check", key, str(out), flag)
        _save(results, name, row)
    import shutil

    shutil.rmtree(out, ignore_errors=True)  # keep the disk free; the source checkpoint stays cached


def _per_block(key_cfg: dict) -> int:
    h, i = key_cfg["hidden_size"], key_cfg["intermediate_size"]
    kv = h // key_cfg["num_attention_heads"] * key_cfg["num_key_value_heads"]
    return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h


def _wall(run: dict) -> str:
    """A wall-clock cell with the load average at the end of the run, when it was recorded."""
    load = run.get("load_avg_at_end")
    return f"{run.get('wall_s')}" + (f" (load {'/'.join(map(str, load))})" if load else " (load not recorded)")


def table(results: Results) -> str:
    d = results.data
    lines = ["# Streamed pruning: models larger than memory (bench/scale.py)", "",
             f"Machine: {d.get('machine', platform.processor() or platform.machine())}, CPU only (no GPU this "
             f"session: the `--device cuda` row is not measured), shared with other jobs, run under `nice -n 10`.",
             "", "Protocol: " + " ".join(__doc__.split("Protocol:")[1].split("Results:")[0].split()), ""]
    lines += ["| model | mode | weights / block math | wall (s) | peak RSS (GB) | per block: score / write (s) | "
              "removed | checks |", "|---|---|---|---|---|---|---|---|"]
    sm = d.get("smollm2")
    if sm:
        m, s, c = sm["memory"], sm["stream"], sm["compare"]
        lines.append(f"| SmolLM2-135M | in memory | fp32 | {_wall(m)} | {m.get('peak_rss_gb')} | - | "
                     f"{m.get('removed_fraction')} | - |")
        lines.append(f"| SmolLM2-135M | streamed | fp32 / fp32 | {_wall(s)} | {s.get('peak_rss_gb')} | "
                     f"{s.get('block_score_s')} / {s.get('block_write_s')} | {s.get('removed_fraction')} | "
                     f"same plan: {c.get('same_plan')}, bit-identical weights: {c.get('bit_identical')}; "
                     f"streamed/in-memory time {sm.get('time_ratio')}x, RSS {sm.get('rss_ratio')}x |")
    for name in [k + suffix for k in CONFIGS for suffix in ("", REFIT)]:
        key, row = name.removesuffix(REFIT), d.get(name)
        mode = "streamed + re-fit" if name.endswith(REFIT) else "streamed"
        if not row or "stream" not in row:
            continue
        s, ck, g = row["stream"], row.get("check", {}), row.get("generate", {})
        if "error" in s:
            done = row.get("blocks", [])
            sc = [b["score_s"] for b in done if b["stage"] == "score"]
            wr = [b["write_s"] for b in done if b["stage"] == "write"]
            part = (f"partial: {len(sc)} blocks scored, {len(wr)} written in {done[-1]['elapsed_s']} s" if done
                    else "no block finished")
            lines.append(f"| {CONFIGS[key]['name']} | {mode} | bf16 / fp32 | {s['error']} ({part}) | "
                         f"{max((b['peak_rss_gb'] for b in done), default='-')} | "
                         f"{round(sum(sc) / len(sc), 1) if sc else '-'} / {round(sum(wr) / len(wr), 1) if wr else '-'}"
                         f" | | |")
            continue
        checks = ", ".join(f"{k} {v}" for k, v in ck.items() if k != "peak_rss_gb")
        index = _cache() / key / "model.safetensors.index.json"
        size = g.get("bytes") or (json.loads(index.read_text())["metadata"]["total_size"] if index.is_file() else 0)
        lines.append(f"| {CONFIGS[key]['name']} (random, {size / 1e9:.1f} GB bf16) | {mode} | "
                     f"{s['dtype'].replace('torch.', '')} / {s['compute_dtype'].replace('torch.', '')} | "
                     f"{_wall(s)} | {s['peak_rss_gb']} | {s['block_score_s']} / {s['block_write_s']} | "
                     f"{s['removed_fraction']} | {checks} |")
        if name == key:
            lines.append(f"| {CONFIGS[key]['name']} | `--device cuda` | - | not measured: no GPU this session | | | | |")
    lines += ["", "Targets (Llama-2-7B): peak RSS <= 4 GB, whole run <= 30 min."]
    row7 = d.get("llama2-7b", {})
    big = row7.get("stream", {})
    done = row7.get("blocks", [])
    sc = [b["score_s"] for b in done if b["stage"] == "score"]
    wr = [b["write_s"] for b in done if b["stage"] == "write"]
    if "wall_s" in big:
        lines.append(f"Measured: peak RSS {big['peak_rss_gb']} GB "
                     f"({'met' if big['peak_rss_gb'] <= RSS_TARGET_GB else 'NOT met'}), wall {big['wall_s']} s "
                     f"({'met' if big['wall_s'] <= WALL_TARGET_S else 'NOT met'}).")
    refit7 = d.get("llama2-7b" + REFIT, {}).get("stream", {})
    if "wall_s" in refit7:
        lines.append(f"With the re-fit: peak RSS {refit7['peak_rss_gb']} GB "
                     f"({'met' if refit7['peak_rss_gb'] <= RSS_TARGET_GB else 'NOT met'}), wall {refit7['wall_s']} s "
                     f"({'met' if refit7['wall_s'] <= WALL_TARGET_S else 'NOT met'}) at load averages (1/5/15 min) "
                     f"{'/'.join(str(x) for x in refit7.get('load_avg_at_end', []))} at its end.")
    elif done:
        lines.append(f"Not finished: {big.get('error')}; peak RSS so far {max(b['peak_rss_gb'] for b in done)} GB.")
    if sc:
        per, per70 = _per_block(CONFIGS["llama2-7b"]), _per_block(LLAMA3_70B)
        scale = per70 / per
        block_s = sum(sc) / len(sc) + (sum(wr) / len(wr) if wr else 0.0)
        t70 = block_s * scale * LLAMA3_70B["num_hidden_layers"]
        block_gb = per70 * 2 / 1e9
        lines += ["", "## 70B on paper (from the Llama-2-7B per-block figures)", "",
                  f"A Llama-3-70B block has {per70 / 1e6:.0f} M parameters, {scale:.1f}x a Llama-2-7B block "
                  f"({per / 1e6:.0f} M); 80 blocks. Streamed on this machine: {block_s:.1f} s per 7B block "
                  f"(score pass{' + write pass' if wr else ', write pass not measured'}) x {scale:.1f} x 80 = about "
                  f"{t70 / 3600:.1f} h at the same load (time scaled by parameters, same 10 x 64 tokens). Memory: "
                  f"{block_gb:.1f} GB for the resident bf16 block + {2 * block_gb:.1f} GB for its fp32 copy "
                  f"(block math in fp32) + {LLAMA3_70B['vocab_size'] * LLAMA3_70B['hidden_size'] * 2 / 1e9:.1f} GB "
                  f"for the bf16 embedding during the capture only, plus ~1 GB of graph and runtime: about 6-7 GB. "
                  f"With bf16 block math (GPUs) the fp32 copy goes away. Dispatched in memory across GPUs instead "
                  f"(accelerate `device_map='auto'`): 141 GB of bf16 weights, 17.6 GB per GPU on 8 GPUs; see "
                  f"examples/llama70b.md."]
    return "\n".join(lines) + "\n"


def main(argv) -> int:
    if argv and argv[0] == "--job":
        print(json.dumps(JOBS[argv[1]](*argv[2:])))
        return 0
    results = Results(OUT)
    results.data["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, " \
                              f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GB RAM"
    what = argv[0] if argv else "smollm2"
    if what == "smollm2":
        bench_smollm2(results)
    elif what in CONFIGS:
        bench_big(results, what, refit="--refit" in argv[1:])
    elif what != "table":
        raise SystemExit(f"unknown benchmark {what!r}; choose smollm2, {', '.join(CONFIGS)} or table")
    results.data = {**Results(OUT).data, "machine": results.data["machine"]}
    (RESULTS / "scale.md").write_text(table(results))
    print((RESULTS / "scale.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
