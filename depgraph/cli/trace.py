"""``depgraph trace``: build the dependency graph of a model and print it."""
from __future__ import annotations

import json

from .common import add_model_argument, load


def add(subparsers) -> None:
    parser = subparsers.add_parser(
        "trace", help="build the dependency graph of a model and print it",
        description="Load MODEL, trace its exact channel dependency graph and print a summary.",
    )
    add_model_argument(parser)
    parser.add_argument("--json", action="store_true", help="print graph.summary_dict() as JSON")
    parser.set_defaults(func=run)


def run(args) -> int:
    from depgraph import trace

    model, _tokenizer = load(args)
    graph = trace(model)
    if args.json:
        print(json.dumps(graph.summary_dict(), indent=2, default=str))
    else:
        print(graph)
    return 0
