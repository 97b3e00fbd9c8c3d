"""``depgraph eval``: perplexity (WikiText-2/PTB) and zero-shot tasks through lm-eval."""
from __future__ import annotations

import json
import sys

from depgraph.errors import DepgraphError

from .common import add_data_dir, add_model_argument, add_protocol_argument, load, model_name

def add(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model (perplexity, zero-shot tasks)",
                              description="Perplexity on WikiText-2/PTB (non-overlapping windows) and zero-shot "
                                          "tasks through lm-eval, from local copies when offline.")
    add_model_argument(p)
    p.add_argument("--ppl", default="", help="comma list: wikitext2,ptb")
    p.add_argument("--tasks", default="", help="comma list of lm-eval tasks: boolq,piqa,hellaswag,winogrande,"
                                                "arc_easy,arc_challenge,openbookqa")
    p.add_argument("--window", type=int, default=128, help="perplexity window in tokens (default 128)")
    p.add_argument("--limit", type=int, default=None, help="at most this many windows / examples per set")
    add_protocol_argument(p)
    add_data_dir(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    ppl_sets = [s for s in args.ppl.split(",") if s]
    tasks = [t for t in args.tasks.split(",") if t]
    if not ppl_sets and not tasks:
        raise DepgraphError("nothing to evaluate: give --ppl wikitext2,ptb and/or --tasks piqa,...")
    unknown = [s for s in ppl_sets if s not in ("wikitext2", "ptb")]
    if unknown:
        raise DepgraphError(f"--ppl: unknown data set(s) {unknown}; choose wikitext2, ptb")
    if args.window < 2:
        raise DepgraphError("--window must be at least 2 tokens")
    if args.limit is not None and args.limit < 1:
        raise DepgraphError(f"--limit must be a positive integer, got {args.limit}")
    from recover.evaluate import perplexity, zero_shot


    model, tok = load(args)
    if tok is None:
        raise DepgraphError(f"{args.model}: no tokenizer in the model folder")
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if ppl_sets and isinstance(context, int) and args.window > context:
        raise DepgraphError(f"--window {args.window} is longer than the model's context ({context} tokens); "
                            f"give --window {context} or less")
    result = {"model": model_name(args), "window": args.window, "limit": args.limit,
              "protocol": args.protocol, "ppl": {}, "ppl_source": {}}
    for name in ppl_sets:
        r = perplexity(model, tok, name, window=args.window, limit=args.limit, data_dir=args.data_dir,
                       protocol=args.protocol)
        result["ppl"][name] = r["ppl"]
        result["ppl_source"][name] = {"source": r.get("source"), "windows": r.get("windows"),
                                      "split": r.get("split"), "bos": r.get("bos")}
        if not args.json:
            print(f"{name}: ppl {r['ppl']:.2f} (window {args.window}, {r.get('windows')} windows, protocol "
                  f"{args.protocol}{'' if r.get('bos') is None else ', BOS first'}, {r.get('source')})")
    if tasks:
        z = zero_shot(model, tok, tasks=tasks, limit=args.limit, data_dir=args.data_dir)
        result.update({k: v for k, v in z.items() if k != "tasks"})
        result["tasks"] = z["tasks"]
        if not args.json:
            for t, v in z["tasks"].items():
                print(f"{t}: " + ", ".join(f"{k} {x:.4f}" for k, x in v.items() if isinstance(x, float)))
    if args.json:
        json.dump(result, sys.stdout, default=str)
        print()
    return 0
