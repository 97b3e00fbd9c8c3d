"""Higher-order ops that wrap a sub-graph (``torch.no_grad`` / autocast regions): propagate through the body."""
from __future__ import annotations

import torch

from . import rule
from .moe import routed_rule, values_of


@rule("wrap_with_set_grad_enabled", "wrap_with_autocast")
def wrapped_body(ctx):
    """args: (flags..., body, *inputs); the body is a get_attr of a nested GraphModule. Expert values (rules.moe)
    flow into the body and out of it with its outputs."""
    args = list(ctx.node.args)
    k = next(i for i, a in enumerate(args) if isinstance(a, torch.fx.Node) and a.op == "get_attr")
    body = getattr(ctx.flow.cap.program.graph_module, args[k].target)
    inputs = [ctx.lay(a) if ctx.is_tensor(a) else None for a in args[k + 1:]]
    out = ctx.flow.run_subgraph(body.graph, inputs, args[k + 1:])
    (ret,) = [n for n in body.graph.nodes if n.op == "output"]
    outs = ret.args[0] if isinstance(ret.args[0], (list, tuple)) else [ret.args[0]]
    for i, o in enumerate(outs):
        if (v := values_of(ctx.flow, o)) is not None:
            ctx.flow.values[(ctx.node, i)] = v
    return out


@routed_rule("wrap_with_set_grad_enabled", "wrap_with_autocast")
def routed_body(ctx, infos, fallback):
    """Expert values entering a wrapped body: the ops inside read them through their own expert rules."""
    return fallback(ctx)
