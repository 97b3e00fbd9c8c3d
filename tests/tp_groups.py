"""Run by test_torch_pruning.py in a subprocess (torch-pruning can hang): print torch-pruning's coupled
(parameter, dim) sets for a few root channels of a model, as JSON."""
import json
import sys

import torch
import torch_pruning as tp

from archs import ARCHS, ids, small_cnn


def coupled(dg, model, module, fn):
    names = {id(p): n for n, p in model.named_parameters()}
    modules = {id(m): n for n, m in model.named_modules()}
    out = set()
    for dep, _ in dg.get_pruning_group(module, fn, idxs=[0]):
        target = dep.target.module
        handler = getattr(dep.handler, "__name__", "")
        dim_out = "out" in handler
        if isinstance(target, torch.nn.Module) and id(target) in modules:  # skip torch-pruning's dummy ops
            prefix = modules[id(target)]
            for pname, p in target.named_parameters(recurse=False):
                if p.dim() == 1:
                    if dim_out:
                        out.add((f"{prefix}.{pname}", 0))
                elif isinstance(target, torch.nn.Embedding):
                    out.add((f"{prefix}.{pname}", 1))
                else:
                    out.add((f"{prefix}.{pname}", 0 if dim_out else 1))
        elif isinstance(target, torch.nn.Parameter) and id(target) in names:
            out.add((names[id(target)], 0))
    return sorted(out)


def main(which):
    if which == "llama":
        model = ARCHS["llama-mha"]()
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=ids())
        layer = model.model.layers[0]
        result = {"mlp": coupled(dg, model, layer.mlp.gate_proj, tp.prune_linear_out_channels),
                  "hidden": coupled(dg, model, model.model.embed_tokens, tp.prune_embedding_out_channels)}
    else:
        model = small_cnn()
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(2, 3, 8, 8))
        result = {"inner": coupled(dg, model, model.block[0], tp.prune_conv_out_channels),
                  "residual": coupled(dg, model, model.stem[0], tp.prune_conv_out_channels)}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
