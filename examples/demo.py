"""The main job on the bundled SmolLM2-135M-Instruct: trace, score, prune 20%, evaluate, generate, save.

Run with ``make demo`` (which first installs what is missing and prepares the model cache) or
``python examples/demo.py``. The pruned model is written to ``out/smollm2-pruned`` with a model card.
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


def generate(model, tokenizer, prompt: str, new_tokens: int = 16) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2, help="fraction of all parameters to remove")
    parser.add_argument("--windows", type=int, default=16, help="perplexity windows to evaluate (128 tokens each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/smollm2-pruned")
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from depgraph.calibration import load_calibration
    from recover.evaluate import perplexity

    hf_logging.disable_progress_bar()  # keep the demo on one screen
    hf_logging.set_verbosity_error()
    model, tokenizer = load_model()  # the bundled SmolLM2-135M-Instruct
    before = count_parameters(model)
    start = time.perf_counter()
    graph = depgraph.trace(model)
    print(f"{graph.collapsed()}\n  (traced in {time.perf_counter() - start:.1f} s; `depgraph trace` lists every group)")

    # Importance-scored pruning with the measured defaults (activation scores on 32 x 64 self-generated tokens,
    # MLP neurons, every layer but the first and last); see bench/results/prune.md
    calib = load_calibration("self", tokenizer, n_samples=32, seq_len=64, seed=args.seed, model=model)
    dense_ppl = perplexity(model, tokenizer, "wikitext2", window=128, limit=args.windows, progress=False)["ppl"]
    dense_text = generate(model, tokenizer, PROMPT)
    model, report, plans = depgraph.prune(model, calib, target=args.ratio, progress=False)
    after = count_parameters(model)
    ppl = perplexity(model, tokenizer, "wikitext2", window=128, limit=args.windows, progress=False)["ppl"]
    protocol = f"WikiText-2 test, window 128, first {args.windows} windows"
    report["evaluation"] = {"wikitext2 perplexity": {"before": dense_ppl, "after": ppl, "protocol": protocol}}

    print(f"\nparameters  {before:,} -> {after:,} ({after / before:.1%} kept; pruned in "
          f"{sum(report['times'].values()):.1f} s)")
    print(f"perplexity  {dense_ppl:.1f} -> {ppl:.1f} ({protocol}; no recovery, `depgraph recover` wins some back)")
    print(f"generation  {PROMPT!r}\n  dense:  {dense_text!r}\n  pruned: {generate(model, tokenizer, PROMPT)!r}")

    out = depgraph.save_pruned(model, args.out, tokenizer=tokenizer,
                               extra_files={"plan.json": plans[0].to_json(), "report.json": report.to_json()})
    stock = "trust_remote_code=True" if (out / "modeling_depgraph.py").exists() else ""
    print(f"\nsaved to {out}/ (safetensors, config, tokenizer, README.md model card, plan.json, report.json)")
    print("load it:")
    print(f"  transformers:  AutoModelForCausalLM.from_pretrained('{out}'{', ' + stock if stock else ''})")
    print(f"  depgraph:      depgraph.load_pruned('{out}')")
    print(f"  llama.cpp:     depgraph export {out} --gguf smollm2-pruned.gguf   (vLLM: --vllm OUT)")


if __name__ == "__main__":
    main()
