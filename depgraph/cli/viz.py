"""``depgraph viz``: draw a dependency graph or a plan with Graphviz."""
from __future__ import annotations

import sys

from .common import PROG, add_model_argument, load

def add(subparsers) -> None:
    parser = subparsers.add_parser(
        "viz", help="draw a dependency graph or plan with Graphviz",
        description="Trace MODEL and draw its dependency graph: an overview (one cluster per layer) or, with --layer "
                    "or --group, a detail view with parameters as nodes and labelled index maps. With --plan, the "
                    "removed units are shown. The format follows the -o suffix (.svg .png .pdf .dot); without "
                    "Graphviz's `dot` binary the .dot source is written instead.",
    )
    add_model_argument(parser)
    parser.add_argument("-o", "--output", default="graph.svg", help="output file (default: %(default)s)")
    parser.add_argument("--layer", type=int, default=None, help="detail view of this layer")
    parser.add_argument("--group", default=None, help="detail view of this group, e.g. attention.3 or hidden")
    parser.add_argument("--plan", default=None, help="plan.json (or a run folder holding one) to show removed units")
    parser.add_argument("--collapse", action="store_true", help="overview: fold identical consecutive layers")
    parser.add_argument("--wrap", type=int, default=None,
                        help="overview: layers per row (default 6 when deeper than 8 layers; 0: one column)")
    parser.set_defaults(func=run)


def run(args) -> int:
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
    model, _tokenizer = load(args)
    graph = trace(model)
    dot = draw(graph, plan, layer=args.layer, group=args.group, collapse=args.collapse, wrap=args.wrap)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = save(dot, args.output)
    for w in caught:
        print(f"{PROG} viz: {w.message}", file=sys.stderr)
    print(written)
    return 0
