"""``depgraph export MODEL --gguf OUT.gguf [--outtype f32|f16|q8_0] [--vllm OUT]``."""
from __future__ import annotations

from pathlib import Path

from depgraph.export.common import ExportError

from .common import add_model_argument, load

OUTTYPES = ("f32", "f16", "q8_0")  # same as gguf.OUTTYPES; kept here so --help needs no torch


def add(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a (pruned) model for llama.cpp (GGUF) or vLLM (DeciLM layout)",
        description="Export MODEL: --gguf writes one GGUF file for llama.cpp (uniform models keep their "
                    "architecture, non-uniform Llama-family models use llama.cpp's deci architecture with per-layer "
                    "head counts and FFN lengths); --vllm writes a new folder in the DeciLM / Nemotron-NAS layout "
                    "that `vllm serve OUT --trust-remote-code` loads. What a runtime cannot represent is refused "
                    "before anything is written.")
    add_model_argument(p)
    p.add_argument("--gguf", metavar="OUT.gguf", default=None, help="GGUF file to write")
    p.add_argument("--outtype", choices=OUTTYPES, default="f16", help="GGUF weight type (default: %(default)s; "
                                                                     "1-D tensors stay f32)")
    p.add_argument("--vllm", metavar="OUT", default=None, help="new folder to write in the DeciLM layout")
    p.set_defaults(func=run)


def run(args) -> int:
    if not args.gguf and not args.vllm:
        raise ExportError("nothing to export: give --gguf OUT.gguf and/or --vllm OUT")
    if args.vllm and Path(args.vllm).exists() and (not Path(args.vllm).is_dir() or any(Path(args.vllm).iterdir())):
        raise ExportError(f"--vllm: {args.vllm} already exists and is not an empty folder; choose a new folder")
    if args.gguf and Path(args.gguf).is_dir():
        raise ExportError(f"--gguf: {args.gguf} is a folder; give a file name such as model.gguf")
    model, tokenizer = load(args)
    if args.gguf:
        from depgraph.export.gguf import export_gguf, plan

        arch, _ = plan(model)
        out = export_gguf(model, tokenizer, args.gguf, outtype=args.outtype)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, llama.cpp architecture {arch}, {args.outtype})")
    if args.vllm:
        from depgraph.export.vllm import export_vllm

        out = export_vllm(model, tokenizer, args.vllm)
        print(f"wrote {out} (DeciLMForCausalLM); serve it with: vllm serve {out} --trust-remote-code")
    return 0
