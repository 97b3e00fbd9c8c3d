"""Unstructured and N:M sparsity (magnitude, Wanda, SparseGPT), layer by layer, on dense or shrunk models.

``sparsify(model, method, sparsity=0.5 | nm=(2, 4), calibration=ids)`` zeroes weights of every linear layer inside
the decoder layers (never the embeddings or ``lm_head``) and returns ``(model, report)``; the model is changed in
place and keeps its shapes, so a model that :func:`depgraph.shrink` already slimmed stays loadable with
:func:`depgraph.load_pruned` after :func:`depgraph.save_pruned`.

Methods

* ``magnitude``: drop the smallest ``|w|``, compared over the whole weight matrix (``per_row=True``: within each
  output row). Needs no calibration.
* ``wanda`` (Sun et al. 2023): score ``|w_ij| * ||x_j||_2`` where ``||x_j||`` is the L2 norm of input feature ``j``
  over the calibration tokens; compared within each output row.
* ``sparsegpt`` (Frantar & Alistarh 2023): with the layer-input Hessian ``H = 2 X^T X / n`` dampened by
  ``damp * mean(diag H)``, take the upper Cholesky factor of ``H^-1``, walk the columns in blocks of ``blocksize``:
  pick the mask of a block by ``w^2 / [H^-1]_jj^2`` (for N:M: per group of M columns, when the group is reached),
  zero the masked weights one column at a time and spread each column's error over the remaining columns of the
  block (optimal brain surgeon update), then apply the block's accumulated error to all later columns at once
  (lazy batching).

Patterns: ``sparsity=s`` prunes ``round(s * count)`` weights of each comparison set (matrix, row or SparseGPT block);
``nm=(N, M)`` keeps exactly N non-zeros in every group of M consecutive input columns of every row (2:4, 4:8).

Calibration runs layer by layer, like the reference implementations: the inputs of the first decoder layer are
captured (hidden states plus the positional arguments and keyword arguments the model passes: rotary position
embeddings, attention mask, ...) by a forward pre-hook that stops the model, then each layer is run on them once to
gather input statistics with forward hooks, sparsified, and run again so that its *sparsified* outputs feed the next
layer. Memory stays at one copy of the calibration activations, the statistics of one layer and the weights.

2:4 on GPUs: :func:`to_semi_structured` swaps 2:4-sparse fp16/bf16 CUDA weights for
``torch.sparse.to_sparse_semi_structured`` tensors, which run on the sparse tensor cores (Ampere or newer). This is
a runtime conversion for inference: save the model before converting it.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import DepgraphError
from .stats import Collector, is_linear, linear_view

__all__ = ["sparsify", "SparsifyError", "METHODS", "parse_nm", "find_layers", "layer_linears", "wanda_mask",
           "magnitude_mask", "sparsegpt_prune", "nm_mask", "to_semi_structured", "check_nm", "check_sparsity",
           "batches_of", "capture_layer_inputs", "run_layer"]



class SparsifyError(DepgraphError, ValueError):
    """Bad arguments to :func:`sparsify` (raised before anything is modified)."""


class _Stop(Exception):
    """Raised by the first layer's pre-hook once its inputs are captured."""


# ----------------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------------


def parse_nm(value) -> tuple[int, int]:
    """``"2:4"`` or ``(2, 4)`` -> ``(2, 4)``: N non-zeros kept in every group of M, with 0 < N < M."""
    if isinstance(value, str):
        parts = value.replace("/", ":").split(":")
        try:
            n, m = (int(p) for p in parts)
        except ValueError:
            raise SparsifyError(f"N:M pattern must look like 2:4, got {value!r}") from None
    else:
        try:
            n, m = (int(v) for v in value)
        except (TypeError, ValueError):
            raise SparsifyError(f"N:M pattern must be two integers such as (2, 4), got {value!r}") from None
    if not 0 < n < m:
        raise SparsifyError(f"N:M pattern {n}:{m}: need 0 < N < M (N non-zeros kept in every group of M), "
                            f"e.g. 2:4 or 4:8")
    return n, m


def check_sparsity(s) -> float:
    try:
        s = float(s)
    except (TypeError, ValueError):
        raise SparsifyError(f"sparsity must be a number in [0, 1), got {s!r}") from None
    if not 0 <= s < 1 or math.isnan(s):
        raise SparsifyError(f"sparsity must be in [0, 1) (the fraction of weights set to zero), got {s}")
    return s


# ----------------------------------------------------------------------------------------------------------------------
# Finding the decoder layers and their linear modules
# ----------------------------------------------------------------------------------------------------------------------


def find_layers(model) -> tuple[str, nn.ModuleList]:
    """``(path, ModuleList)`` of the decoder layers: the ModuleList with the most blocks of one class that hold
    linear modules (``model.layers`` for LLaMA-likes, ``transformer.h`` for GPT-2, ``model.decoder.layers`` ...)."""
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if not any(is_linear(x) for x in mod[0].modules()):
            continue
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    if best is None:
        raise SparsifyError(f"{type(model).__name__}: no decoder layers found (a ModuleList of repeated blocks "
                            f"holding linear layers)")
    return best


def layer_linears(layer, skip=()) -> list[tuple[str, nn.Module]]:
    """The linear modules of one decoder layer, minus those whose name contains a string of ``skip``."""
    return [(n, m) for n, m in layer.named_modules()
            if is_linear(m) and not any(s in n for s in skip) and _weight(m).numel() > 0]


def _weight(mod) -> torch.Tensor:
    """The weight as [out, in] (a view; transposed for Conv1D)."""
    return linear_view(mod).weight()


# ----------------------------------------------------------------------------------------------------------------------
# Masks (True = prune)
# ----------------------------------------------------------------------------------------------------------------------


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``m - n`` lowest scores in every group of ``m`` consecutive columns of every row."""
    rows, cols = score.shape
    if cols % m:
        raise SparsifyError(f"{cols} input columns are not a multiple of M={m}")
    groups = score.reshape(rows, cols // m, m)
    idx = torch.topk(groups, m - n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def _lowest(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    if per_row:
        k = int(round(score.shape[1] * sparsity))
        mask = torch.zeros_like(score, dtype=torch.bool)
        if k:
            mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
        return mask
    k = int(round(score.numel() * sparsity))
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        mask[torch.topk(score.flatten(), k, largest=False).indices] = True
    return mask.reshape(score.shape)


def magnitude_mask(w: torch.Tensor, sparsity: float | None = None, nm=None, per_row: bool = False) -> torch.Tensor:
    """Mask (True = prune) of the smallest ``|w|``: over the matrix, each row (``per_row``) or each N:M group."""
    score = w.detach().float().abs()
    return nm_mask(score, *nm) if nm else _lowest(score, sparsity, per_row)


def wanda_mask(w: torch.Tensor, input_norm: torch.Tensor, sparsity: float | None = None, nm=None) -> torch.Tensor:
    """Wanda's mask: score ``|w_ij| * ||x_j||``; the lowest ``sparsity`` of each output row (or of each N:M group)."""
    score = w.detach().float().abs() * input_norm.float().reshape(1, -1)
    return nm_mask(score, *nm) if nm else _lowest(score, sparsity, per_row=True)


def sparsegpt_prune(w: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = None, nm=None,
                    blocksize: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, dict]:
    """SparseGPT on one weight ``w`` [out, in] with input Hessian ``hessian`` [in, in] (``2 X^T X / n``).

    Returns the sparsified, reconstructed weight (float32) and ``{"loss": sum of OBS errors, "damp": damping used}``.
    """
    W = w.detach().float().clone()
    H = hessian.float().clone()
    rows, cols = W.shape
    if nm and blocksize % nm[1]:
        raise SparsifyError(f"blocksize {blocksize} is not a multiple of M={nm[1]}")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    mean_diag = torch.mean(torch.diag(H)).item()
    diag = torch.arange(cols, device=H.device)
    used = damp
    for attempt in range(6):  # more damping when H is numerically singular (few tokens, low precision)
        Hd = H.clone()
        Hd[diag, diag] += used * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
            if torch.isfinite(Hinv).all():
                break
        used *= 10
    else:
        raise SparsifyError("SparseGPT: the input Hessian is not positive definite even with heavy damping")
    del H, Hd, L
    losses = torch.zeros(rows, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        if nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            mask1 = _lowest(W1 ** 2 / d1.reshape(1, -1) ** 2, sparsity, per_row=False)
        for i in range(count):
            w_col = W1[:, i]
            d = Hinv1[i, i]
            if nm and i % nm[1] == 0:
                m = nm[1]
                score = W1[:, i:i + m] ** 2 / d1[i:i + m].reshape(1, -1) ** 2
                mask1[:, i:i + m] = nm_mask(score, *nm)
            q = w_col.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w_col - q) / d
            losses += (w_col - q) ** 2 / d ** 2 / 2
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, {"loss": float(losses.sum()), "damp": used}


# ----------------------------------------------------------------------------------------------------------------------
# Layer-by-layer driver
# ----------------------------------------------------------------------------------------------------------------------


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def batches_of(calibration, batch_size: int) -> list[torch.Tensor]:
    """Token-id batches of at most ``batch_size`` rows from a [n, L] tensor (or a list of them), checked."""
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    out = []
    for t in calibration:
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32) or t.numel() == 0:
            raise SparsifyError("calibration must be token ids: a LongTensor [n_samples, seq_len] "
                                "(depgraph.calibration.load_calibration) or a list of them")
        t = t.reshape(1, -1) if t.dim() == 1 else t
        if t.dim() != 2:
            raise SparsifyError(f"calibration ids must be [n_samples, seq_len], got shape {list(t.shape)}")
        out += list(t.long().split(batch_size))
    return out


def capture_layer_inputs(model, layers, batches, device) -> list:
    """Run the model up to the first decoder layer on every batch; return [(hidden, args, kwargs)]."""
    captured = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        captured.append([_to(hidden.detach(), device), _to(rest, device), _to(kwargs, device)])
        raise _Stop

    model_device = next(model.parameters()).device
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids.to(model_device), use_cache=False)
                except _Stop:
                    pass
                else:
                    raise SparsifyError("the first decoder layer was never called by the model's forward")
    finally:
        handle.remove()
    return captured


def run_layer(layer, item):
    """One decoder layer on one captured ``[hidden, args, kwargs]`` item; its hidden-state output."""
    hidden, rest, kwargs = item
    out = layer(hidden, *rest, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


# ----------------------------------------------------------------------------------------------------------------------
# The methods: one registered function per method, with the input statistics it reads declared beside it
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What a sparsity method is asked for: ``sparsity`` (fraction zeroed) or ``nm`` (N, M); the rest are its knobs."""

    sparsity: float | None
    nm: tuple | None
    per_row: bool = False
    blocksize: int = 128
    damp: float = 0.01


@dataclass(frozen=True)
class Sparsifier:
    """``prune(w [out, in], stats, opts) -> (new weight float32 [out, in], extra report fields)``. ``stats``: None
    (weights only), ``"norms"`` (:class:`depgraph.stats.InputStats` without Gram) or ``"gram"`` (with ``X^T X``)."""

    name: str
    prune: Callable
    stats: str | None = None


SPARSIFIERS: dict = {}


def sparsifier(name: str, stats: str | None = None):
    """Register the decorated ``prune(w, stats, opts)`` as sparsity method ``name`` (see :class:`Sparsifier`)."""
    if stats not in (None, "norms", "gram"):
        raise ValueError(f"unknown stats {stats!r}; use None, 'norms' or 'gram'")

    def register(fn):
        SPARSIFIERS[name] = Sparsifier(name, fn, stats)
        return fn
    return register


@sparsifier("magnitude")
def _magnitude(w, stats, opts):
    return w.float().masked_fill(magnitude_mask(w, opts.sparsity, opts.nm, opts.per_row), 0), {}


@sparsifier("wanda", stats="norms")
def _wanda(w, stats, opts):
    return w.float().masked_fill(wanda_mask(w, stats.norm, opts.sparsity, opts.nm), 0), {}


@sparsifier("sparsegpt", stats="gram")
def _sparsegpt(w, stats, opts):
    return sparsegpt_prune(w, stats.hessian(), opts.sparsity, opts.nm, opts.blocksize, opts.damp)


METHODS = tuple(SPARSIFIERS)  # the built-in methods (the registry may grow: SPARSIFIERS holds the current ones)


def sparsify(model, method: str = "wanda", sparsity: float | None = None, nm=None, calibration=None, *,
             per_row: bool = False, blocksize: int = 128, damp: float = 0.01, batch_size: int = 8,
             skip=(), device=None, progress: bool = False):
    """Sparsify the linear layers of ``model``'s decoder layers in place; returns ``(model, report)``.

    ``method``: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``. Give ``sparsity`` (fraction of weights zeroed,
    default 0.5) or ``nm`` (``(2, 4)`` or ``"2:4"``: N non-zeros kept per M consecutive inputs), not both.
    ``calibration``: token ids ``[n_samples, seq_len]`` (needed by wanda and sparsegpt), run ``batch_size`` rows at a
    time. ``per_row``: magnitude compares within each output row instead of the whole matrix. ``blocksize`` and
    ``damp``: SparseGPT's column block and dampening (fraction of the mean Hessian diagonal). ``skip``: leave dense
    the linears whose name inside the layer contains one of these strings (e.g. ``("self_attn",)``). ``device``:
    process each layer there (e.g. ``"cuda"`` for a CPU-resident model), moving it back afterwards.

    The report holds the achieved sparsity of every linear and every layer, the overall sparsity of the sparsified
    linears, and the fraction of zero parameters in the whole model. Every check happens before any weight changes;
    bad arguments raise :class:`SparsifyError`.
    """
    # ---- checks, before anything is modified
    if method not in SPARSIFIERS:
        raise SparsifyError(f"unknown sparsify method {method!r}; choose from {', '.join(SPARSIFIERS)}")
    spec = SPARSIFIERS[method]
    if sparsity is not None and nm is not None:
        raise SparsifyError("give either sparsity= (unstructured) or nm= (N:M pattern), not both")
    if nm is not None:
        nm = parse_nm(nm)
        sparsity = None
    else:
        sparsity = check_sparsity(0.5 if sparsity is None else sparsity)
    if isinstance(skip, str):
        skip = (skip,)
    if blocksize < 1 or (nm and blocksize % nm[1]):
        raise SparsifyError(f"blocksize must be a positive multiple of M, got {blocksize}")
    if not damp > 0:
        raise SparsifyError(f"damp must be > 0, got {damp}")
    if batch_size < 1:
        raise SparsifyError(f"batch_size must be >= 1, got {batch_size}")
    layers_path, layers = find_layers(model)
    targets = [layer_linears(layer, skip) for layer in layers]
    if not any(targets):
        raise SparsifyError(f"no linear layers to sparsify under {layers_path} (skip={list(skip)})")
    if nm:
        bad = [f"{layers_path}.{i}.{n} ({_weight(m).shape[1]} inputs)" for i, t in enumerate(targets)
               for n, m in t if _weight(m).shape[1] % nm[1]]
        if bad:
            raise SparsifyError(f"{nm[0]}:{nm[1]} needs input widths that are multiples of {nm[1]}; not: "
                                f"{', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''} (shrink with round_to a "
                                f"multiple of {nm[1]}, or skip= those modules)")
    batches = None
    if spec.stats is not None:
        if calibration is None:
            raise SparsifyError(f"{method} needs calibration token ids [n_samples, seq_len] "
                                f"(depgraph.calibration.load_calibration)")
        batches = batches_of(calibration, batch_size)

    # ---- work
    opts = Options(sparsity, nm, per_row, blocksize, damp)
    t0 = time.perf_counter()
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
    was_training = model.training
    model.eval()
    report_layers = []
    try:
        with torch.no_grad():
            inputs = None
            if batches is not None:
                dev = torch.device(device) if device is not None else next(layers[0].parameters()).device
                inputs = capture_layer_inputs(model, layers, batches, dev)
            for i, (layer, linears) in enumerate(zip(layers, targets)):
                home = next(layer.parameters()).device
                if device is not None:
                    layer.to(device)
                stats = {}
                if inputs is not None and linears:  # Wanda: float32 norms; SparseGPT: float64 X^T X
                    gram = spec.stats == "gram"
                    with Collector(linears, gram=gram, dtype=torch.float64 if gram else torch.float32) as col:
                        for item in inputs:
                            run_layer(layer, item)
                    stats = col.stats
                modules = {}
                for n, m in linears:
                    w = _weight(m)
                    new, info = spec.prune(w, stats.get(n), opts)
                    linear_view(m).set_weight(new)
                    zeros = int((_weight(m) == 0).sum())
                    modules[n] = {"sparsity": round(zeros / w.numel(), 6), "zeros": zeros, "numel": w.numel(),
                                  **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in info.items()}}
                    stats.pop(n, None)
                if inputs is not None and i + 1 < len(layers):
                    for item in inputs:  # sparsified outputs feed the next layer
                        item[0] = run_layer(layer, item)
                if device is not None:
                    layer.to(home)
                zeros = sum(v["zeros"] for v in modules.values())
                numel = sum(v["numel"] for v in modules.values())
                report_layers.append({"layer": i, "sparsity": round(zeros / numel, 6) if numel else 0.0,
                                      "zeros": zeros, "numel": numel, "modules": modules})
                log(f"sparsify {method}: layer {i + 1}/{len(layers)} sparsity "
                    f"{report_layers[-1]['sparsity']:.4f}")
    finally:
        model.train(was_training)
    zeros = sum(r["zeros"] for r in report_layers)
    numel = sum(r["numel"] for r in report_layers)
    params = list({id(p): p for p in model.parameters()}.values())
    total = sum(p.numel() for p in params)
    report = {
        "method": method,
        "pattern": f"{nm[0]}:{nm[1]}" if nm else "unstructured",
        "requested": (nm[1] - nm[0]) / nm[1] if nm else sparsity,
        "nm": list(nm) if nm else None,
        "per_row": per_row if method == "magnitude" and not nm else None,
        "layers_path": layers_path,
        "sparsity": round(zeros / numel, 6) if numel else 0.0,
        "zeros": zeros,
        "numel": numel,
        "model_zero_fraction": round(sum(int((p == 0).sum()) for p in params) / total, 6) if total else 0.0,
        "calibration": None if batches is None else {"samples": sum(b.shape[0] for b in batches),
                                                      "tokens": sum(b.numel() for b in batches)},
        "blocksize": blocksize if method == "sparsegpt" else None,
        "damp": damp if method == "sparsegpt" else None,
        "seconds": round(time.perf_counter() - t0, 3),
        "layers": report_layers,
    }
    return model, report


def check_nm(w: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive inputs of every row of ``w`` [out, in] has at most ``n`` non-zeros."""
    if w.shape[-1] % m:
        return False
    return bool(((w.reshape(w.shape[0], -1, m) != 0).sum(-1) <= n).all())


def to_semi_structured(model, skip=()) -> dict:
    """Swap 2:4-sparse linear weights of the decoder layers for ``torch.sparse.to_sparse_semi_structured`` tensors.

    Needs CUDA (sparse tensor cores: Ampere or newer) and fp16/bf16 weights on the GPU, in shapes the kernels accept:
    [out, in] multiples of (32, 64) for the CUTLASS backend, (16, 16) for cuSPARSELt (torch picks cuSPARSELt when it
    is built in; ``torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS = True`` forces CUTLASS). Modules that
    are not 2:4 or that the kernels refuse are left dense and listed under ``"skipped"`` with the reason. Inference
    only (no ``save_pruned`` afterwards: save before converting). Returns ``{"converted": [names], "skipped":
    {name: reason}}``.
    """
    if not torch.cuda.is_available():
        raise SparsifyError("to_semi_structured needs a CUDA GPU (2:4 sparse tensor cores)")
    from torch.sparse import to_sparse_semi_structured

    path, layers = find_layers(model)
    done, skipped = [], {}
    for i, layer in enumerate(layers):
        for n, m in layer_linears(layer, skip):
            name = f"{path}.{i}.{n}"
            w = m.weight.data
            if not isinstance(m, nn.Linear):
                skipped[name] = "not an nn.Linear"
            elif w.device.type != "cuda" or w.dtype not in (torch.float16, torch.bfloat16):
                skipped[name] = f"weight is {w.dtype} on {w.device}; needs float16/bfloat16 on CUDA"
            elif not check_nm(w, 2, 4):
                skipped[name] = "not 2:4 sparse"
            else:
                try:
                    m.weight = nn.Parameter(to_sparse_semi_structured(w.contiguous()), requires_grad=False)
                    done.append(name)
                except (RuntimeError, ValueError) as e:
                    skipped[name] = " ".join(str(e).split())[:200]
    return {"converted": done, "skipped": skipped}
