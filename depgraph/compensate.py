"""Bias compensation (FLAP's baseline bias): a removed unit's mean contribution over the calibration
tokens is folded into the bias of the linear layer that consumed it. The maths is the mean-only case of the
least-squares re-fit (:func:`depgraph.refit.mean_fill`); this module computes it on the dense model in one pass
and creates the biases after ``shrink`` (:func:`apply_bias`).

For a consumer ``y = W x + b`` whose input features ``R`` are removed, the new bias is
``b + W[:, R] @ mean(x[R])``, so the output keeps its mean over the calibration data.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from . import record as records
from .plan import Plan
from .stats import collect, linear_view

BIAS_FLAGS = ("mlp_bias", "attention_bias", "bias", "use_bias")


@torch.no_grad()
def input_means(model, paths, calibration) -> dict:
    """Mean input feature of each linear in ``paths`` over every calibration token: {path: [in_features]} (float64)."""
    return {p: s.mean for p, s in collect(model, list(paths), calibration).items()}


@torch.no_grad()
def bias_deltas(model, plan: Plan, calibration) -> dict:
    """{linear path: bias increment [out_features]}, means taken on the dense model in one pass (``prune`` takes
    them block by block instead: :func:`depgraph.reconstruct.reconstruct` with ``mode="mean"``); compute before
    ``shrink`` (it needs the removed columns)."""
    from .reconstruct import consumers, weight_out_in
    from .refit import mean_fill

    found = consumers(model, plan)
    means = input_means(model, found, calibration)
    deltas = {}
    for path, idx in found.items():
        w = weight_out_in(model.get_submodule(path))
        deltas[path] = mean_fill(w, means[path], idx).to(w.dtype)
    return deltas


@torch.no_grad()
def apply_bias(model, deltas: dict) -> None:
    """Add the increments (after ``shrink``), creating biases where needed and recording them so the
    folder loads: with the config's bias flag when that rebuilds the same parameters, else through
    ``load_pruned``'s record of added biases."""
    added = []
    for path, delta in deltas.items():
        mod = model.get_submodule(path)
        if mod.bias is None:
            out = linear_view(mod, path).out_features
            mod.bias = nn.Parameter(torch.zeros(out, dtype=mod.weight.dtype, device=mod.weight.device))
            added.append(path)
        mod.bias.add_(delta.to(mod.bias.device))
    config = getattr(model, "config", None)
    if config is None or not added:
        return
    info = records.get(model)
    records.add_biases(info, added)
    _try_config_flags(model, config, info)


def _try_config_flags(model, config, info: dict) -> None:
    """Turn on a config bias flag when the model it builds has every parameter we have; the extra
    biases it implies (e.g. Llama's ``mlp_bias`` also covers gate/up) are added as zeros."""
    mine = {n for n, _ in model.named_parameters()}
    for flag in BIAS_FLAGS:
        if getattr(config, flag, None) is not False:
            continue
        candidate = copy.deepcopy(config)
        setattr(candidate, flag, True)
        try:
            with torch.device("meta"):
                theirs = {n for n, _ in type(model)(candidate).named_parameters()}
        except Exception:  # noqa: BLE001 - this flag does not build
            continue
        extra = theirs - mine
        if not mine <= theirs or any(not n.endswith(".bias") for n in extra):
            continue
        for name in sorted(extra):
            mod = model.get_submodule(name.rpartition(".")[0])
            mod.bias = nn.Parameter(torch.zeros(mod.out_features, dtype=mod.weight.dtype, device=mod.weight.device))
        records.add_biases(info, {n.rpartition(".")[0] for n in extra})
        setattr(config, flag, True)
        return
