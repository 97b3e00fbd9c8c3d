"""``depgraph prune``: score, plan and shrink a model, then save it with plan.json and report.json."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from depgraph.block_scores import BLOCK_METHODS
from depgraph.errors import DepgraphError
from depgraph.importance import methods, needs_calibration
from depgraph.plan import POLICIES, TARGET_OF, dump_plans
from depgraph.prune import SELECTS, default_kinds

from .common import (DTYPES, add_calibration, add_model_argument, add_overwrite, add_protocol_argument,
                     calibration_from_args, check_output_args, fraction, load, model_name, torch_dtype)

KINDS = ("attention", "mlp", "hidden", "experts", "block")


def _layers(text: str):
    """``3:27`` -> range(3, 27); ``0,5,7`` -> [0, 5, 7]; ``all`` -> None; ``auto`` -> "auto"."""
    if text in ("all", "auto"):
        return None if text == "all" else "auto"
    try:
        if ":" in text:
            lo, hi = text.split(":")
            if int(hi) <= int(lo):
                raise argparse.ArgumentTypeError(f"empty layer range {text}")
            return range(int(lo), int(hi))
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes START:STOP or a comma list, got {text!r}") from None


def _ratios(text: str) -> dict:
    """``attention=0.25,mlp=0.3`` -> {"attention": 0.25, "mlp": 0.3}."""
    out = {}
    for part in text.split(","):
        kind, _, value = part.partition("=")
        if kind not in KINDS or not value:
            raise argparse.ArgumentTypeError(f"--ratios takes KIND=FRACTION pairs with KIND in {KINDS}, got {part!r}")
        out[kind] = fraction(value, f"--ratios {kind}")
    return out


def add(subparsers) -> None:
    p = subparsers.add_parser("prune", help="score, plan and shrink a model, then save it",
                              description="Prune MODEL to a parameter target and write the pruned model folder "
                                          "with plan.json and report.json.")
    add_model_argument(p)
    p.add_argument("--target", type=fraction, default=None,
                   help="fraction of the parameters to remove (default 0.2; of all of them unless --target-of says "
                        "otherwise; not with --ratios)")
    p.add_argument("--target-of", choices=TARGET_OF, default="all",
                   help="what --target is a fraction of: all parameters (default) or the non-embedding ones (all but "
                        "the embedding tables and the output head, tied or not: the scaling-law convention; use it "
                        "on models whose vocabulary table is a large part of them, e.g. 63%% of Gemma 3 270M)")
    p.add_argument("--ratios", type=_ratios, default=None,
                   help="per-kind fractions of units instead of --target, e.g. attention=0.25,mlp=0.3")
    p.add_argument("--method", choices=methods(), default="activation",
                   help="importance estimator (default: activation; it and fluctuation lead on SmolLM2 in "
                        "bench/results/prune.md)")
    add_calibration(p, "self", 32, 64,
                    "calibration source: self (data-free: 32 x 64 tokens sampled from the model in one batch, "
                    "temperature 2 -> 0.8 over the first 16 tokens, no special tokens; the best data-free "
                    "calibration on SmolLM2 in bench/results/prune.md), alpaca, ptb, wikitext2, a text/JSON/JSONL "
                    "file, or an HF dataset name (default: self)")
    p.add_argument("--kinds", default=None, help="comma list of group kinds to prune: attention, mlp, hidden, "
                                                 "experts, block (depth: whole layers and attention/MLP sub-blocks) "
                                                 "(default: mlp below --target 0.5, attention,mlp from 0.5 on: the "
                                                 "best measured on SmolLM2; see bench/results/prune.md)")
    p.add_argument("--block-method", choices=tuple(BLOCK_METHODS), default="influence",
                   help="with --kinds block: influence (ShortGPT's 1 - cos(x_in, x_out)) or loss (calibration-loss "
                        "increase when the block is removed)")
    p.add_argument("--depth-share", type=float, default=None,
                   help="with block and width kinds: the part of --target removed as blocks (default 0.5; 1 with "
                        "block alone)")
    p.add_argument("--layers", type=_layers, default="auto",
                   help="only these layers, e.g. 3:27 or 0,5,7; 'all'; default 'auto': all but the first and last")
    p.add_argument("--policy", choices=POLICIES, default="uniform",
                   help="layer widths: uniform (same fraction per layer), global (one score threshold) or adaptive "
                        "(per-layer widths from standardised scores, each layer keeps at least 25%%)")
    p.add_argument("--round-to", type=int, default=8, help="keep MLP widths a multiple of this")
    p.add_argument("--gqa", choices=("heads", "kv"), default="heads")
    p.add_argument("--steps", type=int, default=1, help="iterative pruning in this many steps")
    p.add_argument("--uniform", action="store_true", help="every layer the same shape (stock-loadable)")
    p.add_argument("--compensate", action="store_true",
                   help="fold removed units' mean contribution into the next layer's bias (FLAP)")
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None,
                   help="re-fit the kept input columns of each consumer (down_proj, o_proj) by least squares on the "
                        "calibration inputs, block by block (with --compensate the bias joins the fit); default: "
                        "on whenever calibration data is read (depgraph.prune's reconstruct=None)")
    p.add_argument("--select", choices=SELECTS, default="scores",
                   help="scores: remove the units the method scored lowest (default); obs: keep those widths but "
                        "re-choose each layer's units during the re-fit by greedy OBS on the sequential calibration "
                        "inputs (measured worse on SmolLM2, bench/results/prune.md)")
    p.add_argument("--damp", type=float, default=1.0,
                   help="with --reconstruct: ridge added to each Gram matrix, a fraction of its mean diagonal "
                        "(default %(default)s, the measured best; 0.01 overfits small calibration sets)")
    add_protocol_argument(p)
    p.add_argument("--stream", action="store_true",
                   help="models larger than memory: read MODEL's safetensors shards one decoder block at a time "
                        "(gradient-free methods; --calib must name data, not self)")
    p.add_argument("--compute-dtype", choices=("auto",) + DTYPES, default="auto",
                   help="with --stream: dtype of the per-block math (default auto: the weights' dtype; float32 is "
                        "~10x faster than bf16 on CPUs without bf16 matmuls); the written weights keep their dtype")
    p.add_argument("--gram-dtype", choices=("auto", "float32", "float64"), default="auto",
                   help="with the re-fit: dtype of each consumer's accumulated X^T X (default auto: "
                        "float32 for a bf16/fp16 checkpoint, half the memory; float64 otherwise); the solve runs in the same dtype")
    p.add_argument("--no-report", action="store_true", help="do not write report.html into the output folder")
    p.add_argument("-o", "--output", required=True, help="output folder (written atomically)")
    add_overwrite(p)
    p.set_defaults(func=run)


def _needs_calibration(args, kinds) -> bool:
    """Whether the prune reads calibration data: the method, compensation, an asked-for re-fit or depth scores."""
    return needs_calibration(args.method) or args.compensate or bool(args.reconstruct) or "block" in kinds


def _check_prune_args(args) -> list:
    if not args.damp > 0:
        raise DepgraphError(f"--damp must be a positive number, got {args.damp}")
    kinds = [k for k in args.kinds.split(",") if k] if args.kinds is not None else \
        (list(args.ratios) if args.ratios is not None else list(default_kinds(args.target)))
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise DepgraphError(f"--kinds: unknown kind(s) {bad or kinds}; choose from {', '.join(KINDS)}")
    if args.steps < 1 or args.n_samples < 1 or args.seq_len < 2:
        raise DepgraphError("--steps, --n-samples must be >= 1 and --seq-len >= 2")
    if args.round_to < 1:
        raise DepgraphError(f"--round-to must be a positive integer (1: no rounding), got {args.round_to}")
    if args.ratios is not None and args.target is not None:
        raise DepgraphError("--ratios and --target: give one (per-kind unit fractions, or a parameter fraction)")
    if args.ratios is not None and args.target_of != "all":
        raise DepgraphError("--target-of applies to --target, not to --ratios (fractions of each group's units)")
    calib = Path(args.calib).expanduser()
    needs_calib = _needs_calibration(args, kinds)
    if args.select != "scores" and (args.stream or args.reconstruct is False):
        raise DepgraphError(f"--select {args.select} re-chooses units during the re-fit: not with --stream or "
                            "--no-reconstruct")
    if "block" in kinds and args.stream:
        raise DepgraphError("--kinds block: depth pruning does not run with --stream")
    if needs_calib and (calib.suffix or "/" in args.calib):
        if not calib.is_file():
            raise DepgraphError(f"--calib: file {calib} does not exist")
        if calib.stat().st_size == 0:
            raise DepgraphError(f"--calib: file {calib} is empty")
    return kinds


def run(args) -> int:
    kinds = _check_prune_args(args)
    sources = check_output_args(args)
    if args.stream:
        return run_streamed(args, kinds)
    import depgraph
    from depgraph.io import write_pruned
    from depgraph.outdir import output_folder

    t0 = time.perf_counter()
    model, tok = load(args)
    load_s = time.perf_counter() - t0
    calib = None
    if _needs_calibration(args, kinds):
        calib = calibration_from_args(args, model, tok)
    model, report, plans = depgraph.prune(model, calib, target=args.target, method=args.method, kinds=kinds,
                                          policy=args.policy, layers=args.layers, round_to=args.round_to,
                                          gqa=args.gqa, steps=args.steps, uniform=args.uniform,
                                          compensate=args.compensate, ratios=args.ratios,
                                          reconstruct=args.reconstruct, damp=args.damp, select=args.select,
                                          block_method=args.block_method,
                                          depth_share=args.depth_share, gram_dtype=torch_dtype(args.gram_dtype),
                                          target_of=args.target_of)
    report["times"]["load_s"] = load_s
    report["model"] = model_name(args)
    report["calibration"] = None if calib is None else {"source": args.calib, "n_samples": args.n_samples,
                                                        "seq_len": args.seq_len, "seed": args.seed,
                                                        "protocol": args.protocol}
    plan_json = dump_plans(plans)
    t = time.perf_counter()
    with output_folder(args.output, overwrite=args.overwrite, sources=sources) as tmp:  # OUT appears complete
        write_pruned(model, tmp, tokenizer=tok, extra_files={"plan.json": plan_json}, report=report)
        report["times"]["save_s"] = time.perf_counter() - t
        (tmp / "report.json").write_text(report.to_json())  # once, with the save time
        _html_report(tmp, args)
    out = Path(args.output)
    print(f"pruned {report['params_before']:,} -> {report['params_after']:,} parameters ({removed_text(report)}, "
          f"method {args.method}); wrote {out}")
    return 0


def removed_text(report) -> str:
    """``20.0% removed, 54.0% of the non-embedding parameters``: both fractions of a prune report."""
    return (f"{100 * report['removed_fraction']:.1f}% removed, "
            f"{100 * report['non_embedding_removed_fraction']:.1f}% of the non-embedding parameters")


def _html_report(out, args) -> None:
    if args.no_report:
        return
    try:
        from viz import report as html_report

        html_report(out)
    except ImportError as e:  # matplotlib is an optional extra
        print(f"no report.html ({e}); install depgraph[viz]", file=sys.stderr)


def run_streamed(args, kinds) -> int:
    """``depgraph prune MODEL --stream``: the checks of :mod:`depgraph.stream` first, then the streamed prune."""
    from depgraph.calibration import SELF_SOURCES
    from depgraph.stream import SELF_CALIBRATION, StreamSettings, check_settings, prune_streamed

    if args.model is None or not Path(args.model).expanduser().is_dir():
        raise DepgraphError(f"--stream needs MODEL to be a local model folder of safetensors shards, got "
                            f"{args.model!r}")
    settings = StreamSettings(target=args.target, target_of=args.target_of, method=args.method, kinds=tuple(kinds),
                              policy=args.policy,
                              layers=args.layers, round_to=args.round_to, gqa=args.gqa, steps=args.steps,
                              uniform=args.uniform, compensate=args.compensate, ratios=args.ratios,
                              reconstruct=args.reconstruct, damp=args.damp, overwrite=args.overwrite,
                              dtype=torch_dtype(args.dtype), compute_dtype=torch_dtype(args.compute_dtype),
                              gram_dtype=torch_dtype(args.gram_dtype))
    check_settings(settings)
    needs_calib = needs_calibration(args.method) or args.reconstruct
    if needs_calib and args.calib in SELF_SOURCES:
        raise DepgraphError(SELF_CALIBRATION)
    calib = None
    if needs_calib:
        from transformers import AutoTokenizer

        calib = calibration_from_args(args, None, AutoTokenizer.from_pretrained(args.model))
    _, report, _ = prune_streamed(args.model, calib, args.output, settings)
    out = Path(args.output)
    _html_report(out, args)
    s = report["stream"]
    print(f"pruned {report['params_before']:,} -> {report['params_after']:,} parameters "
          f"({removed_text(report)}, method {args.method}, streamed: "
          f"{s['wall_s']:.0f} s, peak RSS {s['peak_rss_gb']:.2f} GB); wrote {out}")
    return 0
