"""``depgraph prune`` and ``depgraph eval``: argument setup and runners (used by :mod:`depgraph.cli`)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from depgraph.errors import DepgraphError
from depgraph.importance import METHODS, NEEDS_CALIBRATION
from depgraph.plan import POLICIES

KINDS = ("attention", "mlp", "hidden", "experts")


def _layers(text: str):
    """``3:27`` -> range(3, 27); ``0,5,7`` -> [0, 5, 7]; ``all`` -> None; ``auto`` -> "auto"."""
    if text in ("all", "auto"):
        return None if text == "all" else "auto"
    try:
        if ":" in text:
            lo, hi = text.split(":")
            return range(int(lo), int(hi))
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes START:STOP or a comma list, got {text!r}") from None


def _fraction(text: str, what: str = "--target") -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: not a number: {text!r}") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"{what} must be in [0, 1), got {v}")
    return v


def _ratios(text: str) -> dict:
    """``attention=0.25,mlp=0.3`` -> {"attention": 0.25, "mlp": 0.3}."""
    out = {}
    for part in text.split(","):
        kind, _, value = part.partition("=")
        if kind not in KINDS or not value:
            raise argparse.ArgumentTypeError(f"--ratios takes KIND=FRACTION pairs with KIND in {KINDS}, got {part!r}")
        out[kind] = _fraction(value, f"--ratios {kind}")
    return out


def calibration_from_args(args, model, tok):
    """Calibration ids [n_samples, seq_len] from the --calib/--n-samples/--seq-len/--seed/--data-dir options."""
    from depgraph.calibration import load_calibration_set

    if tok is None and args.calib != "self":
        raise DepgraphError(f"{args.model}: no tokenizer to tokenize the calibration data")
    return load_calibration_set(args.calib, tok, n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed,
                                model=model, data_dir=args.data_dir,
                                protocol=getattr(args, "protocol", "bos")).input_ids


def add_protocol_argument(p) -> None:
    """``--protocol bos|llm-pruner``: how token windows (calibration, perplexity) start."""
    from depgraph.calibration import PROTOCOLS

    p.add_argument("--protocol", choices=PROTOCOLS, default="bos",
                   help="token windows: bos (default; the tokenizer's BOS first when it adds one, as lm-eval) or "
                        "llm-pruner (bare windows, for comparison with LLM-Pruner's tables)")


def add_prune(subparsers, add_model_argument) -> None:
    p = subparsers.add_parser("prune", help="score, plan and shrink a model, then save it",
                              description="Prune MODEL to a parameter target and write the pruned model folder "
                                          "with plan.json and report.json.")
    add_model_argument(p)
    p.add_argument("--target", type=_fraction, default=0.2, help="fraction of all parameters to remove")
    p.add_argument("--ratios", type=_ratios, default=None,
                   help="per-kind fractions of units instead of --target, e.g. attention=0.25,mlp=0.3")
    p.add_argument("--method", choices=METHODS, default="activation",
                   help="importance estimator (default: activation; it and fluctuation lead on SmolLM2 in "
                        "bench/results/prune.md)")
    p.add_argument("--calib", default="self",
                   help="calibration source: self (data-free text sampled from the model; the best on SmolLM2 in "
                        "bench/results/prune.md), alpaca, ptb, wikitext2, a text/JSON/JSONL file, or an HF "
                        "dataset name (default: self)")
    p.add_argument("--n-samples", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--kinds", default="mlp", help="comma list of group kinds to prune: attention, mlp, hidden, experts "
                                                  "(default: mlp, the best on SmolLM2; see bench/results/prune.md)")
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
    p.add_argument("--reconstruct", action="store_true",
                   help="re-fit the kept input columns of each consumer (down_proj, o_proj) by least squares on the "
                        "calibration inputs, block by block (with --compensate the bias joins the fit)")
    p.add_argument("--seed", type=int, default=0)
    add_protocol_argument(p)
    p.add_argument("--data-dir", default=None, help="folder laid out like ../shared/data")
    p.add_argument("--stream", action="store_true",
                   help="models larger than memory: read MODEL's safetensors shards one decoder block at a time "
                        "(gradient-free methods; --calib must name data, not self)")
    p.add_argument("--compute-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="with --stream: dtype of the per-block math (default auto: the weights' dtype; float32 is "
                        "~10x faster than bf16 on CPUs without bf16 matmuls); the written weights keep their dtype")
    p.add_argument("--no-report", action="store_true", help="do not write report.html into the output folder")
    p.add_argument("-o", "--output", required=True, help="output folder (written atomically)")
    p.set_defaults(func=run_prune)


def _check_prune_args(args) -> list:
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise DepgraphError(f"--kinds: unknown kind(s) {bad or kinds}; choose from {', '.join(KINDS)}")
    if args.steps < 1 or args.n_samples < 1 or args.seq_len < 2:
        raise DepgraphError("--steps, --n-samples must be >= 1 and --seq-len >= 2")
    calib = Path(args.calib).expanduser()
    needs_calib = args.method in NEEDS_CALIBRATION or args.compensate or args.reconstruct
    if needs_calib and (calib.suffix or "/" in args.calib):
        if not calib.is_file():
            raise DepgraphError(f"--calib: file {calib} does not exist")
        if calib.stat().st_size == 0:
            raise DepgraphError(f"--calib: file {calib} is empty")
    return kinds


def run_prune(args) -> int:
    kinds = _check_prune_args(args)
    if args.stream:
        return run_prune_streamed(args, kinds)
    import depgraph
    from .cli import _load

    t0 = time.perf_counter()
    model, tok = _load(args)
    load_s = time.perf_counter() - t0
    calib = None
    if args.method in NEEDS_CALIBRATION or args.compensate or args.reconstruct:
        calib = calibration_from_args(args, model, tok)
    model, report, plans = depgraph.prune(model, calib, target=args.target, method=args.method, kinds=kinds,
                                          policy=args.policy, layers=args.layers, round_to=args.round_to,
                                          gqa=args.gqa, steps=args.steps, uniform=args.uniform,
                                          compensate=args.compensate, ratios=args.ratios,
                                          reconstruct=args.reconstruct)
    report["times"]["load_s"] = load_s
    report["model"] = args.model or "SmolLM2-135M-Instruct (bundled)"
    report["calibration"] = None if calib is None else {"source": args.calib, "n_samples": args.n_samples,
                                                        "seq_len": args.seq_len, "seed": args.seed,
                                                        "protocol": args.protocol}
    plan_json = plans[0].to_json(indent=1) if len(plans) == 1 else \
        "[" + ",\n".join(p.to_json(indent=1) for p in plans) + "]"
    t = time.perf_counter()
    out = depgraph.save_pruned(model, args.output, tokenizer=tok,
                               extra_files={"plan.json": plan_json, "report.json": json.dumps(report, indent=1)})
    report["times"]["save_s"] = time.perf_counter() - t
    (out / "report.json").write_text(json.dumps(report, indent=1))
    _html_report(out, args)
    print(f"pruned {report['params_before']:,} -> {report['params_after']:,} parameters "
          f"({100 * report['removed_fraction']:.1f}% removed, method {args.method}); wrote {out}")
    return 0


def _html_report(out, args) -> None:
    if args.no_report:
        return
    try:
        from viz import report as html_report

        html_report(out)
    except ImportError as e:  # matplotlib is an optional extra
        print(f"no report.html ({e}); install depgraph[viz]", file=sys.stderr)


def run_prune_streamed(args, kinds) -> int:
    """``depgraph prune MODEL --stream``: the checks of :mod:`depgraph.stream` first, then the streamed prune."""
    from depgraph.calibration import SELF_SOURCES
    from depgraph.stream import SELF_CALIBRATION, StreamSettings, check_settings, prune_streamed

    from .cli import _dtype

    if args.model is None or not Path(args.model).expanduser().is_dir():
        raise DepgraphError(f"--stream needs MODEL to be a local model folder of safetensors shards, got "
                            f"{args.model!r}")
    settings = StreamSettings(target=args.target, method=args.method, kinds=tuple(kinds), policy=args.policy,
                              layers=args.layers, round_to=args.round_to, gqa=args.gqa, steps=args.steps,
                              uniform=args.uniform, compensate=args.compensate, ratios=args.ratios,
                              reconstruct=args.reconstruct, dtype=_dtype(args), compute_dtype=_dtype(argparse.Namespace(dtype=args.compute_dtype)))
    check_settings(settings)
    needs_calib = args.method in NEEDS_CALIBRATION or args.reconstruct
    if needs_calib and args.calib in SELF_SOURCES:
        raise DepgraphError(SELF_CALIBRATION)
    calib = None
    if needs_calib:
        from transformers import AutoTokenizer

        from depgraph.calibration import load_calibration_set

        calib = load_calibration_set(args.calib, AutoTokenizer.from_pretrained(args.model), n_samples=args.n_samples,
                                     seq_len=args.seq_len, seed=args.seed, data_dir=args.data_dir,
                                     protocol=args.protocol).input_ids
    _, report, _ = prune_streamed(args.model, calib, args.output, settings)
    out = Path(args.output)
    _html_report(out, args)
    s = report["stream"]
    print(f"pruned {report['params_before']:,} -> {report['params_after']:,} parameters "
          f"({100 * report['removed_fraction']:.1f}% removed, method {args.method}, streamed: "
          f"{s['wall_s']:.0f} s, peak RSS {s['peak_rss_gb']:.2f} GB); wrote {out}")
    return 0


def add_eval(subparsers, add_model_argument) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model (perplexity, zero-shot tasks)",
                              description="Perplexity on WikiText-2/PTB (non-overlapping windows) and zero-shot "
                                          "tasks through lm-eval, from local copies when offline.")
    add_model_argument(p)
    p.add_argument("--ppl", default="", help="comma list: wikitext2,ptb")
    p.add_argument("--tasks", default="", help="comma list of lm-eval tasks: boolq,piqa,hellaswag,winogrande,"
                                                "arc_easy,arc_challenge,openbookqa")
    p.add_argument("--window", type=int, default=128, help="perplexity window in tokens (default 128)")
    p.add_argument("--limit", type=int, default=None, help="at most this many windows / examples per set")
    add_protocol_argument(p)
    p.add_argument("--data-dir", default=None, help="folder laid out like ../shared/data")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    ppl_sets = [s for s in args.ppl.split(",") if s]
    tasks = [t for t in args.tasks.split(",") if t]
    if not ppl_sets and not tasks:
        raise DepgraphError("nothing to evaluate: give --ppl wikitext2,ptb and/or --tasks piqa,...")
    unknown = [s for s in ppl_sets if s not in ("wikitext2", "ptb")]
    if unknown:
        raise DepgraphError(f"--ppl: unknown data set(s) {unknown}; choose wikitext2, ptb")
    if args.window < 2:
        raise DepgraphError("--window must be at least 2 tokens")
    from recover.evaluate import perplexity, zero_shot

    from .cli import _load

    model, tok = _load(args)
    if tok is None:
        raise DepgraphError(f"{args.model}: no tokenizer in the model folder")
    result = {"model": args.model or "SmolLM2-135M-Instruct (bundled)", "window": args.window, "limit": args.limit,
              "protocol": args.protocol, "ppl": {}, "ppl_source": {}}
    for name in ppl_sets:
        r = perplexity(model, tok, name, window=args.window, limit=args.limit, data_dir=args.data_dir,
                       protocol=args.protocol)
        result["ppl"][name] = r["ppl"]
        result["ppl_source"][name] = {"source": r.get("source"), "windows": r.get("windows"),
                                      "split": r.get("split"), "bos": r.get("bos")}
        if not args.json:
            print(f"{name}: ppl {r['ppl']:.2f} (window {args.window}, {r.get('windows')} windows, protocol "
                  f"{args.protocol}{'' if r.get('bos') is None else ', BOS first'}, {r.get('source')})")
    if tasks:
        z = zero_shot(model, tok, tasks=tasks, limit=args.limit, data_dir=args.data_dir)
        result.update({k: v for k, v in z.items() if k != "tasks"})
        result["tasks"] = z["tasks"]
        if not args.json:
            for t, v in z["tasks"].items():
                print(f"{t}: " + ", ".join(f"{k} {x:.4f}" for k, x in v.items() if isinstance(x, float)))
    if args.json:
        json.dump(result, sys.stdout, default=str)
        print()
    return 0
