"""Scores for ``block`` groups (depth pruning), one value per block; low means "remove first".

``influence``  Block Influence (ShortGPT): 1 - cos(x_in, x_out) averaged over every calibration token, where
               ``x_in`` is the residual stream entering the block and ``x_out = x_in + y`` what it leaves (for a
               layer, its input and output; for a sub-block, the input of the module reading the stream and the
               outputs ``y`` of the modules writing it, both from depgraph.blocks).
``loss``       calibration-loss increase: the block is masked (its write parameters zeroed, which is exactly its
               removal), the mean calibration loss measured and the weights put back: ``loss_without - loss``.
"""
from __future__ import annotations

import numpy as np
import torch

BLOCK_METHODS: dict = {}


def block_scorer(name: str):
    def register(fn):
        BLOCK_METHODS[name] = fn
        return fn
    return register


def _batches(calibration, batch_size: int):
    calibration = torch.as_tensor(calibration).long()
    return [calibration[i:i + batch_size] for i in range(0, len(calibration), batch_size)]


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        return next((t for t in x if isinstance(t, torch.Tensor)), None)
    return None


def _stream_input(args, kwargs):
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)
                 and a.is_floating_point()), None)


@block_scorer("influence")
@torch.no_grad()
def block_influence(model, blocks, calibration, batch_size: int = 8) -> dict:
    """{block id: [1 - mean cos(x_in, x_out)]} over the calibration tokens."""
    sums = {g.id: 0.0 for g in blocks}
    count = 0
    for ids in _batches(calibration, batch_size):
        seen: dict = {}
        handles = []
        for g in blocks:
            b = g.block
            reader = model.get_submodule(b["reader"])

            def read(m, a, k, gid=g.id):  # hooks return None: they must not replace inputs or outputs
                seen.setdefault((gid, "in"), _stream_input(a, k).detach())

            def write(m, a, out, gid=g.id):
                seen.setdefault((gid, "out"), []).append(_first_tensor(out).detach())
            handles.append(reader.register_forward_pre_hook(read, with_kwargs=True))
            handles += [model.get_submodule(w).register_forward_hook(write) for w in b["writers"]]
        try:
            _forward(model, ids)
        finally:
            for h in handles:
                h.remove()
        for g in blocks:
            x = seen[(g.id, "in")].float()
            outs = [o.float() for o in seen[(g.id, "out")]]
            y = outs[0] if g.block["part"] == "layer" else x + sum(outs)
            cos = torch.nn.functional.cosine_similarity(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), dim=-1)
            sums[g.id] += float((1 - cos).sum())
        count += ids.numel()
    return {gid: np.array([s / max(count, 1)]) for gid, s in sums.items()}


@block_scorer("loss")
@torch.no_grad()
def block_loss(model, blocks, calibration, batch_size: int = 8) -> dict:
    """{block id: [calibration loss without the block - calibration loss]}."""
    params = dict(model.named_parameters(remove_duplicate=False))
    base = _loss(model, calibration, batch_size)
    out = {}
    for g in blocks:
        saved = [(params[p], params[p].detach().clone()) for p in g.block["writes"]]
        try:
            for t, _ in saved:
                t.zero_()
            out[g.id] = np.array([_loss(model, calibration, batch_size) - base])
        finally:
            for t, v in saved:
                t.copy_(v)
    return out


def _forward(model, ids):
    device = next(model.parameters()).device
    try:
        return model(ids.to(device), use_cache=False)
    except TypeError:
        return model(ids.to(device))


def _loss(model, calibration, batch_size) -> float:
    total, n = 0.0, 0
    device = next(model.parameters()).device
    for ids in _batches(calibration, batch_size):
        ids = ids.to(device)
        total += float(model(input_ids=ids, labels=ids, use_cache=False).loss) * len(ids)
        n += len(ids)
    return total / max(n, 1)


def score_blocks(model, graph, calibration, method: str = "influence", layers=None, batch_size: int = 8) -> dict:
    """Scores of every ``block`` group of ``graph`` (in ``layers`` when given) by ``method``."""
    from .errors import PlanError

    if method not in BLOCK_METHODS:
        raise PlanError(f"unknown block method {method!r}; choose one of {', '.join(BLOCK_METHODS)}")
    if calibration is None:
        raise PlanError(f"block method {method!r} needs calibration data")
    blocks = [g for g in graph.groups("block") if layers is None or g.layer in set(layers)]
    if not blocks:
        return {}
    was = model.training
    model.eval()
    try:
        return BLOCK_METHODS[method](model, blocks, calibration, batch_size)
    finally:
        model.train(was)
