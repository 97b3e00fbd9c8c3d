"""``depgraph sparsify``: unstructured or N:M sparsity with magnitude, Wanda or SparseGPT."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from depgraph.sparsify import SPARSIFIERS, SparsifyError, check_sparsity, parse_nm, sparsify

from .common import (add_calibration, add_model_argument, add_overwrite, calibration_from_args, check_output_args, load,
                     model_name)

def _sparsity_arg(text: str) -> float:
    try:
        return check_sparsity(text)
    except SparsifyError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _nm_arg(text: str) -> tuple[int, int]:
    try:
        return parse_nm(text)
    except SparsifyError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add(subparsers) -> None:
    p = subparsers.add_parser(
        "sparsify", help="zero weights: unstructured or N:M sparsity with magnitude, Wanda or SparseGPT",
        description="Sparsify the linear layers of MODEL's decoder layers (a dense model or a save_pruned folder), "
                    "layer by layer on calibration data, and save the result with save_pruned plus sparsify.json "
                    "(achieved sparsity per layer and module).")
    add_model_argument(p)
    p.add_argument("--method", choices=tuple(SPARSIFIERS), default="wanda", help="default: %(default)s")
    pattern = p.add_mutually_exclusive_group()
    pattern.add_argument("--sparsity", type=_sparsity_arg, default=None,
                         help="fraction of weights zeroed, in [0, 1) (default 0.5)")
    pattern.add_argument("--nm", type=_nm_arg, default=None, metavar="N:M",
                         help="keep N non-zeros in every M consecutive inputs, e.g. 2:4 or 4:8")
    p.add_argument("--per-row", action="store_true", help="magnitude: compare within each output row")
    add_calibration(p, "alpaca", 32, 128, "calibration source (as for prune; default: alpaca)")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block (default: %(default)s)")
    p.add_argument("--damp", type=float, default=0.01, help="SparseGPT dampening, fraction of the mean Hessian "
                                                            "diagonal (default: %(default)s)")
    p.add_argument("--skip", default="", help="comma list: leave dense the linears whose name contains one")
    p.add_argument("--device", default=None, help="process each layer on this device (e.g. cuda)")
    p.add_argument("--quiet", action="store_true", help="no per-layer progress")
    p.add_argument("-o", "--output", required=True, help="output folder (written atomically)")
    add_overwrite(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from depgraph.io import save_pruned

    if args.n_samples < 1 or args.seq_len < 2:
        raise SparsifyError("--n-samples must be >= 1 and --seq-len >= 2")
    sources = check_output_args(args)
    nm = args.nm
    sparsity = None if nm else (0.5 if args.sparsity is None else args.sparsity)
    model, tok = load(args)
    calib = None
    if SPARSIFIERS[args.method].stats is not None:
        calib = calibration_from_args(args, model, tok)
    skip = tuple(s for s in args.skip.split(",") if s)
    model, report = sparsify(model, args.method, sparsity=sparsity, nm=nm, calibration=calib, per_row=args.per_row,
                             blocksize=args.blocksize, damp=args.damp, skip=skip, device=args.device,
                             progress=not args.quiet)
    report["model"] = model_name(args)
    if calib is not None:
        report["calibration"].update(source=args.calib, seq_len=args.seq_len, seed=args.seed)
    extra = {"sparsify.json": json.dumps(report, indent=1)}
    src = Path(args.model) if args.model else None
    if src is not None and src.is_dir() and (src / "plan.json").is_file():  # keep the structured plan with it
        extra["plan.json"] = (src / "plan.json").read_text()
    out = save_pruned(model, args.output, tokenizer=tok, extra_files=extra, overwrite=args.overwrite, sources=sources)
    print(f"sparsified {report['numel']:,} linear weights to {100 * report['sparsity']:.2f}% zeros "
          f"({args.method}, {report['pattern']}); wrote {out}")
    return 0
