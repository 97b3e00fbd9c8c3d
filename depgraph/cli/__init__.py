"""The ``depgraph`` command: a thin layer over the public API.

One module per subcommand (``trace``, ``prune``, ``eval``, ``recover``, ``viz``, ``report``, ``sparsify``,
``export``), each with
``add(subparsers)`` declaring its options and ``run(args)`` doing the work and returning an exit status; shared
options and model loading live in :mod:`depgraph.cli.common`. Heavy imports (torch, transformers, the pruning
modules) happen inside ``run``, so ``depgraph --help`` stays fast. The CLI imports the library; no library module
imports the CLI.

Exit status: 0 on success, 1 on a user-facing error (printed as one line ``depgraph: error: ...``), 2 on a usage
error.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from depgraph.errors import DepgraphError

from .common import PROG

# subcommand modules, in the order `depgraph --help` lists them
SUBCOMMANDS = ("trace", "prune", "eval", "recover", "viz", "report", "sparsify", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Structured pruning of Hugging Face causal LMs by their exact dependency graph.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add(subparsers)
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
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its type name when empty)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__
