"""Higher-order ops that wrap a sub-graph (``torch.no_grad`` / autocast regions): propagate through the body."""
from __future__ import annotations

import torch

from . import rule


@rule("wrap_with_set_grad_enabled", "wrap_with_autocast")
def wrapped_body(ctx):
    """args: (flags..., body, *inputs); the body is a get_attr of a nested GraphModule."""
    args = list(ctx.node.args)
    k = next(i for i, a in enumerate(args) if isinstance(a, torch.fx.Node) and a.op == "get_attr")
    body = getattr(ctx.flow.cap.program.graph_module, args[k].target)
    inputs = [ctx.lay(a) if ctx.is_tensor(a) else None for a in args[k + 1:]]
    return ctx.flow.run_subgraph(body.graph, inputs)
