"""The ``depgraph`` command: a thin layer over the public API.

Each subcommand has one ``_add_<name>(subparsers)`` function that declares its arguments and one ``_run_<name>(args)``
function that does the work and returns an exit status. Heavy imports (torch, transformers, the pruning modules)
happen inside the ``_run_*`` functions, so ``depgraph --help`` stays fast.

Exit status: 0 on success, 1 on a user-facing error (printed as one line ``depgraph: error: ...``), 2 on a usage
error.
"""

from __future__ import annotations

import argparse
import json
import sys

from depgraph.errors import DepgraphError

PROG = "depgraph"

_DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------------------------------------
# Shared argument helpers
# ----------------------------------------------------------------------------------------------------------------------


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", default=None, metavar="MODEL",
        help="a Hugging Face model folder, a .gguf file, a folder written by save_pruned, or a hub id "
             "(default: the bundled SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--dtype", choices=("auto",) + _DTYPES, default="auto",
                        help="dtype to load the model in (default: auto, the checkpoint's own dtype)")


def _dtype(args):
    """--dtype auto -> None (the checkpoint's dtype), else the torch dtype."""
    import torch

    return None if args.dtype == "auto" else getattr(torch, args.dtype)


def _load(args):
    from depgraph.models import load_model

    return load_model(args.model, dtype=_dtype(args))


# ----------------------------------------------------------------------------------------------------------------------
# trace
# ----------------------------------------------------------------------------------------------------------------------


def _add_trace(subparsers) -> None:
    parser = subparsers.add_parser(
        "trace", help="build the dependency graph of a model and print it",
        description="Load MODEL, trace its exact channel dependency graph and print a summary.",
    )
    _add_model_argument(parser)
    parser.add_argument("--json", action="store_true", help="print graph.summary_dict() as JSON")
    parser.set_defaults(func=_run_trace)


def _run_trace(args) -> int:
    from depgraph import trace

    model, _tokenizer = _load(args)
    graph = trace(model)
    if args.json:
        print(json.dumps(graph.summary_dict(), indent=2, default=str))
    else:
        print(graph)
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Not implemented yet: each keeps its own _add_* function so it can be filled in independently.
# ----------------------------------------------------------------------------------------------------------------------


def _add_prune(subparsers) -> None:
    from depgraph.cli_prune import add_prune

    add_prune(subparsers, _add_model_argument)


def _add_eval(subparsers) -> None:
    from depgraph.cli_prune import add_eval

    add_eval(subparsers, _add_model_argument)


def _add_recover(subparsers) -> None:
    parser = subparsers.add_parser(
        "recover", help="recover a pruned model's quality with LoRA (optionally distilling the dense model)",
        description="LoRA-fine-tune PRUNED on Alpaca-format instruction data (LLM-Pruner's recipe) with transformers' "
                    "Trainer, merge the adapters and save the model to OUT/model (loads with load_pruned). Run it "
                    "under `accelerate launch -m depgraph.cli recover ...` for multi-GPU, FSDP or DeepSpeed.",
    )
    parser.add_argument("pruned", metavar="PRUNED", help="the pruned model: a save_pruned folder (or any MODEL "
                                                         "that `depgraph trace` accepts)")
    parser.add_argument("--dtype", choices=("auto",) + _DTYPES, default="auto",
                        help="dtype to load the model in (default: auto, the checkpoint's own dtype)")
    parser.add_argument("--data", required=True, metavar="SOURCE",
                        help="Alpaca-format .json/.jsonl file, 'alpaca' (the shared 5,000-example subset), a "
                             "plain-text file (one example per paragraph), 'self' (--limit texts sampled from the "
                             "--teacher, else from the pruned model: no data needed), or a Hugging Face dataset "
                             "name such as yahma/alpaca-cleaned (needs the hub)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (model/, adapter/, "
                                                                             "checkpoints/, summary.json)")
    parser.add_argument("--max-steps", type=int, default=None, metavar="N", help="optimizer steps (overrides "
                                                                                "--epochs)")
    parser.add_argument("--epochs", type=float, default=2.0, metavar="E", help="epochs (default: %(default)s)")
    parser.add_argument("--max-minutes", type=float, default=None, metavar="M",
                        help="stop (and checkpoint) after M minutes of training")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per optimizer step (default: "
                                                                    "%(default)s)")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="examples per forward pass per device "
                                                                         "(default: %(default)s)")
    parser.add_argument("--cutoff-len", type=int, default=256, help="tokens per example (default: %(default)s)")
    parser.add_argument("--val-size", type=float, default=0, metavar="N",
                        help="held-out validation examples (an integer, or a fraction < 1; default: none)")
    parser.add_argument("--eval-steps", type=int, default=None, help="evaluate every N steps (default: "
                                                                      "--save-steps)")
    parser.add_argument("--save-steps", type=int, default=200, help="checkpoint every N steps (default: "
                                                                     "%(default)s)")
    parser.add_argument("--early-stopping", type=int, default=None, metavar="PATIENCE",
                        help="stop after PATIENCE evaluations without a better validation loss; keep the best")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N examples of the data")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--alpha", type=int, default=16, help="LoRA alpha (default: %(default)s)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default: %(default)s)")
    parser.add_argument("--target-modules", default=None, metavar="NAMES",
                        help="comma-separated module names for LoRA (default: every linear layer but lm_head)")
    parser.add_argument("--warmup-steps", type=int, default=100, help="warm-up steps, at most a tenth of the run "
                                                                       "(default: %(default)s)")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="bf16 mixed precision (default: auto = when the GPU supports it)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="resume from the last checkpoint in OUT/checkpoints (or from CHECKPOINT)")
    parser.add_argument("--distill", action="store_true",
                        help="mix the LM loss with KL to the dense teacher's logits (needs --teacher)")
    parser.add_argument("--teacher", default=None, metavar="DENSE", help="the dense model to distil from")
    parser.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the KL term (default: "
                                                                          "%(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default: "
                                                                        "%(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="seed (default: %(default)s)")
    parser.add_argument("--data-dir", default=None, help="shared data folder (default: $DEPGRAPH_DATA or "
                                                         "../shared/data)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--json", action="store_true", help="print the final summary as one JSON line")
    parser.set_defaults(func=_run_recover)


def _run_recover(args) -> int:
    from depgraph.models import load_model

    if args.distill and not args.teacher:
        raise ValueError("--distill needs --teacher DENSE: the dense model the pruned one came from")
    if args.teacher and not args.distill:
        raise ValueError("--teacher is used only with --distill")
    from recover.lora import recover

    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, file=sys.stderr, **k))
    log(f"loading {args.pruned}")
    model, tokenizer = load_model(args.pruned, dtype=_dtype(args))
    if tokenizer is None:
        raise ValueError(f"{args.pruned}: no tokenizer saved with the model; save it with save_pruned(model, path, "
                         f"tokenizer=...)")
    teacher = None
    if args.distill:
        log(f"loading teacher {args.teacher}")
        teacher, _ = load_model(args.teacher, dtype=_dtype(args))
    val = int(args.val_size) if args.val_size >= 1 else args.val_size
    _, summary = recover(
        model, tokenizer, args.data, args.output, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
        target_modules=args.target_modules, max_steps=args.max_steps, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, cutoff_len=args.cutoff_len,
        val_size=val, eval_steps=args.eval_steps, early_stopping_patience=args.early_stopping,
        save_steps=args.save_steps, warmup_steps=args.warmup_steps,
        bf16={"auto": None, "on": True, "off": False}[args.bf16], gradient_checkpointing=args.gradient_checkpointing,
        resume_from_checkpoint=args.resume, distill=args.distill, teacher=teacher, distill_alpha=args.distill_alpha,
        temperature=args.temperature, seed=args.seed, limit=args.limit, data_dir=args.data_dir,
        max_minutes=args.max_minutes, progress=log if not args.quiet else False,
    )
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        loss = summary.get("final_loss")
        ev = summary.get("final_eval_loss")
        print(f"recovered: {summary['steps']} steps, {summary['train_examples']} examples, "
              f"train loss {summary.get('first_loss')} -> {loss}"
              + (f", eval loss {ev:.4f}" if ev is not None else "")
              + f", {summary['tokens_per_second']:.0f} tokens/s, {summary['train_runtime_s']:.1f} s")
        print(f"saved {summary.get('model_dir')} (load with depgraph.load_pruned)")
    return 0


def _add_viz(subparsers) -> None:
    parser = subparsers.add_parser(
        "viz", help="draw a dependency graph or plan with Graphviz",
        description="Trace MODEL and draw its dependency graph: an overview (one cluster per layer) or, with --layer "
                    "or --group, a detail view with parameters as nodes and labelled index maps. With --plan, the "
                    "removed units are shown. The format follows the -o suffix (.svg .png .pdf .dot); without "
                    "Graphviz's `dot` binary the .dot source is written instead.",
    )
    _add_model_argument(parser)
    parser.add_argument("-o", "--output", default="graph.svg", help="output file (default: %(default)s)")
    parser.add_argument("--layer", type=int, default=None, help="detail view of this layer")
    parser.add_argument("--group", default=None, help="detail view of this group, e.g. attention.3 or hidden")
    parser.add_argument("--plan", default=None, help="plan.json (or a run folder holding one) to show removed units")
    parser.add_argument("--collapse", action="store_true", help="overview: fold identical consecutive layers")
    parser.add_argument("--wrap", type=int, default=None,
                        help="overview: layers per row (default 6 when deeper than 8 layers; 0: one column)")
    parser.set_defaults(func=_run_viz)


def _run_viz(args) -> int:
    import warnings
    from pathlib import Path

    from depgraph import trace
    from viz import draw, save

    plan = None
    if args.plan is not None:
        plan = Path(args.plan)
        if plan.is_dir():
            plan = plan / "plan.json"
        if not plan.is_file():
            raise FileNotFoundError(f"plan {plan} does not exist")
    model, _tokenizer = _load(args)
    graph = trace(model)
    dot = draw(graph, plan, layer=args.layer, group=args.group, collapse=args.collapse, wrap=args.wrap)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = save(dot, args.output)
    for w in caught:
        print(f"{PROG} viz: {w.message}", file=sys.stderr)
    print(written)
    return 0


def _add_report(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="write an HTML report of a pruning run",
        description="Write one self-contained HTML file (charts embedded, no network needed to view it) from a run "
                    "folder: report.json, plan.json and eval.json, whichever are present.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (as written by `depgraph prune`)")
    parser.add_argument("-o", "--output", default=None, help="output file (default: RUN_DIR/report.html)")
    parser.set_defaults(func=_run_report)


def _run_report(args) -> int:
    from viz import report

    print(report(args.run_dir, args.output))
    return 0


def _add_sparsify(subparsers) -> None:
    from depgraph.sparsify import add_cli

    add_cli(subparsers, _add_model_argument)


def _add_export(subparsers) -> None:
    from depgraph.export.cli import add_cli

    add_cli(subparsers, _add_model_argument)


_SUBCOMMANDS = (_add_trace, _add_prune, _add_eval, _add_recover, _add_viz, _add_report, _add_sparsify, _add_export)


# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Structured pruning of Hugging Face causal LMs by their exact dependency graph.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``depgraph`` command with ``argv`` (default ``sys.argv[1:]``) and return its exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error argparse has already reported
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (DepgraphError, FileNotFoundError, ValueError) as error:
        if args.debug:
            raise
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
