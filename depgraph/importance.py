"""Importance scores for the units of dependency-graph groups.

Element scores (one value per weight element) are reduced to one value per unit of a group:

* per member, sum the element scores over every dim except ``member.dim`` (one value per index);
* sum the indices that belong to each unit (``member.unit_of_index``); a kv-level member (GQA key/value
  rows) gives one value per kv group, spread equally over the ``rep`` query heads of that group;
* aggregate the members' unit vectors with ``sum``/``mean``/``max``/``prod``;
* optionally normalise per group (``mean`` or ``max``) so that groups can be ranked globally.

Methods (``w`` weight, ``g`` gradient of the mean calibration loss, ``F`` diagonal empirical Fisher
= mean over samples of the per-sample squared gradient):

``random``         seeded uniform scores (no calibration).
``l1``             |w|.
``l2``/``magnitude``  the L2 norm of the unit's slice of each member (w² summed, then square-rooted).
``taylor``         |w g|                      (LLM-Pruner "Element1", first order).
``fisher``         ½ w² F                     (second-order term alone).
``taylor+fisher``  |w g − ½ w² F|             (LLM-Pruner "Element2": the element-wise second-order
                   Taylor expansion of the loss change, absolute value taken *after* combining the terms,
                   as in LLM-Pruner's ``param_mix``).
``taylor-vector``  |Σ_{unit's elements} w g|  (LLM-Pruner "Vector": the sum is signed, the absolute value
                   is taken per unit and member).
``activation``     |w| · ‖x_j‖₂ (Wanda), where ‖x_j‖₂ is the L2 norm over all calibration tokens of the
                   input feature j of the linear layer. Only defined for members along a linear layer's
                   input-feature dim; every other member (output rows, norms, embeddings) falls back to |w|.
                   Routed experts (``experts`` groups) score their routed gate mass instead: over every
                   calibration token, the router's softmax probability of the expert summed over the tokens
                   whose top-k selects it (the logits are read where the router's linear runs,
                   depgraph.routing), so an expert that is rarely chosen, or chosen with little weight,
                   scores low. Gradient methods need nothing special: an expert's parameters only get
                   gradients from the tokens routed to it.
``fluctuation``    w² · Var(x_j) (FLAP's fluctuation metric): the variance over all calibration tokens of the
                   input feature j, times the squared weights that read it, i.e. how much the layer's output
                   moves when the feature is replaced by its mean (which ``compensate=True`` folds into the
                   bias). Only the members along a linear layer's input-feature dim count (the consumer: o_proj
                   for heads, down_proj for neurons); groups with no such member score 0.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .stats import canonical_names

from .dispatch import fetch

METHODS = ("random", "l1", "l2", "magnitude", "taylor", "fisher", "taylor+fisher", "taylor-vector", "activation",
           "fluctuation", "obs")
NEEDS_CALIBRATION = ("taylor", "fisher", "taylor+fisher", "taylor-vector", "activation", "fluctuation", "obs")
AGGREGATES = ("sum", "mean", "max", "prod")
NORMALIZE = (None, "mean", "max")
GRADIENT_METHODS = ("taylor", "fisher", "taylor+fisher", "taylor-vector")  # need a backward pass


@dataclass
class GradStats:
    """Gradient statistics of a calibration pass, keyed by canonical parameter name.

    ``grad[name]``: mean over samples of the per-sample gradient (= gradient of the mean loss).
    ``fisher[name]``: mean over samples of the per-sample squared gradient (diagonal empirical Fisher).
    """

    grad: dict = field(default_factory=dict)
    fisher: dict = field(default_factory=dict)
    num_samples: int = 0
    loss: float = float("nan")  # mean calibration loss


# -- helpers --------------------------------------------------------------------------------


def _member_params(graph, groups=None) -> set:
    canon = canonical_names(graph)
    groups = graph.groups() if groups is None else groups
    return {canon.get(m.param, m.param) for g in groups for m in g.members}


def _tensors(model) -> dict:
    """Canonical name -> tensor for parameters and buffers (named_parameters dedups tied weights)."""
    out = dict(model.named_buffers())
    out.update(dict(model.named_parameters()))
    return out


def _check_batches(batches) -> torch.Tensor:
    if not isinstance(batches, torch.Tensor) or batches.dim() != 2:
        raise ValueError(f"calibration must be a [N, L] LongTensor of token ids, got "
                         f"{type(batches).__name__}{tuple(batches.shape) if isinstance(batches, torch.Tensor) else ''}")
    return batches.long()


def _device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# -- calibration passes ---------------------------------------------------------------------
def gradient_stats(model, graph, batches, dtype=torch.float32, progress: bool = True,
                   per_sample: bool = True) -> GradStats:
    """One calibration pass: per sample (row of ``batches``), forward with ``labels=ids`` and backward.

    ``per_sample=False`` (first-order methods, no Fisher): one batched forward/backward of the mean
    loss instead; ``fisher`` is then empty. The gradient is the same up to rounding (equal lengths).

    Accumulates, for every parameter that is a member of some group, the per-sample gradient and its
    square (every sample's, not only the last one's), then divides both by the number of samples.
    Gradients of other parameters are not computed. ``requires_grad`` flags, existing ``.grad`` tensors,
    the training mode and the weights are restored / left unchanged. Stats are stored in ``dtype``.
    """
    batches = _check_batches(batches)
    wanted = _member_params(graph)
    params = dict(model.named_parameters())  # canonical names; tied weights appear once
    tracked = {n: p for n, p in params.items() if n in wanted}
    flags = {n: p.requires_grad for n, p in params.items()}
    old_grads = {n: p.grad for n, p in params.items()}
    was_training = model.training
    dev = _device(model)

    stats = GradStats()
    stats.grad = {n: torch.zeros(p.shape, dtype=dtype, device=p.device) for n, p in tracked.items()}
    stats.fisher = {n: torch.zeros(p.shape, dtype=dtype, device=p.device) for n, p in tracked.items()}
    total_loss = 0.0
    try:
        model.eval()
        for n, p in params.items():
            p.requires_grad_(n in tracked)
            p.grad = None
        chunks = batches if per_sample else [batches]
        if not per_sample:
            stats.fisher = {}
        with torch.enable_grad():
            for row in tqdm(chunks, desc="gradients", disable=not progress, leave=False):
                ids = (row[None] if per_sample else row).to(dev)
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                total_loss += float(loss.detach())
                for n, p in tracked.items():
                    if p.grad is None:
                        continue
                    g = p.grad.detach().to(dtype)
                    stats.grad[n].add_(g)
                    if per_sample:
                        stats.fisher[n].add_(g * g)
                    p.grad = None
        n = len(chunks)
        for d in (stats.grad, stats.fisher):
            for t in d.values():
                t.div_(max(n, 1))
        stats.num_samples = len(batches)
        stats.loss = total_loss / max(n, 1)
    finally:
        for name, p in params.items():
            p.grad = old_grads[name]
            p.requires_grad_(flags[name])
        model.train(was_training)
    return stats


def _input_dims(model, graph) -> dict:
    """{module name: (canonical weight name, input-feature dim)} for every linear layer whose weight is a
    group member along its input-feature dim (nn.Linear: dim 1; transformers' Conv1D: dim 0)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # noqa: BLE001 - transformers is optional here
        Conv1D = ()
    canon = canonical_names(graph)
    ids = {id(p): n for n, p in model.named_parameters()}
    along = {(canon.get(m.param, m.param), m.dim) for g in graph.groups() for m in g.members}
    out = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            d = 1
        elif Conv1D and isinstance(mod, Conv1D):
            d = 0
        else:
            continue
        wname = ids.get(id(mod.weight))
        if wname is not None and (wname, d) in along:
            out[mname] = (wname, d)
    return out


@contextmanager
def moment_hooks(model, graph):
    """Forward hooks that accumulate ``{weight name: (n, sum [in], sum of squares [in])}`` (float64 sums) of
    the inputs of every linear layer whose weight is a group member along its input-feature dim, while the
    caller runs the model (or one block of it: streamed pruning runs one decoder block at a time). Yields the
    dict; the hooks are removed on exit. A weight used by several layers (tied) accumulates over all of them."""
    stats, hooks = {}, []

    def hook(wname):
        def fn(_mod, inputs, _out):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).double()
            n, s1, s2 = stats.get(wname, (0, 0.0, 0.0))
            stats[wname] = (n + x.shape[0], s1 + x.sum(0), s2 + x.pow(2).sum(0))
        return fn

    modules = dict(model.named_modules())
    try:
        for mname, (wname, _) in _input_dims(model, graph).items():
            hooks.append(modules[mname].register_forward_hook(hook(wname)))
        yield stats
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def input_moments(model, graph, batches, progress: bool = True) -> dict:
    """Gradient-free pass over the calibration rows, one row at a time: the :func:`moment_hooks` statistics
    of each input feature over every calibration token."""
    batches = _check_batches(batches)
    was_training = model.training
    dev = _device(model)
    try:
        model.eval()
        with moment_hooks(model, graph) as stats:
            for row in tqdm(batches, desc="activations", disable=not progress, leave=False):
                model(input_ids=row[None].to(dev))
    finally:
        model.train(was_training)
    return stats


@torch.no_grad()
def gram_stats(model, graph, batches, progress: bool = True) -> dict:
    """``{weight name: X^T X [in, in] float64}`` over every calibration token, for every linear layer whose
    weight is a group member along its input-feature dim (the consumers)."""
    batches = _check_batches(batches)
    sites = _input_dims(model, graph)
    grams, hooks = {}, []

    def hook(wname):
        def fn(_mod, inputs, _out):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).double()
            grams[wname] = grams.get(wname, 0) + x.t() @ x
        return fn

    modules = dict(model.named_modules())
    was_training = model.training
    dev = _device(model)
    try:
        model.eval()
        for mname, (wname, _) in sites.items():
            hooks.append(modules[mname].register_forward_hook(hook(wname)))
        for rows in tqdm(batches.split(8), desc="gram", disable=not progress, leave=False):
            model(input_ids=rows.to(dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return grams


def obs_scores(model, graph, grams: dict, groups, damp: float = 0.01) -> dict:
    """``{group id: OBS cost per unit}`` from the consumers' Gram matrices (see ``obs`` in the module docstring)."""
    from .refit import obs_costs

    canon = canonical_names(graph)
    tensors = _tensors(model)
    act_dims = {w: d for w, d in _input_dims(model, graph).values()}
    out = {}
    for g in groups:
        s = np.zeros(g.num_units)
        for m in g.members:
            name = canon.get(m.param, m.param)
            if act_dims.get(name) != m.dim or name not in grams or m.level == "kv":
                continue
            w = tensors[name].detach()
            W = w if m.dim == 1 else w.t()  # [out, in]
            s = s + obs_costs(W, grams[name], m.unit_of_index, damp)[: g.num_units]
        out[g.id] = s
    return out


def squared_norms(moments: dict) -> dict:
    """``{weight name: [in_features] float32}``: each input feature's squared L2 norm over the tokens."""
    return {w: s2.float() for w, (_, _, s2) in moments.items()}


def variances(moments: dict) -> dict:
    """``{weight name: [in_features] float32}``: each input feature's (population) variance over the tokens."""
    out = {}
    for w, (n, s1, s2) in moments.items():
        mean = s1 / n
        out[w] = (s2 / n - mean * mean).clamp_min(0).float()
    return out


STATS_FROM_MOMENTS = {"activation": squared_norms, "fluctuation": variances}


def activation_stats(model, graph, batches, progress: bool = True) -> dict:
    """``{weight name: [in_features] float32}``: the squared L2 norm of each input feature over every
    calibration token (see :func:`input_moments`)."""
    return squared_norms(input_moments(model, graph, batches, progress))


def fluctuation_stats(model, graph, batches, progress: bool = True) -> dict:
    """``{weight name: [in_features] float32}``: the (population) variance of each input feature over every
    calibration token (see :func:`input_moments`)."""
    return variances(input_moments(model, graph, batches, progress))


@torch.no_grad()
def routed_mass(model, graph, batches, progress: bool = True) -> dict:
    """``{experts group id: float64 [num_experts]}``: sum over calibration tokens of the router's softmax
    probability of each expert, counted only where the expert is among the token's top-k logits."""
    from .routing import RouterLogits

    batches = _check_batches(batches)
    groups = {g.routing["router"][0]: g for g in graph.groups("experts")}
    if not groups:
        return {}
    canon = canonical_names(graph)
    names = {canon.get(n, n): n for n in groups}
    was_training = model.training
    dev = _device(model)
    mass = {g.id: np.zeros(g.num_units) for g in groups.values()}
    try:
        model.eval()
        with RouterLogits(model, list(names)) as tap:
            for row in tqdm(batches, desc="routing", disable=not progress, leave=False):
                model(input_ids=row[None].to(dev))
    finally:
        model.train(was_training)
    for name, chunks in tap.logits.items():
        g = groups[names[name]]
        for z in chunks:
            sel = torch.topk(z, g.min_units, dim=-1).indices
            p = torch.softmax(z, dim=-1).gather(1, sel)
            mass[g.id] += np.bincount(sel.flatten().cpu().numpy(), weights=p.flatten().double().cpu().numpy(),
                                      minlength=g.num_units)[:g.num_units]
    return mass


# -- element scores -> unit scores -----------------------------------------------------------
def _element_scores(method, w, g=None, fisher=None, act=None, act_dim=None):
    """Element-wise score tensor (float32), or the signed w*g for ``taylor-vector``."""
    w = w.detach().float()
    if method == "l1":
        return w.abs()
    if method in ("l2", "magnitude"):
        return w * w
    if method == "taylor":
        return (w * g.float()).abs()
    if method == "fisher":
        return 0.5 * w * w * fisher.float()
    if method == "taylor+fisher":
        return (w * g.float() - 0.5 * w * w * fisher.float()).abs()
    if method == "taylor-vector":
        return w * g.float()
    if method in ("activation", "fluctuation"):
        if act is None:  # activation only: a member that does not read the features falls back to |w|
            return w.abs()
        shape = [1] * w.dim()
        shape[act_dim] = -1
        per_feature = act.float().to(w.device).reshape(shape)  # ||x_j||^2 or Var(x_j), along act_dim
        return w.abs() * per_feature.sqrt() if method == "activation" else w * w * per_feature
    raise ValueError(f"unknown method {method!r}")


def _member_units(member, per_index: np.ndarray, group, post=None) -> np.ndarray:
    """Sum a per-index vector into per-unit values; ``post`` (sqrt for L2, abs for taylor-vector) is applied
    to each unit's sum. A kv-level member gives one score per kv group, spread equally over its heads."""
    uoi = np.asarray(member.unit_of_index)
    keep = uoi >= 0
    post = post or (lambda x: x)
    if member.level == "kv" and group.gqa:
        kv, rep = group.gqa
        per_kv = post(np.bincount(uoi[keep], weights=per_index[keep], minlength=kv)[:kv])
        return np.repeat(per_kv / rep, rep)[: group.num_units]
    return post(np.bincount(uoi[keep], weights=per_index[keep], minlength=group.num_units)[: group.num_units])


def _aggregate(rows, how):
    a = np.stack(rows)
    if how == "sum":
        return a.sum(0)
    if how == "mean":
        return a.mean(0)
    if how == "max":
        return a.max(0)
    if how == "prod":
        return a.prod(0)
    raise ValueError(f"unknown aggregate {how!r}; use one of {AGGREGATES}")


def _normalize(s, how):
    if how is None:
        return s
    if how == "mean":
        d = s.mean()
    elif how == "max":
        d = s.max()
    else:
        raise ValueError(f"unknown normalize {how!r}; use one of {NORMALIZE}")
    return s / d if d != 0 else s


def score(model, graph, calibration=None, method: str = "taylor", aggregate: str = "sum", normalize=None,
          kinds=None, seed: int = 0, stats=None, progress: bool = True) -> dict:
    """Importance of every unit of every group: ``{group id: float64 array [num_units]}``.

    ``calibration``: [N, L] token ids (not needed for ``random``/``l1``/``l2``/``magnitude``).
    ``stats``: precomputed :class:`GradStats` (gradient methods), :func:`activation_stats` output
    (``activation``), :func:`fluctuation_stats` output (``fluctuation``) or :func:`gram_stats` output (``obs``),
    to skip the calibration pass.
    ``kinds`` restricts the groups scored.
    See the module docstring for the methods.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; use one of {AGGREGATES}")
    if normalize not in NORMALIZE:
        raise ValueError(f"unknown normalize {normalize!r}; use one of {NORMALIZE}")
    groups = graph.groups(kinds)

    if method == "random":
        rng = np.random.default_rng(seed)
        return {g.id: _normalize(rng.random(g.num_units), normalize) for g in groups}

    if method in GRADIENT_METHODS and stats is None:
        if calibration is None:
            raise ValueError(f"method {method!r} needs calibration token ids")
        stats = gradient_stats(model, graph, calibration, progress=progress,
                               per_sample=method in ("fisher", "taylor+fisher"))
    if method == "obs":
        if stats is None:
            if calibration is None:
                raise ValueError("method 'obs' needs calibration token ids")
            stats = gram_stats(model, graph, calibration, progress=progress)
        return {k: _normalize(v, normalize) for k, v in obs_scores(model, graph, stats, groups).items()}
    act_dims = {}
    if method in ("activation", "fluctuation"):
        if stats is None:
            if calibration is None:
                raise ValueError(f"method {method!r} needs calibration token ids")
            pass_ = activation_stats if method == "activation" else fluctuation_stats
            stats = pass_(model, graph, calibration, progress=progress)
        act_dims = {w: d for w, d in _input_dims(model, graph).values()}

    canon = canonical_names(graph)
    tensors = _tensors(model)
    cache = {}
    out = {}
    for g in groups:
        rows = []
        for m in g.members:
            name = canon.get(m.param, m.param)
            w = tensors.get(name)
            if w is None:
                continue
            if w.device.type == "meta":  # kept in accelerate's offload (a dispatched model)
                w = fetch(model, name)
            key = (name, m.dim)
            if key not in cache:
                kw = {}
                if method in GRADIENT_METHODS:
                    if name not in stats.grad:  # a buffer, or a tensor without a gradient
                        cache[key] = None
                        continue
                    kw = {"g": stats.grad[name], "fisher": stats.fisher.get(name)}
                elif method == "activation" and act_dims.get(name) == m.dim:
                    kw = {"act": stats.get(name), "act_dim": m.dim}
                elif method == "fluctuation":
                    if act_dims.get(name) != m.dim or name not in stats:  # not a consumer: FLAP ignores it
                        cache[key] = None
                        continue
                    kw = {"act": stats[name], "act_dim": m.dim}
                e = _element_scores(method, w, **kw)
                other = [d for d in range(e.dim()) if d != m.dim]
                cache[key] = (e.sum(other) if other else e).double().cpu().numpy()
            per_index = cache[key]
            if per_index is None:
                continue
            post = np.sqrt if method in ("l2", "magnitude") else np.abs if method == "taylor-vector" else None
            rows.append(_member_units(m, per_index, g, post))
        s = _aggregate(rows, aggregate) if rows else np.zeros(g.num_units)
        out[g.id] = _normalize(s.astype(np.float64), normalize)
    if method == "activation" and calibration is not None and any(g.kind == "experts" for g in groups):
        for gid, s in routed_mass(model, graph, calibration, progress=progress).items():
            if gid in out:
                out[gid] = _normalize(s, normalize)
    return out
