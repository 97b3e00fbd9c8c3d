"""Options and helpers shared by the subcommands: the model argument, ``--dtype`` (declared here only), model
loading and calibration from options."""
from __future__ import annotations

import argparse

from depgraph.errors import DepgraphError

PROG = "depgraph"
DTYPES = ("float32", "bfloat16", "float16")
BUNDLED = "SmolLM2-135M-Instruct (bundled)"  # what a report names when MODEL is omitted


def add_dtype(parser: argparse.ArgumentParser) -> None:
    """``--dtype``: the dtype to load models in (``auto``: the checkpoint's own)."""
    parser.add_argument("--dtype", choices=("auto",) + DTYPES, default="auto",
                        help="dtype to load the model in (default: auto, the checkpoint's own dtype)")


def torch_dtype(name: str):
    """``auto`` -> None (the checkpoint's dtype), else the torch dtype of that name."""
    import torch

    return None if name == "auto" else getattr(torch, name)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """The optional positional ``MODEL`` and ``--dtype``."""
    parser.add_argument(
        "model", nargs="?", default=None, metavar="MODEL",
        help="a Hugging Face model folder, a .gguf file, a folder written by save_pruned, or a hub id "
             "(default: the bundled SmolLM2-135M-Instruct)",
    )
    add_dtype(parser)


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    """``--data-dir``: the shared data folder."""
    parser.add_argument("--data-dir", default=None, help="folder laid out like ../shared/data (default: "
                                                         "$DEPGRAPH_DATA or ../shared/data)")


def add_calibration(parser: argparse.ArgumentParser, source: str, n_samples: int, seq_len: int,
                    source_help: str) -> None:
    """``--calib``, ``--n-samples``, ``--seq-len``, ``--seed`` and ``--data-dir`` (read by
    :func:`calibration_from_args`)."""
    parser.add_argument("--calib", default=source, help=source_help)
    parser.add_argument("--n-samples", type=int, default=n_samples, help="calibration windows (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=seq_len, help="tokens per window (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    add_data_dir(parser)


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``: replace a non-empty OUT that depgraph did not write (read by :func:`check_output_args`)."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT even if it is a non-empty folder depgraph did not write (never the input "
                             "model)")


def check_output_args(args, source=None) -> list:
    """Refuse ``-o OUT`` before loading anything (:func:`depgraph.outdir.check_output`): a file, the input model
    ``source`` (default ``args.model``; the bundled model when omitted) or a folder inside it, a foreign non-empty
    folder unless ``--overwrite``, an unwritable parent. Returns the sources OUT must spare."""
    from depgraph.models import smollm2_cache_dir
    from depgraph.outdir import check_output

    source = args.model if source is None else source
    sources = [source if source else smollm2_cache_dir()]
    check_output(args.output, overwrite=args.overwrite, sources=sources)
    return sources


def model_name(args) -> str:
    """The MODEL argument as a report names it."""
    return args.model or BUNDLED


def load(args, source=None):
    """``(model, tokenizer)`` of ``source`` (default ``args.model``) in ``args.dtype``."""
    from depgraph.models import load_model

    return load_model(args.model if source is None else source, dtype=torch_dtype(args.dtype))


def fraction(text: str, what: str = "--target") -> float:
    """A number in [0, 1) from option text, or an argparse error naming the option."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: not a number: {text!r}") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"{what} must be in [0, 1), got {v}")
    return v


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
