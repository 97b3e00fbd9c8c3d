"""Benchmark the tracer: big configs on the meta device, SmolLM2 against torch-pruning, shrink time.

Writes bench/results/trace.json and bench/results/trace.md. Each measurement runs in its own process so
peak RSS is per measurement. Targets (issue 2): 7B trace <= 10 s, 70B <= 60 s, peak RSS <= 3 GB; ours
no slower than torch-pruning's DependencyGraph build on SmolLM2; shrink of SmolLM2 by 20% <= 2 s.
"""
from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

CONFIGS = {
    "Llama-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "Llama-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}


# the sweep's largest real-size configs (bench/coverage.py): MoE and MLA at full size, on meta, no weights
BIG = {
    "Mixtral-8x7B": ("MixtralConfig", "MixtralForCausalLM", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768)),
    "DeepSeek-V3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
        n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=3,
        q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)),
}


def _big_model(name: str):
    import torch
    import transformers

    cfg_name, cls_name, kw = BIG[name]
    cfg = getattr(transformers, cfg_name)(**kw)
    cfg.use_cache = False
    with torch.device("meta"):
        return getattr(transformers, cls_name)(cfg).eval()


def job_big(name: str) -> dict:
    """depgraph.trace of a full-size config on meta: groups found, seconds, peak RSS."""
    import torch

    import depgraph

    exports = []  # every torch.export the trace runs (its one capture, plus any fallback or perturbed re-export,
    # failed ones included: a perturbed forward may break by design)
    inner = torch.export.export

    def counted(*a, **k):
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            exports.append(round(time.perf_counter() - t, 2))
    torch.export.export = counted
    model = _big_model(name)
    t0, c0 = time.perf_counter(), time.process_time()
    graph = depgraph.trace(model)
    groups = graph.groups()
    counts: dict = {}
    for g in groups:
        counts[g.kind] = counts.get(g.kind, 0) + 1
    return {"model": name, "trace_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2),
            "peak_rss_mb": round(_rss_mb()),
            "groups": len(groups), "kinds": counts, "unsupported": len(graph.unsupported), "exports_s": exports}


def job_export(name: str) -> dict:
    """A bare torch.export of the same meta model (what the trace is compared with)."""
    import torch

    from depgraph.capture import meta_twin

    twin = meta_twin(_big_model(name))
    t0, c0 = time.perf_counter(), time.process_time()
    torch.export.export(twin, (torch.zeros(2, 8, dtype=torch.long, device="meta"),), strict=False)
    return {"model": name, "export_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2),
            "peak_rss_mb": round(_rss_mb())}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def job_config(name: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import depgraph

    cfg = LlamaConfig(**CONFIGS[name])
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    t0 = time.perf_counter()
    graph = depgraph.trace(model)
    groups = graph.groups()
    wall = time.perf_counter() - t0
    return {"model": name, "trace_s": round(wall, 2), "peak_rss_mb": round(_rss_mb()),
            "groups": len(groups), "params": graph.num_params}


def _smollm2(mha: bool):
    from depgraph.models import load_model

    model, _ = load_model()
    model.config.use_cache = False  # torch-pruning walks the outputs' grad_fn; a KV cache tuple breaks it
    if mha:  # torch-pruning hangs on some GQA shapes: an MHA twin with the same sizes otherwise
        from transformers import LlamaForCausalLM

        cfg = model.config.__class__.from_dict(model.config.to_dict())
        cfg.num_key_value_heads = cfg.num_attention_heads
        model = LlamaForCausalLM(cfg).eval()
    return model


def job_ours(mha: str) -> dict:
    import depgraph

    model = _smollm2(mha == "mha")
    t0 = time.perf_counter()
    graph = depgraph.trace(model)
    graph.groups()
    return {"trace_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(_rss_mb())}


def job_tp(mha: str) -> dict:
    import torch
    import torch_pruning as tp

    model = _smollm2(mha == "mha")
    ids = torch.zeros(2, 8, dtype=torch.long)
    t0 = time.perf_counter()
    tp.DependencyGraph().build_dependency(model, example_inputs=ids)
    return {"build_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(_rss_mb())}


def job_shrink(_: str) -> dict:
    import depgraph

    model = _smollm2(False)
    graph = depgraph.trace(model)
    plan = depgraph.Plan.random(graph, 0.2, kinds=("attention", "mlp"))
    before = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    depgraph.shrink(model, plan)
    wall = time.perf_counter() - t0
    after = sum(p.numel() for p in model.parameters())
    return {"shrink_s": round(wall, 3), "params_before": before, "params_after": after}


def run(job: str, arg: str, timeout: float) -> dict:
    try:
        proc = subprocess.run([sys.executable, __file__, "--job", job, arg], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"timeout_s": timeout}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    out = {"machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
           "python": platform.python_version()}
    out["configs"] = [run("config", name, 600) for name in CONFIGS]
    ours_gqa = run("ours", "gqa", 600)
    tp_gqa = run("tp", "gqa", 120)
    ours_mha = run("ours", "mha", 600)
    tp_mha = run("tp", "mha", 600)
    out["smollm2"] = {"ours_gqa": ours_gqa, "torch_pruning_gqa": tp_gqa, "ours_mha_twin": ours_mha,
                      "torch_pruning_mha_twin": tp_mha}
    out["shrink"] = run("shrink", "-", 600)
    out["big"] = big_rows()
    write(out)


def big_rows(rounds: int = 3) -> list:
    """Trace and bare export of each BIG config, each in its own process, alternating for ``rounds`` rounds (the
    shared machine's load drifts: the ratio is of the medians), with the load average before each round."""
    import os

    rows = []
    for name in BIG:
        row = {"model": name, "rounds": []}
        for _ in range(rounds):
            one = {"load_before": round(os.getloadavg()[0], 2), "trace": run("big", name, 1800)}
            one["export"] = run("export", name, 1800)
            row["rounds"].append(one)
        rows.append(row)
    return rows


def _median(values: list):
    values = sorted(values)
    return values[len(values) // 2] if values else None


def big_line(row: dict) -> str:
    """One markdown row of :func:`big_rows`: medians over the rounds that completed."""
    done = [r for r in row["rounds"] if "trace_s" in r["trace"] and "export_s" in r["export"]]
    if not done:
        return f"| {row['model']} | {row['rounds'][0]['trace']} | | | | | | | | |"
    med = {k: _median([r["trace"][k] for r in done]) for k in ("trace_s", "cpu_s", "peak_rss_mb")}
    own = _median([sum(r["trace"].get("exports_s", [])) for r in done])
    bare = {k: _median([r["export"][k] for r in done]) for k in ("export_s", "cpu_s", "peak_rss_mb")}
    loads = [r["load_before"] for r in done]
    exports = _median([len(r["trace"].get("exports_s", [])) for r in done])
    return (f"| {row['model']} | {med['trace_s']} | {own:.2f} ({exports}) | {med['trace_s'] - own:.2f} "
            f"| {bare['export_s']} | **{med['trace_s'] / bare['export_s']:.2f}** | {med['cpu_s'] / bare['cpu_s']:.2f} "
            f"| {med['peak_rss_mb']} / {bare['peak_rss_mb']} | {done[-1]['trace'].get('kinds')} "
            f"| {len(done)}, load {min(loads)}-{max(loads)} |")


def write(out: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "trace.json").write_text(json.dumps(out, indent=2) + "\n")
    text = markdown(out)
    (RESULTS / "trace.md").write_text(text)
    print(text)


def markdown(out: dict) -> str:
    lines = ["# Trace benchmark", "", f"Machine: {out['machine']}. Each row is its own process.", "",
             "| model (meta device) | trace + groups (s) | target (s) | peak RSS (MB) | groups |",
             "|---|---|---|---|---|"]
    for row, target in zip(out["configs"], (10, 60)):
        lines.append(f"| {row.get('model', '?')} | {row.get('trace_s', row)} | {target} | {row.get('peak_rss_mb')} "
                     f"| {row.get('groups')} |")
    s = out["smollm2"]

    def secs(d, key):
        return f"{d[key]}" if key in d else ("timed out after %ss" % d["timeout_s"] if "timeout_s" in d else d)

    lines += ["", "| SmolLM2-135M | depgraph trace (s) | torch-pruning build (s) | ratio (ours / theirs) |",
              "|---|---|---|---|"]
    for label, ours, theirs in (("GQA 9q/3kv (real)", s["ours_gqa"], s["torch_pruning_gqa"]),
                                ("MHA twin 9q/9kv", s["ours_mha_twin"], s["torch_pruning_mha_twin"])):
        ratio = (f"{ours['trace_s'] / theirs['build_s']:.2f}" if "trace_s" in ours and "build_s" in theirs
                 else "n/a")
        lines.append(f"| {label} | {secs(ours, 'trace_s')} | {secs(theirs, 'build_s')} | {ratio} |")
    sh = out["shrink"]
    lines += ["", f"Shrink of SmolLM2 by a random 20% plan over heads and neurons: {sh.get('shrink_s')} s "
              f"(target 2 s), {sh.get('params_before'):,} -> {sh.get('params_after'):,} parameters.", ""]
    lines += ["", "Full-size MoE / MLA configs on meta (no weights; token ids [2, 8]; fp32 meta parameters): "
              "depgraph.trace + groups() and a bare non-strict torch.export of the same meta twin, each in its own "
              "process, alternating for a few rounds on this shared 2-core machine (1 thread; the 1-minute load "
              "averages before the rounds are given); every figure is the median over the rounds, the ratio is of the "
              "wall-clock medians (target 1.5x), the CPU ratio of the process CPU times (less sensitive to the other "
              "jobs on the machine).", "",
              "| model | trace + groups (s) | its export (s) (exports) | the rest: rules, layouts, groups (s) "
              "| bare export (s) | ratio | CPU-time ratio | peak RSS trace / export (MB) | groups | rounds |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [big_line(row) for row in out.get("big", ()) if "rounds" in row]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--job":
        print(json.dumps(globals()[f"job_{sys.argv[2]}"](sys.argv[3])))
    elif len(sys.argv) > 1 and sys.argv[1] == "--markdown":  # trace.md again from trace.json
        write(json.loads((RESULTS / "trace.json").read_text()))
    elif len(sys.argv) > 1 and sys.argv[1] == "--big":  # only the full-size MoE / MLA rows, into the existing results
        path = RESULTS / "trace.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        results["big"] = big_rows()
        write(results)
    else:
        main()
