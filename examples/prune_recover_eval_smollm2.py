"""Prune, recover and evaluate the bundled SmolLM2-135M-Instruct end to end on a CPU.

    python examples/prune_recover_eval_smollm2.py                     # small settings, ~10 minutes on 2 CPU cores
    python examples/prune_recover_eval_smollm2.py --max-steps 200 --ppl-limit 0 --zs-limit 200   # a real run

1. load SmolLM2 (``depgraph.models.load_model()``), score it: WikiText-2 perplexity (first ``--ppl-limit`` windows of
   128 tokens) and zero-shot accuracy (first ``--zs-limit`` docs of ``--tasks``);
2. prune 20% of the parameters with ``depgraph.prune``'s defaults (activation scores on 32 x 64 self-generated
   calibration tokens, MLP neurons of every layer but the first and last), save with ``save_pruned``, score again;
3. recover with LoRA on the shared Alpaca subset (``recover.lora.recover``; LLM-Pruner's recipe, fewer steps),
   which writes ``OUT/recovered/model``; reload it with ``depgraph.load_pruned`` and score it.

The same as three commands::

    depgraph prune --target 0.2 -o out/pruned
    depgraph recover out/pruned --data alpaca --max-steps 10 --batch-size 4 -o out/recovered
    depgraph eval out/recovered/model --ppl wikitext2 --tasks piqa,boolq --limit 20
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import depgraph
from depgraph.calibration import load_calibration
from depgraph.models import load_model
from recover.evaluate import perplexity, zero_shot
from recover.lora import recover


def score(name, model, tok, args) -> dict:
    t0 = time.perf_counter()
    row = {"model": name, "params": sum(p.numel() for p in model.parameters())}
    limit = args.ppl_limit or None
    row["wikitext2"] = perplexity(model, tok, "wikitext2", window=128, limit=limit, progress=False)["ppl"]
    if args.tasks:
        zs = zero_shot(model, tok, args.tasks.split(","), limit=args.zs_limit)
        for t, v in zs["tasks"].items():
            row[t] = v["acc"]
    print(f"  {name}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v:,}"
                                    for k, v in row.items() if k != "model") + f"  ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.2, help="fraction of parameters to remove")
    ap.add_argument("--max-steps", type=int, default=10, help="LoRA optimizer steps")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--limit", type=int, default=500, help="Alpaca examples to use")
    ap.add_argument("--cutoff-len", type=int, default=128, help="tokens per example (LLM-Pruner: 256)")
    ap.add_argument("--ppl-limit", type=int, default=40, help="perplexity windows (0 = all)")
    ap.add_argument("--tasks", default="piqa,boolq", help="zero-shot tasks ('' for none)")
    ap.add_argument("--zs-limit", type=int, default=20, help="docs per zero-shot task")
    ap.add_argument("--out", default="out/smollm2-recover")
    args = ap.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)

    print("1. dense SmolLM2-135M-Instruct", flush=True)
    model, tok = load_model()
    rows = [score("dense", model, tok, args)]

    print(f"2. prune {args.target:.0%} (activation scores, 32 x 64 self-generated calibration tokens)", flush=True)
    calib = load_calibration("self", tok, n_samples=32, seq_len=64, model=model)
    model = depgraph.prune(model, calib, target=args.target, progress=False)[0]
    depgraph.save_pruned(model, out / "pruned", tokenizer=tok)
    rows.append(score("pruned", model, tok, args))

    print(f"3. LoRA recovery: {args.max_steps} steps of {args.batch_size} Alpaca examples", flush=True)
    _merged, summary = recover(model, tok, "alpaca", out / "recovered", max_steps=args.max_steps,
                               batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=args.lr,
                               limit=args.limit, val_size=20, cutoff_len=args.cutoff_len, eval_steps=args.max_steps,
                               save_steps=args.max_steps, logging_steps=5, progress=False)
    print(f"  train loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, eval loss "
          f"{summary['final_eval_loss']:.3f}, {summary['tokens_per_second']:.0f} tokens/s", flush=True)
    recovered = depgraph.load_pruned(out / "recovered" / "model")
    rows.append(score("recovered", recovered, tok, args))

    keys = [k for k in rows[0] if k != "model"]
    print("\n| model | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
    for r in rows:
        print("| " + r["model"] + " | " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else f"{r[k]:,}"
                                                    for k in keys) + " |")
    print(f"\nrecovered model: {out / 'recovered' / 'model'} (depgraph.load_pruned)")


if __name__ == "__main__":
    main()
