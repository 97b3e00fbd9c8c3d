"""``depgraph recover``: LoRA fine-tuning (optionally distilling the dense model) of a pruned model."""
from __future__ import annotations

import argparse
import json
import sys

from .common import add_data_dir, add_dtype, add_overwrite, check_output_args, load


def add(subparsers) -> None:
    parser = subparsers.add_parser(
        "recover", help="recover a pruned model's quality with LoRA (optionally distilling the dense model)",
        description="LoRA-fine-tune PRUNED on Alpaca-format instruction data (LLM-Pruner's recipe) with transformers' "
                    "Trainer, merge the adapters and save the model to OUT/model (loads with load_pruned). Run it "
                    "under `accelerate launch -m depgraph.cli recover ...` for multi-GPU, FSDP or DeepSpeed.",
    )
    parser.add_argument("pruned", metavar="PRUNED", help="the pruned model: a save_pruned folder (or any MODEL "
                                                         "that `depgraph trace` accepts)")
    add_dtype(parser)
    parser.add_argument("--data", required=True, metavar="SOURCE",
                        help="Alpaca-format .json/.jsonl file, 'alpaca' (the shared 5,000-example subset), "
                             "'wikitext2' (WikiText-2's validation split in --cutoff-len token windows: in-domain "
                             "text for WikiText-2 perplexity, never its test split), a "
                             "plain-text file (one example per paragraph), 'self' (--limit texts sampled from the "
                             "--teacher, else from the pruned model: no data needed), or a Hugging Face dataset "
                             "name such as yahma/alpaca-cleaned (needs the hub); join sources with + "
                             "(alpaca+wikitext2: both)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (model/, adapter/, "
                                                                             "checkpoints/, summary.json)")
    parser.add_argument("--max-steps", type=int, default=None, metavar="N", help="optimizer steps (overrides "
                                                                                "--epochs)")
    parser.add_argument("--epochs", type=float, default=2.0, metavar="E", help="epochs (default: %(default)s)")
    parser.add_argument("--max-minutes", type=float, default=None, metavar="M",
                        help="stop (and checkpoint) after M minutes of training; the learning rate then decays "
                             "linearly to 0 over those minutes (unless --decay-by-steps)")
    parser.add_argument("--decay-by-steps", action="store_false", dest="decay_by_time",
                        help="with --max-minutes, decay the learning rate over the planned epochs instead")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per optimizer step (default: "
                                                                    "%(default)s)")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="examples per forward pass per device "
                                                                         "(default: %(default)s)")
    parser.add_argument("--cutoff-len", type=int, default=256, help="tokens per example (default: %(default)s)")
    parser.add_argument("--val-size", type=_count_or_fraction, default=0, metavar="N",
                        help="held-out validation examples (an integer, or a fraction < 1; default: none)")
    parser.add_argument("--eval-steps", type=int, default=None, help="evaluate every N steps (default: "
                                                                      "--save-steps)")
    parser.add_argument("--save-steps", type=int, default=200, help="checkpoint every N steps (default: "
                                                                     "%(default)s)")
    parser.add_argument("--early-stopping", type=int, default=None, metavar="PATIENCE",
                        dest="early_stopping_patience",
                        help="stop after PATIENCE evaluations without a better validation loss; keep the best")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N examples of the data")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--alpha", type=int, default=16, help="LoRA alpha (default: %(default)s)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default: %(default)s)")
    parser.add_argument("--target-modules", default=None, metavar="NAMES",
                        help="comma-separated module names for LoRA (default: every linear layer but lm_head)")
    parser.add_argument("--warmup-steps", type=int, default=100, help="warm-up steps, at most a tenth of the run "
                                                                       "(default: %(default)s)")
    parser.add_argument("--bf16", type=_auto_on_off, default="auto", metavar="{auto,on,off}",
                        help="bf16 mixed precision (default: auto = when the GPU supports it)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        dest="resume_from_checkpoint",
                        help="resume from the last checkpoint in OUT/checkpoints (or from CHECKPOINT)")
    parser.add_argument("--distill", action="store_true",
                        help="mix the LM loss with KL to the dense teacher's logits (needs --teacher)")
    parser.add_argument("--teacher", default=None, metavar="DENSE", help="the dense model to distil from")
    parser.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the KL term (default: "
                                                                          "%(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default: "
                                                                        "%(default)s)")
    parser.add_argument("--train-on-inputs", action="store_true",
                        help="labels (and distillation positions) on the instruction prompt too, not only the "
                             "response")
    parser.add_argument("--seed", type=int, default=42, help="seed (default: %(default)s)")
    add_data_dir(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--json", action="store_true", help="print the final summary as one JSON line")
    add_overwrite(parser)
    parser.set_defaults(func=run)


def _count_or_fraction(text: str):
    """``--val-size``: an integer count (``3`` or ``3.0``) or a fraction below 1."""
    v = float(text)
    return int(v) if v >= 1 else v


def _auto_on_off(text: str):
    """``--bf16``: auto -> None (when the GPU supports it), on -> True, off -> False."""
    values = {"auto": None, "on": True, "off": False}
    if text not in values:
        raise argparse.ArgumentTypeError(f"--bf16 takes auto, on or off, got {text!r}")
    return values[text]


def run(args) -> int:
    if args.distill and not args.teacher:
        raise ValueError("--distill needs --teacher DENSE: the dense model the pruned one came from")
    if args.teacher and not args.distill:
        raise ValueError("--teacher is used only with --distill")
    from recover.config import RecoverConfig
    from recover.lora import recover

    config = RecoverConfig.from_options(args)  # every option named like a field; invalid values refused now
    if args.resume_from_checkpoint is None:  # resuming continues in OUT
        check_output_args(args, source=args.pruned)
    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, file=sys.stderr, **k))
    log(f"loading {args.pruned}")
    model, tokenizer = load(args, args.pruned)
    if tokenizer is None:
        raise ValueError(f"{args.pruned}: no tokenizer saved with the model; save it with save_pruned(model, path, "
                         f"tokenizer=...)")
    teacher = None
    if args.distill:
        log(f"loading teacher {args.teacher}")
        teacher, _ = load(args, args.teacher)
    _, summary = recover(model, tokenizer, args.data, args.output, config, teacher=teacher,
                         progress=log if not args.quiet else False)
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
