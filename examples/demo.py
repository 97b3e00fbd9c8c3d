"""The main job on the bundled SmolLM2-135M-Instruct: trace, score, prune 20%, generate, evaluate, save.

Run with ``make demo`` (which first prepares the model cache with ``make fetch-model``) or ``python examples/demo.py``.
The pruned model is written to ``out/smollm2-pruned``; load it back with ``depgraph.load_pruned`` or
``depgraph.models.load_model("out/smollm2-pruned")``.
"""

from __future__ import annotations

import argparse
import time

import torch

import depgraph
from depgraph.models import load_model

PROMPT = "The capital of France is"


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def generate(model, tokenizer, prompt: str, new_tokens: int = 20) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2, help="fraction of all parameters to remove")
    parser.add_argument("--windows", type=int, default=16, help="perplexity windows to evaluate (128 tokens each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/smollm2-pruned")
    args = parser.parse_args()

    model, tokenizer = load_model()  # the bundled SmolLM2-135M-Instruct
    before = count_parameters(model)
    print(f"before: {before:,} parameters")
    print(f"  {PROMPT!r} -> {generate(model, tokenizer, PROMPT)!r}")

    start = time.perf_counter()
    graph = depgraph.trace(model)
    print(f"traced in {time.perf_counter() - start:.1f} s")
    print(graph)

    # Importance-scored pruning with the measured defaults (activation scores on 10 x 64 self-generated tokens, MLP neurons,
    # every layer but the first and last); see bench/results/prune.md
    from depgraph.calibration import load_calibration
    from recover.evaluate import perplexity

    calib = load_calibration("self", tokenizer, n_samples=10, seq_len=64, seed=args.seed, model=model)
    dense_ppl = perplexity(model, tokenizer, "wikitext2", window=128, limit=args.windows)["ppl"]
    model, report, plans = depgraph.prune(model, calib, target=args.ratio)
    after = count_parameters(model)
    print(f"after:  {after:,} parameters ({after / before:.1%} of the original) in "
          f"{sum(report['times'].values()):.1f} s")
    ppl = perplexity(model, tokenizer, "wikitext2", window=128, limit=args.windows)["ppl"]
    print(f"WikiText-2 perplexity (window 128, first {args.windows} windows): {dense_ppl:.1f} -> {ppl:.1f} "
          f"(no recovery; `depgraph recover` wins some back)")
    print(f"  {PROMPT!r} -> {generate(model, tokenizer, PROMPT)!r}")

    import json

    depgraph.save_pruned(model, args.out, tokenizer=tokenizer,
                         extra_files={"plan.json": plans[0].to_json(), "report.json": json.dumps(report)})
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
