"""Linear-like layers and the one collector of their calibration input statistics.

Which modules are linear, and which weight dim reads their input features, is answered here and nowhere else:

* ``nn.Linear``: ``y = x W^T + b``, weight ``[out, in]``, input features along weight dim 1;
* transformers' ``Conv1D`` (GPT-2): ``y = x W + b``, weight ``[in, out]``, input features along weight dim 0.

:func:`linear_layers` lists them as :class:`LinearView` (path, in/out sizes, input dim, an ``[out, in]`` view of the
weight); :func:`consumers` keeps those the dependency graph says consume a pruned space (the weight is a group
member along its input dim: ``down_proj`` for MLP neurons, ``o_proj`` for heads).

:class:`Collector` hooks a set of linear modules and accumulates, per key, the count, sum, sum of squares and
optionally the Gram matrix ``X^T X`` of their inputs (:class:`InputStats`), streaming: only the running sums are
kept, so memory is ``O(in)`` per key (``O(in^2)`` with ``gram=True``) whatever the number of tokens.
:func:`collect` runs a model over calibration token ids with a collector. Used by importance (activation and
fluctuation scores), compensation (input means), sparsify (Wanda norms, SparseGPT Hessian) and reconstruction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["LinearView", "InputStats", "Collector", "is_linear", "linear_view", "linear_layers", "consumers", "canonical_names",
           "collect", "check_token_ids"]


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # noqa: BLE001 - transformers is optional here
        return None
    return Conv1D


_CONV1D = _conv1d_class()


def is_linear(mod: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D`` (the layers whose input statistics we collect)."""
    return isinstance(mod, nn.Linear) or (_CONV1D is not None and isinstance(mod, _CONV1D))


@dataclass(frozen=True)
class LinearView:
    """One linear-like layer: ``path`` in the model, ``in_dim`` the weight dim along its input features (1 for
    ``nn.Linear``, 0 for ``Conv1D``), ``in_features``/``out_features`` its sizes."""

    path: str
    module: nn.Module
    in_dim: int

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[self.in_dim]

    @property
    def out_features(self) -> int:
        return self.module.weight.shape[1 - self.in_dim]

    def weight(self) -> torch.Tensor:
        """The weight as ``[out, in]`` (a view of the parameter's data; transposed for ``Conv1D``)."""
        w = self.module.weight.data
        return w if self.in_dim == 1 else w.t()

    def set_weight(self, w: torch.Tensor) -> None:
        """Copy ``w`` ``[out, in]`` into the weight in place (cast to its dtype)."""
        target = self.module.weight.data
        target.copy_((w if self.in_dim == 1 else w.t()).to(target.dtype))


def linear_view(mod: nn.Module, path: str = "") -> LinearView | None:
    """The :class:`LinearView` of ``mod``, or None when it is not linear-like."""
    if isinstance(mod, nn.Linear):
        return LinearView(path, mod, 1)
    if _CONV1D is not None and isinstance(mod, _CONV1D):
        return LinearView(path, mod, 0)
    return None


def linear_layers(model: nn.Module) -> dict[str, LinearView]:
    """``{module path: LinearView}`` for every linear-like module of ``model`` (in module order)."""
    out = {}
    for path, mod in model.named_modules():
        view = linear_view(mod, path)
        if view is not None:
            out[path] = view
    return out


def canonical_names(graph) -> dict[str, str]:
    """Every parameter name of ``graph`` (tied aliases included) -> its canonical state-dict name."""
    out = {}
    for canon, names in getattr(graph, "aliases", {}).items():
        for n in names:
            out[n] = canon
        out[canon] = canon
    return out


def consumers(model: nn.Module, graph) -> dict[str, tuple[str, LinearView]]:
    """``{module path: (canonical weight name, LinearView)}`` for every linear layer whose weight is a member of a
    group of ``graph`` along its input-feature dim: the layers that read a prunable space."""
    canon = canonical_names(graph)
    along = {(canon.get(m.param, m.param), m.dim) for g in graph.groups() for m in g.members}
    ids = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for path, view in linear_layers(model).items():
        wname = ids.get(id(view.module.weight))
        if wname is not None and (wname, view.in_dim) in along:
            out[path] = (wname, view)
    return out


@dataclass
class InputStats:
    """Running statistics of one layer's input features over calibration tokens.

    ``count``: tokens seen; ``sum``, ``sumsq``: ``[in]``, the per-feature sum and sum of squares; ``gram``:
    ``[in, in]`` ``X^T X`` (None unless requested). All in the collector's dtype, on the input's device.
    """

    count: int
    sum: torch.Tensor
    sumsq: torch.Tensor
    gram: torch.Tensor | None = None

    @classmethod
    def zeros(cls, in_features: int, gram: bool = False, dtype=torch.float64, device=None) -> "InputStats":
        z = dict(dtype=dtype, device=device)
        return cls(0, torch.zeros(in_features, **z), torch.zeros(in_features, **z),
                   torch.zeros(in_features, in_features, **z) if gram else None)

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs ``[..., in]`` (every leading dim is a token)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(self.sum.dtype)
        if x.device != self.sum.device:
            x = x.to(self.sum.device)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sumsq += x.pow(2).sum(0)
        if self.gram is not None:
            self.gram.addmm_(x.t(), x)  # in place: no [in, in] temporary (1 GB for a 7B down_proj in float64)

    @property
    def mean(self) -> torch.Tensor:
        """``[in]`` mean of each feature."""
        return self.sum / self.count

    @property
    def var(self) -> torch.Tensor:
        """``[in]`` population variance of each feature (clamped at 0)."""
        mean = self.mean
        return (self.sumsq / self.count - mean * mean).clamp_min(0)

    @property
    def norm(self) -> torch.Tensor:
        """``[in]`` L2 norm of each feature over all tokens (Wanda's ``||x_j||``)."""
        return self.sumsq.sqrt()

    def hessian(self) -> torch.Tensor:
        """``[in, in]`` the layer-wise least-squares Hessian ``2 X^T X / count`` (needs ``gram``)."""
        if self.gram is None:
            raise ValueError("InputStats.hessian needs statistics collected with gram=True")
        return self.gram * (2.0 / max(self.count, 1))


class Collector:
    """Forward hooks on linear modules accumulating :class:`InputStats` of their inputs.

    ``modules``: ``{key: module}``; several modules may share a key (a tied weight used twice accumulates over
    both). ``gram``: also accumulate ``X^T X``. ``dtype``: of the sums (float64 by default; float32 halves the
    memory of large Gram matrices). Use as a context manager (hooks are removed on exit); ``stats`` maps each key
    to its statistics once a module of that key has run.
    """

    def __init__(self, modules, gram: bool = False, dtype=torch.float64):
        self.modules = list(modules.items()) if isinstance(modules, dict) else list(modules)
        self.gram = gram
        self.dtype = dtype
        self.stats: dict[str, InputStats] = {}
        self._handles: list = []

    def _hook(self, key):
        def fn(_mod, args, _out):
            x = args[0]
            s = self.stats.get(key)
            if s is None:
                s = self.stats[key] = InputStats.zeros(x.shape[-1], self.gram, self.dtype, x.device)
            s.add(x)
        return fn

    def __enter__(self) -> "Collector":
        for key, mod in self.modules:
            self._handles.append(mod.register_forward_hook(self._hook(key)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def check_token_ids(batches) -> torch.Tensor:
    """``batches`` as a ``[N, L]`` LongTensor of token ids, or a one-line ValueError."""
    if not isinstance(batches, torch.Tensor) or batches.dim() != 2:
        raise ValueError(f"calibration must be a [N, L] LongTensor of token ids, got "
                         f"{type(batches).__name__}{tuple(batches.shape) if isinstance(batches, torch.Tensor) else ''}")
    return batches.long()


@torch.no_grad()
def collect(model: nn.Module, paths, calibration, gram: bool = False, dtype=torch.float64, batch_size: int = 1,
            progress: bool = False, desc: str = "activations") -> dict[str, InputStats]:
    """Run ``model`` over ``calibration`` token ids ``[N, L]``, ``batch_size`` rows per forward, in eval mode, and
    return ``{key: InputStats}`` of the inputs of the linear modules in ``paths``.

    ``paths``: module paths (the key is the path), or ``{key: path or [paths]}`` to key statistics otherwise (e.g.
    by weight name, so tied uses accumulate together). See :class:`Collector` for ``gram`` and ``dtype``.
    """
    calibration = check_token_ids(calibration)
    if not isinstance(paths, dict):
        paths = {p: p for p in paths}
    modules = [(key, model.get_submodule(p)) for key, ps in paths.items()
               for p in ([ps] if isinstance(ps, str) else ps)]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    try:
        model.eval()
        with Collector(modules, gram, dtype) as col:
            for rows in tqdm(calibration.split(batch_size), desc=desc, disable=not progress, leave=False):
                model(input_ids=rows.to(device))
    finally:
        model.train(was_training)
    return col.stats
