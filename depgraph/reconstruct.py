"""Structured reconstruction: re-fit the consumers of removed units, block by block, on sequential calibration.

``reconstruct(model, plan, calibration)`` walks the decoder blocks in order (the inputs of the first are captured
as :func:`depgraph.sparsify.sparsify` does; each later block gets the outputs of the already-pruned blocks before
it). In each block the *consumers* of the plan's units are found from the plan's members, which come from the
graph: the member along a linear layer's input dim (``o_proj`` for heads, ``down_proj`` for neurons, whatever the
architecture calls them). :func:`reconstruct_block` gathers each consumer's input statistics on the block's inputs
and re-fits its kept columns (:mod:`depgraph.refit`); then the block's planned units are masked (removal equals
masking) and the block is run again so that its pruned outputs feed the next block.

Modes (:class:`ReconstructConfig`):

* ``"lstsq"``: kept columns re-fitted by least squares, ``W_S <- W_S + W_P H_PS (H_SS + lambda I)^-1``;
  with ``intercept=True`` the bias joins the fit (an input that is always 1);
* ``"mean"``: only the bias moves, by the removed units' mean contribution (FLAP's compensation).

The model is changed in place: consumers' kept columns are rewritten and the planned units are zeroed; call
:func:`depgraph.shrink` with the same plan afterwards, then :func:`depgraph.compensate.apply_bias` with the
returned ``"bias"`` increments (biases are only created after the shrink, so the plan's shapes still hold).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import PlanError
from .plan import Plan
from .refit import augment, mean_fill, obs_select, refit_solve
from .routing import mask_experts
from .shrink import mask
from .sparsify import SparsifyError, batches_of, capture_layer_inputs, find_layers, run_layer
from .stats import Collector, InputStats, linear_view

__all__ = ["ReconstructConfig", "MODES", "block_stats", "consumers", "gram_dtype_for", "obs_reselector", "reconstruct", "reconstruct_block",
           "weight_out_in"]

MODES = ("lstsq", "mean")


@dataclass
class ReconstructConfig:
    """How consumers are re-fitted: ``mode`` (``"lstsq"`` or ``"mean"``), ``intercept`` (the bias joins the
    least-squares fit), ``damp`` (fraction of the mean Gram diagonal added to it), ``batch_size`` (calibration
    rows per forward), ``gram_dtype`` (of the accumulated ``X^T X``; None: :func:`gram_dtype_for` the block's
    weights, float32 for half precision, float64 otherwise); the solve runs in the same dtype, on gathered blocks."""

    mode: str = "lstsq"
    intercept: bool = False
    damp: float = 0.01
    batch_size: int = 8
    gram_dtype: torch.dtype | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise PlanError(f"reconstruction mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.damp >= 0:
            raise PlanError(f"reconstruction damp must be >= 0, got {self.damp}")


def _input_dim(mod) -> int | None:
    """The weight dim that holds a linear-like module's input features (nn.Linear: 1, GPT-2's Conv1D: 0)."""
    view = linear_view(mod)
    return None if view is None else view.in_dim


def consumers(model, plan: Plan, entries=None) -> dict:
    """``{module path: sorted removed input indices}``: every linear-like module whose weight is a plan member
    along its input-feature dim (the layer that reads the removed units). Removed routed experts have none: their
    tokens go to other experts, so no kept weight reads what they computed (neurons inside a kept expert are
    re-fitted on the tokens routed to it)."""
    out: dict = {}
    for e in plan.entries if entries is None else entries:
        if e.experts:
            continue
        for param, dims in e.removed.items():
            path, _, attr = param.rpartition(".")
            if attr != "weight":
                continue
            mod = model.get_submodule(path)
            d = _input_dim(mod)
            if d is not None and d in dims:
                out.setdefault(path, set()).update(int(i) for i in dims[d])
    return {p: sorted(s) for p, s in out.items()}


HALF_DTYPES = (torch.bfloat16, torch.float16)


def gram_dtype_for(weights: torch.dtype) -> torch.dtype:
    """The Gram dtype for weights stored in ``weights``: float32 for half precision (the weights and the hidden states
    they make carry 8-11 bits: a float32 sum of their products loses nothing they hold, at half the memory: 0.5 GB
    instead of 1 GB for a 7B ``down_proj``), float64 otherwise."""
    return torch.float32 if weights in HALF_DTYPES else torch.float64


def _weights_dtype(block: nn.Module) -> torch.dtype:
    return next((p.dtype for p in block.parameters() if p.is_floating_point()), torch.float32)


def weight_out_in(mod) -> torch.Tensor:
    """[out, in] view of a linear-like weight."""
    return linear_view(mod).weight()


@torch.no_grad()
def block_stats(block: nn.Module, inputs, paths, gram: bool = True, with_bias: bool = False, dtype=None):
    """``({path: InputStats}, {path: signal})`` of the modules ``paths`` inside ``block`` over the block's inputs:
    count, sum and, with ``gram``, ``X^T X`` (in ``dtype``, default :func:`gram_dtype_for` the block's weights; a module no
    token reached gets zeros), and ``||W x||^2`` of each module's outputs (``||W x + b||^2`` ``with_bias``)."""
    dtype = dtype or gram_dtype_for(_weights_dtype(block))
    mods = {p: block.get_submodule(p) for p in paths}
    signal = dict.fromkeys(mods, 0.0)
    handles = [m.register_forward_hook(_signal_hook(signal, p, with_bias)) for p, m in mods.items()]
    try:
        with Collector(mods, gram=gram, dtype=dtype) as col:
            for item in inputs:
                run_layer(block, item)
    finally:
        for h in handles:
            h.remove()
    stats = {p: col.stats.get(p) or InputStats.zeros(weight_out_in(m).shape[1], gram, dtype, weight_out_in(m).device)
             for p, m in mods.items()}
    return stats, signal


@torch.no_grad()
def reconstruct_block(block: nn.Module, inputs, block_consumers: dict, config: ReconstructConfig | None = None,
                      stats=None):
    """Re-fit the consumers of one decoder block in place, on the block's input hidden states.

    ``inputs``: ``[[hidden, args, kwargs], ...]`` as :func:`depgraph.sparsify.capture_layer_inputs` returns them
    (hidden [batch, seq, width]); ``block_consumers``: ``{module path inside block: removed input indices}``;
    ``stats``: their :func:`block_stats` when already gathered on these inputs (before any re-fit).
    Returns ``{"bias": {path: increment [out]}, "consumers": {path: {"removed", "error_before", "error_after",
    "signal"}}}``: errors are ``||W X - W' X||^2`` over the calibration tokens, ``signal`` is ``||W X||^2``.
    The block's outputs are not advanced and no unit is masked: the caller does both (see :func:`reconstruct`).
    """
    config = config or ReconstructConfig()
    mods = {p: block.get_submodule(p) for p in block_consumers}
    stats, signal = stats or block_stats(block, inputs, list(block_consumers), config.mode == "lstsq",
                                         config.intercept, config.gram_dtype)
    bias, info = {}, {}
    for path, removed in block_consumers.items():
        mod, st = mods[path], stats[path]
        W = weight_out_in(mod)
        if config.mode == "mean":
            bias[path] = mean_fill(W, st.sum / max(st.count, 1), removed).to(W.dtype)
            info[path] = {"removed": len(removed)}
            continue
        width, solve = W.shape[1], st.gram.dtype  # the solve runs in the Gram matrix's dtype
        gone = set(removed)
        kept = [j for j in range(width) if j not in gone]
        if config.intercept:
            b = mod.bias.data if mod.bias is not None else torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)
            Wa, H = torch.cat([W.to(solve), b.to(solve)[:, None]], 1), augment(st.gram, st.sum, st.count)
            update, undamped = kept + [width], (width,)
        else:
            Wa, H, update, undamped = W.to(solve), st.gram, kept, ()
        fit = refit_solve(Wa, H, removed, update, config.damp, undamped, solve)
        new = fit.new
        info[path] = {"removed": len(removed), "signal": signal[path],
                      "error_before": fit.error_before, "error_after": fit.error_after}
        W[:, kept] = new[:, :len(kept)].to(W.dtype)
        if config.intercept:
            bias[path] = (new[:, -1] - Wa[:, -1]).to(W.dtype)
    return {"bias": bias, "consumers": info}


def _signal_hook(signal: dict, path: str, with_bias: bool):
    """A forward hook adding ``||W x||^2`` (``||W x + b||^2`` when the bias is re-fitted too) of a consumer's output
    to ``signal[path]``: the scale of its errors, measured on the outputs (an [out, in] x [in, in] product less)."""
    def fn(mod, _args, y):
        b = getattr(mod, "bias", None)
        y = y if with_bias or b is None else y - b
        signal[path] += float(y.double().pow(2).sum())
    return fn


def obs_reselector(graph, damp: float = 1.0, step: int = 8, scores: dict | None = None, shortlist: float = 0.0):
    """A ``reselect`` for :func:`reconstruct`: the same number of units of a group, re-chosen on the block's
    sequential calibration inputs by greedy OBS (:func:`depgraph.refit.obs_select`, ``step`` units a round, the
    Gram matrix dampened by ``damp``) on the group's consumer. With ``scores`` (``{group id: [num_units]}``) and
    ``shortlist`` > 1, OBS chooses only among the ``shortlist`` times as many units of lowest score. Groups whose
    legal removals are constrained beyond a count (GQA heads, routed experts, blocks) keep the plan's units."""

    def reselect(entry, mod, path: str, gram: torch.Tensor):
        g = graph.group(entry.group)
        if g.gqa or g.routing or g.block or not entry.units:
            return entry
        member = next((m for m in g.members if m.param == f"{path}.weight" and m.dim == _input_dim(mod)), None)
        if member is None:
            return entry
        count, candidates = len(entry.units), None
        if scores is not None and shortlist > 1 and g.id in scores:
            order = sorted(range(g.num_units), key=lambda u: float(scores[g.id][u]))
            candidates = order[:min(g.num_units - 1, max(count, round(shortlist * count)))]
        units = obs_select(weight_out_in(mod), gram, member.unit_of_index, count, damp, step, candidates)
        return Plan.from_units(graph, {g.id: units}).entries[0]

    return reselect


def _block_entries(plan: Plan, prefix: str) -> list:
    return [e for e in plan.entries if e.removed and all(p.startswith(prefix) for p in e.removed)]


@torch.no_grad()
def reconstruct(model, plan: Plan, calibration, config: ReconstructConfig | None = None, progress: bool = False,
                reselect=None):
    """Re-fit every consumer of ``plan`` block by block on sequential calibration (see the module docstring).

    ``calibration``: token ids [n_samples, seq_len]. Entries that span several blocks (hidden channels) are masked
    before the first block and their readers are not re-fitted. ``reselect(entry, module, path, gram) -> entry``
    (e.g. :func:`obs_reselector`): called for each entry of a block with one consumer, on that consumer's Gram
    matrix over the block's sequential inputs, it may choose other units of the same group; the re-fit, the
    masking and the returned ``"plan"`` use its choice. Returns ``{"bias": {module path: increment},
    "layers": [{"layer", "consumers": {...}}], "plan", "mode", "intercept", "damp"}``; the model keeps its shapes.
    """
    config = config or ReconstructConfig()
    if calibration is None:
        raise PlanError("reconstruction needs calibration token ids [n_samples, seq_len]")
    try:
        layers_path, layers = find_layers(model)
    except SparsifyError as e:
        raise PlanError(f"reconstruction runs block by block: {e}") from None
    prefixes = [f"{layers_path}.{i}." for i in range(len(layers))]
    per_block = [_block_entries(plan, p) for p in prefixes]
    local = {id(e) for es in per_block for e in es}
    spanning = [e for e in plan.entries if id(e) not in local]
    if spanning:
        mask(model, Plan(spanning, plan.shapes))
    was_training = model.training
    model.eval()
    out = {"bias": {}, "layers": [], "mode": config.mode, "intercept": config.intercept, "damp": config.damp}
    replaced = {}  # id(plan entry) -> the entry reselect chose instead
    try:
        dev = next(layers[0].parameters()).device
        inputs = capture_layer_inputs(model, layers, batches_of(calibration, config.batch_size), dev)
        for i, (block, entries) in enumerate(zip(layers, per_block)):
            if not entries:
                if i + 1 < len(layers):
                    for item in inputs:
                        item[0] = run_layer(block, item)
                continue
            cons = {p[len(prefixes[i]):]: idx for p, idx in consumers(model, plan, entries).items()}
            stats = None
            if reselect is not None:
                stats = block_stats(block, inputs, list(cons), gram=True, with_bias=config.intercept,
                                    dtype=config.gram_dtype)
                chosen = [_reselect(reselect, model, plan, e, prefixes[i], block, stats) for e in entries]
                replaced.update({id(e): c for e, c in zip(entries, chosen)})
                entries = chosen
                cons = {p[len(prefixes[i]):]: idx for p, idx in consumers(model, plan, entries).items()}
            res = reconstruct_block(block, inputs, cons, config, stats)
            # removed routed experts leave routing only while the pruned outputs are computed: a router mask left
            # behind would outlive the shrink (its indices point past the shrunk router); their weights need no zeroing
            mask(model, Plan([e for e in entries if not e.experts], plan.shapes))
            take_back = [mask_experts(model, e.experts["router_module"], e.experts["router"][0], e.units)
                         for e in entries if e.experts]
            handles = [block.get_submodule(p).register_forward_hook(lambda m, a, y, d=d: y + d.to(y.dtype))
                       for p, d in res["bias"].items()]
            try:
                if i + 1 < len(layers):
                    for item in inputs:  # the pruned block's outputs feed the next block
                        item[0] = run_layer(block, item)
            finally:
                for h in handles:
                    h.remove()
                for undo in reversed(take_back):
                    undo()
            out["bias"].update({prefixes[i] + p: d for p, d in res["bias"].items()})
            out["layers"].append({"layer": i, "consumers": {prefixes[i] + p: v for p, v in res["consumers"].items()}})
            if progress:
                print(f"reconstruct: block {i + 1}/{len(layers)}", flush=True)
    finally:
        model.train(was_training)
    out["plan"] = Plan([replaced.get(id(e), e) for e in plan.entries], plan.shapes)
    return out


def _reselect(reselect, model, plan: Plan, entry, prefix: str, block, stats: dict):
    """``reselect``'s choice for one entry with exactly one consumer in the block (else the entry itself)."""
    cons = consumers(model, plan, [entry])
    if len(cons) != 1:
        return entry
    path = next(iter(cons))[len(prefix):]
    return reselect(entry, block.get_submodule(path), prefix + path, stats[0][path].gram)
