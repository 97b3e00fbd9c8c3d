"""Router logits at run time: masking routed experts, and reading the logits for importance scores.

An experts group (depgraph.groups) is masked by zeroing the experts' parameters *and* setting their router
logits to ``-inf``: the logits come from one ``F.linear`` call whose weight is the router parameter (the
trace proves it, depgraph.rules.moe), so a ``TorchFunctionMode`` that watches for that weight fills the
masked columns of its output. A masked expert is then never selected and takes no softmax mass, exactly as
in the model without it. The mask lives on the router module (two forward hooks and a plain attribute,
so ``copy.deepcopy`` keeps it); it is for comparing with ``shrink``, not for saving.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_MASK_ATTR = "_depgraph_masked_experts"  # {parameter path relative to the module: [expert indices]}
_MODES_ATTR = "_depgraph_routing_modes"


class _RouterLinear(TorchFunctionMode):
    """Calls ``on_logits(name, logits)`` for every ``F.linear`` whose weight is one of ``weights``
    ({id(tensor): name}); a returned tensor replaces the output."""

    def __init__(self, weights: dict, on_logits):
        super().__init__()
        self.weights = weights
        self.on_logits = on_logits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            name = self.weights.get(id(w))
            if name is not None:
                new = self.on_logits(name, out)
                if new is not None:
                    out = new
        return out


def _enter(module, args):
    masks = getattr(module, _MASK_ATTR, {})
    weights = {id(module.get_parameter(rel)): rel for rel in masks}

    def fill(rel, logits):
        idx = torch.as_tensor(masks[rel], device=logits.device)
        return logits.index_fill(logits.dim() - 1, idx, float("-inf"))

    mode = _RouterLinear(weights, fill)
    mode.__enter__()
    module.__dict__.setdefault(_MODES_ATTR, []).append(mode)


def _exit(module, args, output):
    modes = module.__dict__.get(_MODES_ATTR)
    if modes:
        modes.pop().__exit__(None, None, None)


def mask_experts(model, router_module: str, router_weight: str, experts):
    """Give ``experts`` (indices along the router's output dim) a logit of ``-inf`` whenever
    ``router_module`` runs the linear with ``router_weight`` (a parameter name of ``model``).
    Returns a callable that takes this call back (the router as it was, hooks included)."""
    module = model.get_submodule(router_module)
    prefix = f"{router_module}." if router_module else ""
    if not router_weight.startswith(prefix):
        raise ValueError(f"router weight {router_weight} is not inside {router_module or '<root>'}")
    rel = router_weight[len(prefix):]
    masks = module.__dict__.get(_MASK_ATTR)
    hooks = []
    if masks is None:
        masks = module.__dict__[_MASK_ATTR] = {}
        hooks = [module.register_forward_pre_hook(_enter), module.register_forward_hook(_exit, always_call=True)]
    old = masks.get(rel)
    masks[rel] = sorted(set(old or []) | {int(e) for e in experts})

    def take_back() -> None:
        if old is None:
            masks.pop(rel, None)
        else:
            masks[rel] = old
        for h in hooks:  # this call installed the mask: remove it whole
            h.remove()
        if hooks:
            module.__dict__.pop(_MASK_ATTR, None)

    return take_back


class RouterLogits:
    """Context manager recording the router logits of every forward: ``logits[name]`` is a list of
    ``[tokens, experts]`` float tensors (detached) for the router weight ``name``."""

    def __init__(self, model, names):
        params = dict(model.named_parameters())
        self.logits = {n: [] for n in names}
        self._mode = _RouterLinear({id(params[n]): n for n in names}, self._record)

    def _record(self, name, out):
        self.logits[name].append(out.detach().reshape(-1, out.shape[-1]).float())

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
