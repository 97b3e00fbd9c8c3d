"""Issue 13 item 4, go/no-go: does hidden-channel pruning with every reader re-fitted beat MLP-only at one budget?

    python bench/hidden.py [--windows 64] [--targets 0.2]

SmolLM2-135M-Instruct, WikiText-2 test, window 128, protocol bos, the first ``--windows`` windows; Alpaca 16 x 128
calibration for scores and fits. Rows at each parameter target (fraction of all parameters, embeddings included):

* ``mlp +reconstruct``: the library's MLP-only prune with least-squares reconstruction (layers 1-28);
* ``hidden``: residual channels only (activation scores; embedding, every norm and projection lose them), no fit;
* ``hidden +refit readers``: the same, then every linear layer that reads the residual stream (q, k, v, gate, up) is
  re-fitted block by block so that its output on the pruned model's inputs matches the dense layer's output on the
  dense inputs (least squares, W = T N^T (N N^T + damp)^-1; the tied lm_head is left as it is);
* ``hidden+mlp`` / ``hidden+mlp +refit readers``: one uniform fraction of hidden channels and MLP neurons, readers
  left or re-fitted.

The re-fit names Llama-family modules (``self_attn.q_proj`` ...): a study script, not library code. Writes
bench/results/hidden.json and hidden.md.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from _common import RESULTS, Results, load_smollm2, perplexities

READERS = {"attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "mlp": ("mlp.gate_proj", "mlp.up_proj")}


def _calib(tok, model):
    from depgraph.calibration import load_calibration

    return load_calibration("alpaca", tok, n_samples=16, seq_len=128, seed=0, model=model)


@torch.no_grad()
def refit_readers(dense, pruned, calibration, damp: float = 0.01) -> None:
    """Re-fit every residual reader of ``pruned`` to the dense outputs, decoder block by block (see module doc)."""
    from depgraph.sparsify import batches_of, capture_layer_inputs, run_layer

    dev = next(pruned.parameters()).device
    items_d = capture_layer_inputs(dense, dense.model.layers, batches_of(calibration, 8), dev)
    items_p = capture_layer_inputs(pruned, pruned.model.layers, batches_of(calibration, 8), dev)
    for ld, lp in zip(dense.model.layers, pruned.model.layers):
        for names in READERS.values():  # attention readers first: the MLP's inputs depend on the re-fitted attention
            gram, cross, handles = {}, {}, []
            for name in names:
                def inp(m, args, name=name):
                    x = args[0].reshape(-1, args[0].shape[-1]).double()
                    gram[name] = gram.get(name, 0) + x.T @ x
                    cross.setdefault(name, []).append(x)

                def out(m, args, y, name=name):
                    cross.setdefault(name + ":t", []).append(y.reshape(-1, y.shape[-1]).double())
                handles.append(lp.get_submodule(name).register_forward_pre_hook(inp))
                handles.append(ld.get_submodule(name).register_forward_hook(out))
            try:
                for a, b in zip(items_d, items_p):
                    run_layer(ld, a)
                    run_layer(lp, b)
            finally:
                for h in handles:
                    h.remove()
            for name in names:
                x, t = torch.cat(cross[name]), torch.cat(cross[name + ":t"])
                g = gram[name]
                g = g + damp * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
                w = torch.linalg.solve(g, x.T @ t).T  # [out, in_pruned]
                lin = lp.get_submodule(name)
                lin.weight.copy_(w.to(lin.weight.dtype))
        for a, b in zip(items_d, items_p):
            a[0] = run_layer(ld, a)
            b[0] = run_layer(lp, b)


def main() -> None:
    import depgraph

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--targets", default="0.2")
    ap.add_argument("--variants", default="", help="only these variants (';' list)")
    ap.add_argument("--markdown", action="store_true", help="only rewrite hidden.md from hidden.json")
    args = ap.parse_args()
    res = Results(RESULTS / "hidden.json")
    if args.markdown:
        write_markdown(res)
        return
    data = res.data.setdefault("rows", [])
    res.data.update(windows=args.windows, window=128, protocol="bos", calibration="alpaca 16x128")
    done = {(r["variant"], r["target"]) for r in data}
    dense, tok = load_smollm2()
    if ("dense", 0.0) not in done:
        data.append({"variant": "dense", "target": 0.0, "removed": 0.0,
                     "params": sum(p.numel() for p in dense.parameters()),
                     **perplexities(dense, tok, args.windows, sets=("wikitext2",))})
        res.save()
    calib = _calib(tok, dense)
    total = sum(p.numel() for p in dense.parameters())
    for target in [float(t) for t in args.targets.split(",")]:
        for variant in ("mlp +reconstruct", "hidden", "hidden +refit readers", "hidden+mlp", "hidden+mlp +refit readers"):
            if (variant, target) in done or (args.variants and variant not in args.variants.split(";")):
                continue
            model = copy.deepcopy(dense)
            t = time.perf_counter()
            if variant == "mlp +reconstruct":
                depgraph.prune(model, calib, target=target, reconstruct=True, progress=False)
            else:
                kinds = ("hidden", "mlp") if variant.startswith("hidden+mlp") else ("hidden",)
                graph = depgraph.trace(model)
                scores = depgraph.score(model, graph, calib, method="activation", kinds=kinds, progress=False)
                plan = depgraph.Plan.from_scores(graph, scores, target, kinds=kinds, layers=None)
                depgraph.shrink(model, plan, verify=True)
                if "refit" in variant:
                    refit_readers(dense, model, calib)
            r = {"variant": variant, "target": target, "prune_s": round(time.perf_counter() - t, 1),
                 "removed": round(1 - sum(p.numel() for p in model.parameters()) / total, 4),
                 "params": sum(p.numel() for p in model.parameters()),
                 "hidden_size": model.config.hidden_size if "hidden" in variant else dense.config.hidden_size,
                 **perplexities(model, tok, args.windows, sets=("wikitext2",))}
            data.append(r)
            res.save()
            print(r, flush=True)
    write_markdown(res)


def write_markdown(res: Results) -> None:
    """bench/results/hidden.md from the JSON rows."""
    data = res.data["rows"]
    dense_ppl = next(r["wikitext2"] for r in data if r["variant"] == "dense")
    lines = [f"# Hidden channels vs MLP neurons at one budget (bench/hidden.py)", "",
             f"SmolLM2-135M-Instruct; WikiText-2 test, window {res.data['window']}, first {res.data['windows']} "
             f"windows, protocol {res.data['protocol']}; calibration {res.data['calibration']}; no recovery.", "",
             "| variant | target | removed | params | hidden size | WikiText-2 | x dense | prune (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data:
        lines.append(f"| {r['variant']} | {r['target']:.2g} | {100 * r['removed']:.1f}% | {r['params'] / 1e6:.1f}M | "
                     f"{r.get('hidden_size', '')} | {r['wikitext2']:.1f} | {r['wikitext2'] / dense_ppl:.2f} | "
                     f"{r.get('prune_s', '')} |")
    study = Results(RESULTS / "prune.json").data  # the library default on the same windows, for reference
    for key, st in study.items():
        if (key.startswith("study") and isinstance(st, dict) and st.get("windows") == res.data["windows"]
                and st.get("protocol") == res.data["protocol"]):
            for r in st["rows"]:
                if r["variant"] == "default" and "wikitext2" in r:
                    lines.append(f"| default (bench/results/prune.json {key}: MLP only, {r.get('calibration', '')} "
                                 f"calibration) | {r['target']:.2g} | {100 * r['removed']:.1f}% | "
                                 f"{r['params'] / 1e6:.1f}M | | {r['wikitext2']:.1f} | "
                                 f"{r['wikitext2'] / dense_ppl:.2f} | {r.get('prune_s', '')} |")
    (RESULTS / "hidden.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
