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
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .dispatch import fetch
from .stats import Collector, canonical_names, check_token_ids, collect, consumers

AGGREGATES = ("sum", "mean", "max", "prod")
NORMALIZE = (None, "mean", "max")


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
    batches = check_token_ids(batches)
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


def moment_sites(model, graph) -> dict:
    """``{weight name: [module paths]}``: the consumers (:func:`depgraph.stats.consumers`) keyed by their
    canonical weight name, so a weight used by several layers (tied) accumulates over all of them."""
    by_weight: dict = {}
    for path, (wname, _) in consumers(model, graph).items():
        by_weight.setdefault(wname, []).append(path)
    return by_weight


@contextmanager
def moment_hooks(model, graph):
    """Forward hooks (one :class:`depgraph.stats.Collector`) that accumulate ``{weight name: InputStats}``
    (float64 count, sum [in], sum of squares [in]) of the inputs of every consumer while the caller runs the
    model (or one block of it: streamed pruning runs one decoder block at a time). Yields the dict; the hooks
    are removed on exit."""
    modules = [(w, model.get_submodule(p)) for w, paths in moment_sites(model, graph).items() for p in paths]
    with Collector(modules) as col:
        yield col.stats


def input_stats(model, graph, batches, progress: bool = True, batch_size: int = 8) -> dict:
    """Gradient-free pass over the calibration rows, ``batch_size`` rows per forward (8: 15% less time than one
    at a time on SmolLM2, the same sums up to their order): ``{weight name: InputStats}`` (float64 count, sum [in],
    sum of squares [in]) of each input feature over every calibration token, for every linear layer whose weight
    is a group member along its input-feature dim (:func:`moment_sites`)."""
    return collect(model, moment_sites(model, graph), check_token_ids(batches), batch_size=batch_size,
                   progress=progress)


def input_moments(model, graph, batches, progress: bool = True) -> dict:
    """:func:`input_stats` as ``{weight name: (n, sum [in], sum of squares [in])}``."""
    return {w: (s.count, s.sum, s.sumsq) for w, s in input_stats(model, graph, batches, progress).items()}


def gram_stats(model, graph, batches, progress: bool = True) -> dict:
    """``{weight name: X^T X [in, in] float64}`` over every calibration token, for every linear layer whose
    weight is a group member along its input-feature dim (the consumers; :func:`depgraph.stats.consumers`)."""
    stats = collect(model, moment_sites(model, graph), check_token_ids(batches), gram=True, batch_size=8,
                    progress=progress, desc="gram")
    return {w: s.gram for w, s in stats.items()}


def obs_scores(model, graph, grams: dict, groups, damp: float = 0.01) -> dict:
    """``{group id: OBS cost per unit}`` from the consumers' Gram matrices (see ``obs`` in the module docstring)."""
    from .refit import obs_costs

    canon = canonical_names(graph)
    tensors = _tensors(model)
    act_dims = {w: v.in_dim for w, v in consumers(model, graph).values()}
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


def squared_norms(stats: dict) -> dict:
    """``{weight name: [in_features] float32}`` from ``{weight name: InputStats}``: each input feature's squared
    L2 norm over the tokens."""
    return {w: s.sumsq.float() for w, s in stats.items()}


def variances(stats: dict) -> dict:
    """``{weight name: [in_features] float32}`` from ``{weight name: InputStats}``: each input feature's
    (population) variance over the tokens."""
    return {w: s.var.float() for w, s in stats.items()}


STATS_FROM_MOMENTS = {"activation": squared_norms, "fluctuation": variances}


def activation_stats(model, graph, batches, progress: bool = True) -> dict:
    """``{weight name: [in_features] float32}``: the squared L2 norm of each input feature over every
    calibration token (see :func:`input_stats`)."""
    return squared_norms(input_stats(model, graph, batches, progress))


def fluctuation_stats(model, graph, batches, progress: bool = True) -> dict:
    """``{weight name: [in_features] float32}``: the (population) variance of each input feature over every
    calibration token (see :func:`input_stats`)."""
    return variances(input_stats(model, graph, batches, progress))


@torch.no_grad()
def routed_mass(model, graph, batches, progress: bool = True) -> dict:
    """``{experts group id: float64 [num_experts]}``: sum over calibration tokens of the router's softmax
    probability of each expert, counted only where the expert is among the token's top-k logits."""
    from .routing import RouterLogits

    batches = check_token_ids(batches)
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
# -- the scoring methods: one registered element-score function per method ------------------------------------------
@dataclass(frozen=True)
class Scorer:
    """A scoring method: ``element(w, **stats)`` gives one score per weight element (float32, the shape of ``w``).

    ``needs``: the calibration pass it reads, one of :data:`NEEDS` (None: weights only). Gradient methods get
    ``g`` (and ``fisher`` with ``needs="fisher"``); input-statistics methods get ``act`` (per input feature) and
    ``act_dim`` for the members along a linear layer's input dim (:func:`depgraph.stats.consumers`); other members
    are skipped when ``consumers_only``, else scored with ``act=None``. ``post`` maps each unit's summed score
    (sqrt for L2 norms, abs for signed sums). ``units(model, graph, groups, stats, seed) -> {group id: [num_units]}``
    instead of ``element``: a method that scores whole units itself (``random``; ``obs`` from the Gram matrices).
    """

    name: str
    element: Callable | None = None
    needs: str | None = None
    post: Callable | None = None
    consumers_only: bool = False
    units: Callable | None = None


NEEDS = (None, "gradients", "fisher", "input_norms", "input_variance", "gram")
SCORERS: dict = {}


def scorer(*names: str, needs: str | None = None, post=None, consumers_only: bool = False, units=None):
    """Register the decorated element-score function under ``names`` (see :class:`Scorer`)."""
    if needs not in NEEDS:
        raise ValueError(f"unknown needs {needs!r}; use one of {NEEDS}")

    def register(fn):
        for n in names:
            SCORERS[n] = Scorer(n, fn, needs, post, consumers_only, units)
        return fn
    return register


def methods() -> tuple:
    """Every registered scoring method's name, in registration order."""
    return tuple(SCORERS)


def needs_calibration(method: str) -> bool:
    """Does ``method`` read calibration data?"""
    return SCORERS[method].needs is not None


def _random_units(model, graph, groups, stats, seed):
    rng = np.random.default_rng(seed)
    return {g.id: rng.random(g.num_units) for g in groups}


def _obs_units(model, graph, groups, stats, seed):
    return obs_scores(model, graph, stats, groups)


SCORERS["random"] = Scorer("random", units=_random_units)  # seeded uniform scores, no weights read


@scorer("l1")
def _l1(w, **_):
    return w.abs()


@scorer("l2", "magnitude", post=np.sqrt)
def _l2(w, **_):
    return w * w


@scorer("taylor", needs="gradients")
def _taylor(w, g, **_):
    return (w * g.float()).abs()


@scorer("fisher", needs="fisher")
def _fisher(w, fisher, **_):
    return 0.5 * w * w * fisher.float()


@scorer("taylor+fisher", needs="fisher")
def _taylor_fisher(w, g, fisher, **_):
    return (w * g.float() - 0.5 * w * w * fisher.float()).abs()


@scorer("taylor-vector", needs="gradients", post=np.abs)
def _taylor_vector(w, g, **_):
    return w * g.float()  # signed: the absolute value is taken per unit


def _per_feature(w, act, act_dim):
    shape = [1] * w.dim()
    shape[act_dim] = -1
    return act.float().to(w.device).reshape(shape)  # ||x_j||^2 or Var(x_j), along act_dim


@scorer("activation", needs="input_norms")
def _activation(w, act=None, act_dim=None, **_):
    if act is None:  # a member that does not read the features falls back to |w|
        return w.abs()
    return w.abs() * _per_feature(w, act, act_dim).sqrt()


@scorer("fluctuation", needs="input_variance", consumers_only=True)
def _fluctuation(w, act, act_dim, **_):
    return w * w * _per_feature(w, act, act_dim)


SCORERS["obs"] = Scorer("obs", needs="gram", units=_obs_units)  # OBS cost with the consumer re-fitted

METHODS = methods()  # the built-in methods (the registry may grow: use methods() for the current list)
NEEDS_CALIBRATION = tuple(m for m in METHODS if needs_calibration(m))
GRADIENT_METHODS = tuple(m for m in METHODS if SCORERS[m].needs in ("gradients", "fisher"))  # a backward pass


# the calibration pass behind each kind of need: (model, graph, calibration, progress=) -> stats
PASSES = {
    "gradients": lambda model, graph, calib, progress=True: gradient_stats(model, graph, calib, progress=progress,
                                                                            per_sample=False),
    "fisher": lambda model, graph, calib, progress=True: gradient_stats(model, graph, calib, progress=progress),
    "input_norms": activation_stats,
    "input_variance": fluctuation_stats,
    "gram": gram_stats,
}


def _element_scores(method, w, **kw):
    """Element-wise score tensor (float32) of ``method`` (signed for ``taylor-vector``)."""
    return SCORERS[method].element(w.detach().float(), **kw)


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
    if method not in SCORERS:
        raise ValueError(f"unknown method {method!r}; use one of {methods()}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; use one of {AGGREGATES}")
    if normalize not in NORMALIZE:
        raise ValueError(f"unknown normalize {normalize!r}; use one of {NORMALIZE}")
    spec = SCORERS[method]
    groups = graph.groups(kinds)

    if spec.needs is not None and stats is None:
        if calibration is None:
            raise ValueError(f"method {method!r} needs calibration token ids")
        stats = PASSES[spec.needs](model, graph, calibration, progress=progress)
    if spec.units is not None:
        return {k: _normalize(v, normalize) for k, v in spec.units(model, graph, groups, stats, seed).items()}

    grads = spec.needs in ("gradients", "fisher")
    inputs = spec.needs in ("input_norms", "input_variance")
    act_dims = {w: v.in_dim for w, v in consumers(model, graph).values()} if inputs else {}

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
                if grads:
                    if name not in stats.grad:  # a buffer, or a tensor without a gradient
                        cache[key] = None
                        continue
                    kw = {"g": stats.grad[name], "fisher": stats.fisher.get(name)}
                elif inputs:
                    if act_dims.get(name) == m.dim and (name in stats or not spec.consumers_only):
                        kw = {"act": stats.get(name), "act_dim": m.dim}
                    elif spec.consumers_only:  # not a consumer: FLAP ignores it
                        cache[key] = None
                        continue
                e = _element_scores(method, w, **kw)
                other = [d for d in range(e.dim()) if d != m.dim]
                cache[key] = (e.sum(other) if other else e).double().cpu().numpy()
            per_index = cache[key]
            if per_index is None:
                continue
            rows.append(_member_units(m, per_index, g, spec.post))
        s = _aggregate(rows, aggregate) if rows else np.zeros(g.num_units)
        out[g.id] = _normalize(s.astype(np.float64), normalize)
    if method == "activation" and calibration is not None and any(g.kind == "experts" for g in groups):
        for gid, s in routed_mass(model, graph, calibration, progress=progress).items():
            if gid in out:
                out[gid] = _normalize(s, normalize)
    return out
