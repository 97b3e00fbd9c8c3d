"""The ``depgraph`` command: a thin layer over the public API.

Each subcommand has one ``_add_<name>(subparsers)`` function that declares its arguments and one ``_run_<name>(args)``
function that does the work and returns an exit status. Heavy imports (torch, transformers, the pruning modules)
happen inside the ``_run_*`` functions, so ``depgraph --help`` stays fast.

Exit status: 0 on success, 1 on a user-facing error (printed as one line ``depgraph: error: ...``), 2 on a usage
error or a subcommand that is not implemented yet.
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
    parser.add_argument("--dtype", choices=_DTYPES, default="float32", help="dtype to load the model in "
                                                                              "(default: %(default)s)")


def _load(args):
    import torch

    from depgraph.models import load_model

    return load_model(args.model, dtype=getattr(torch, args.dtype))


def _not_implemented(name: str):
    def run(args) -> int:
        print(f"{PROG} {name}: not implemented yet", file=sys.stderr)
        return 2

    return run


def _add_stub(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=f"{help_text} (not implemented yet)", description=help_text)
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.set_defaults(func=_not_implemented(name))
    return parser


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
    _add_stub(subparsers, "recover", "recover a pruned model's quality with LoRA or distillation")


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
    _add_stub(subparsers, "sparsify", "sparsify a model's weights")


_SUBCOMMANDS = (_add_trace, _add_prune, _add_eval, _add_recover, _add_viz, _add_report, _add_sparsify)


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
