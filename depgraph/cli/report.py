"""``depgraph report``: one self-contained HTML report of a run folder."""
from __future__ import annotations

def add(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="write an HTML report of a pruning run",
        description="Write one self-contained HTML file (charts embedded, no network needed to view it) from a run "
                    "folder: report.json, plan.json and eval.json, whichever are present.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (as written by `depgraph prune`)")
    parser.add_argument("-o", "--output", default=None, help="output file (default: RUN_DIR/report.html)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from viz import report

    from depgraph.errors import DepgraphError

    if Path(args.run_dir).is_file():
        raise DepgraphError(f"{args.run_dir} is a file, not a run folder; give the folder `depgraph prune -o` wrote")
    print(report(args.run_dir, args.output))
    return 0
