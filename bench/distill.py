"""Recovery objectives at equal wall time on SmolLM2-135M pruned by 20% (library defaults).

    python bench/distill.py [--minutes 8] [--ppl-limit 64] [--self-samples 256]

Rows: pruned (no recovery); LoRA on Alpaca with the LM loss (LLM-Pruner's recipe); LoRA on Alpaca with the LM loss
mixed 50/50 with KL to the dense model's logits; LoRA on text sampled from the dense model with KL alone
(self-distillation: no data at all). Each run gets the same ``--minutes`` of training (distillation's extra teacher
forward means fewer steps). Perplexity: WikiText-2 and PTB, LLM-Pruner's protocol, windows of 128 tokens, the first
``--ppl-limit`` windows. Writes bench/results/distill.json and distill.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time

from _common import RESULTS, load_smollm2, perplexities

import torch


def main(argv=None) -> None:
    import depgraph
    from depgraph.calibration import load_calibration
    from recover.lora import recover

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--ppl-limit", type=int, default=64)
    ap.add_argument("--self-samples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=5, help="warm-up steps, the same for every run (recover() "
                    "otherwise sizes it from the planned epochs, which a time budget cuts short)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    def ppl(model):
        return perplexities(model, tok, args.ppl_limit)

    dense, tok = load_smollm2()
    pruned = copy.deepcopy(dense)
    calib = load_calibration("self", tok, n_samples=10, seq_len=64, model=pruned)
    depgraph.prune(pruned, calib, target=0.2, progress=False)
    res = {"args": vars(args), "machine": f"{platform.machine()}, CPU", "torch": torch.__version__,
           "rows": [{"name": "dense", **ppl(dense)}, {"name": "pruned, no recovery", **ppl(pruned)}]}
    out = RESULTS / "distill.json"
    runs = [
        ("LM loss on Alpaca", dict(data="alpaca")),
        ("LM + KL to dense (alpha 0.5) on Alpaca", dict(data="alpaca", distill=True, distill_alpha=0.5)),
        ("KL to dense on self-generated text (no data)", dict(data="self", distill=True, distill_alpha=1.0,
                                                               limit=args.self_samples)),
    ]
    for name, kw in runs:
        print("==", name, flush=True)
        model = copy.deepcopy(pruned)
        t = time.perf_counter()
        data = kw.pop("data")
        with tempfile.TemporaryDirectory() as tmp:
            merged, s = recover(model, tok, data, tmp, teacher=dense if kw.get("distill") else None,
                                max_minutes=args.minutes, epochs=2.0, batch_size=args.batch_size,
                                micro_batch_size=4, lr=args.lr, warmup_steps=args.warmup, save=False,
                                progress=False, seed=42, **kw)
        res["rows"].append({"name": name, "steps": s["steps"], "train_examples": s["train_examples"],
                            "train_s": round(s["train_runtime_s"]), "total_s": round(time.perf_counter() - t),
                            "tokens_per_second": round(s["tokens_per_second"]), **ppl(merged)})
        out.write_text(json.dumps(res, indent=1) + "\n")
        print(res["rows"][-1], flush=True)

    rows = res["rows"]
    d = rows[0]
    lines = ["# Recovery objectives at equal training time: SmolLM2-135M-Instruct pruned by 20%", "",
             f"{res['machine']}, torch {res['torch']}. Pruned with depgraph.prune's defaults (activation scores, "
             f"self-generated calibration, MLP neurons). Each recovery run: LoRA r=8 on every linear layer, "
             f"{args.minutes:g} minutes of training, batch {args.batch_size}, lr {args.lr} after {args.warmup} warm-up "
             f"steps (linear decay planned over 2 epochs); the self-generated run "
             f"samples {args.self_samples} texts of 256 tokens from the dense model first (time in 'total'). "
             f"Perplexity: window 128, first {args.ppl_limit} windows.", "",
             "| run | steps | train (s) | total (s) | WikiText-2 | x dense | PTB | x dense |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r.get('steps', '')} | {r.get('train_s', '')} | {r.get('total_s', '')} | "
                     f"{r['wikitext2']:.1f} | {r['wikitext2'] / d['wikitext2']:.2f} | {r['ptb']:.1f} | "
                     f"{r['ptb'] / d['ptb']:.2f} |")
    (RESULTS / "distill.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
