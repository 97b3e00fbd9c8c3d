"""Removing ``block`` groups (depgraph.blocks) from a model: the shrink side of depth pruning.

A removed *sub-block* (an attention or MLP residual branch) keeps its place in the decoder layer's code: every
module wholly inside the branch becomes a :class:`Skipped` no-op that returns zeros in the module's output
structure, so the layer adds nothing to the residual stream (exactly what the masked model adds). A skipped
attention module keeps its KV cache in step (it appends empty keys and values), so ``generate`` with a cache sees
the right sequence length in every layer. A removed *layer* is deleted from its ``ModuleList``; the layers after it
are renumbered (``layer_idx``), and the config's layer count and per-layer lists (``layer_types``, ...) follow.

Both are recorded in ``config.depgraph``: ``skipped`` (module path -> the no-op's spec) and the per-layer records
renumbered, so :func:`depgraph.load_pruned` and the stock-loadable modeling file rebuild the same model.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from . import record as records

LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")  # config lists with one entry per layer
LAYER_INDEX_LISTS = ("mlp_only_layers",)  # config lists of layer indices
CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache")


class Skipped(nn.Module):
    """A removed residual sub-block module: returns zeros shaped like its input ``source`` (a positional index or a
    keyword), as a tensor (``returns="tensor"``) or a tuple (``returns=["zeros", None, ...]``). With a
    ``layer_idx`` (an attention module), a KV cache passed in gets empty keys and values for that layer."""

    def __init__(self, returns="tensor", source=0, layer_idx=None, width=None):
        super().__init__()
        self.returns, self.source, self.layer_idx, self.width = returns, source, layer_idx, width

    def forward(self, *args, **kwargs):
        x = args[self.source] if isinstance(self.source, int) else kwargs[self.source]
        zeros = torch.zeros_like(x) if self.width is None else x.new_zeros(*x.shape[:-1], self.width)
        if self.layer_idx is not None:
            cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
            if cache is not None and hasattr(cache, "update"):
                empty = x.new_zeros(x.shape[0], 0, x.shape[1], 1)
                cache.update(empty, empty, self.layer_idx)
        if self.returns == "tensor":
            return zeros
        return tuple(zeros if r == "zeros" else None for r in self.returns)

    def spec(self) -> dict:
        return {"returns": self.returns, "source": self.source, "layer_idx": self.layer_idx, "width": self.width}


def _structure(args, kwargs, out) -> dict:
    """The :class:`Skipped` spec reproducing ``out``'s structure with zeros like one of the inputs."""
    first = out if isinstance(out, torch.Tensor) else next((o for o in out if isinstance(o, torch.Tensor)), None) \
        if isinstance(out, (tuple, list)) else None
    if first is None:
        raise ValueError(f"returns {type(out).__name__}, not a tensor or a tuple of tensors")
    inputs = list(enumerate(args)) + list(kwargs.items())
    width = None
    source = next((k for k, a in inputs if isinstance(a, torch.Tensor) and a.shape == first.shape
                   and a.dtype == first.dtype), None)
    if source is None:  # a linear-like module: zeros like the input with the output's last dim
        source = next((k for k, a in inputs if isinstance(a, torch.Tensor) and a.dim() == first.dim()
                       and a.shape[:-1] == first.shape[:-1] and a.dtype == first.dtype), None)
        width = int(first.shape[-1])
    if source is None:
        raise ValueError("has no input shaped like its output")
    if isinstance(out, torch.Tensor):
        return {"returns": "tensor", "source": source, "width": width}
    # the other elements (attention weights) are read by nothing in the traced graph: the branch owns them
    returns = ["zeros" if o is first else None for o in out]
    return {"returns": returns, "source": source, "width": width}


@torch.no_grad()
def structures(model, paths) -> dict:
    """{module path: Skipped spec} read off one short forward pass with hooks on the modules."""
    from .verify import probe_ids

    found, errors, handles = {}, {}, []
    for path in paths:
        mod = model.get_submodule(path)

        def hook(m, args, kwargs, out, path=path):
            try:
                found.setdefault(path, _structure(args, kwargs, out))
            except ValueError as e:
                errors.setdefault(path, str(e))
        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        ids = probe_ids(model, 4)
        try:
            model(ids, use_cache=False)
        except TypeError:
            model(ids)
    finally:
        for h in handles:
            h.remove()
    from .errors import PlanError

    for path in paths:
        if path in errors or path not in found:
            raise PlanError(f"cannot skip module {path}: it {errors.get(path, 'never ran on the probe')}")
        idx = getattr(model.get_submodule(path), "layer_idx", None)
        found[path]["layer_idx"] = idx if isinstance(idx, int) else None
    return found


def replace_module(model, path: str, new: nn.Module, undo: list | None = None) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if undo is not None:
        undo.append(lambda parent=parent, name=name, old=parent._modules[name]: parent._modules.__setitem__(name, old))
    parent._modules[name] = new


def skip_modules(model, specs: dict, undo: list | None = None) -> None:
    """Replace each module path of ``specs`` by a :class:`Skipped` built from its spec."""
    for path, spec in specs.items():
        replace_module(model, path, Skipped(spec["returns"], spec["source"], spec.get("layer_idx"), spec.get("width")),
                       undo)


def renumbering(removed: dict) -> callable:
    """For ``removed`` {ModuleList path: removed indices}: a function mapping a module path to its path after the
    removal (None for a path inside a removed layer; other paths unchanged)."""
    patterns = [(re.compile(rf"^{re.escape(lst)}\.(\d+)(?=\.|$)"), lst, sorted(set(idx))) for lst, idx in removed.items()]

    def rename(path: str):
        for pat, lst, gone in patterns:
            m = pat.match(path)
            if m:
                i = int(m.group(1))
                if i in gone:
                    return None
                return f"{lst}.{i - sum(g < i for g in gone)}{path[m.end():]}"
        return path
    return rename


def drop_layers(model, removed: dict, undo: list | None = None) -> None:
    """Delete layers {ModuleList path: indices} and renumber the ``layer_idx`` of what stays."""
    for lst, indices in removed.items():
        parent_path, _, name = lst.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old = parent._modules[name]
        gone = set(indices)
        kept = nn.ModuleList(m for i, m in enumerate(old) if i not in gone)
        if undo is not None:
            undo.append(lambda parent=parent, name=name, old=old: parent._modules.__setitem__(name, old))
        parent._modules[name] = kept
        for new_idx, block in enumerate(kept):
            for sub in block.modules():
                if isinstance(getattr(sub, "layer_idx", None), int) and not isinstance(sub.layer_idx, bool):
                    if undo is not None:
                        undo.append(lambda sub=sub, v=sub.layer_idx: setattr(sub, "layer_idx", v))
                    sub.layer_idx = new_idx


def update_config(config, before: int, gone: list) -> None:
    """The layer count and every per-layer list of the (text) config after removing the layers ``gone``."""
    target = config.get_text_config() if hasattr(config, "get_text_config") else config
    for f in LAYER_COUNT_FIELDS:
        if getattr(target, f, None) == before:
            setattr(target, f, before - len(gone))
    gone = set(gone)
    for k in PER_LAYER_LISTS:
        v = getattr(target, k, None)
        if isinstance(v, (list, tuple)) and len(v) == before:
            setattr(target, k, type(v)(x for i, x in enumerate(v) if i not in gone))
    for k in LAYER_INDEX_LISTS:
        v = getattr(target, k, None)
        if isinstance(v, (list, tuple)):
            setattr(target, k, type(v)(i - sum(g < i for g in gone) for i in v if i not in gone))


def apply_blocks(model, plan, record: dict, undo: list) -> bool:
    """Remove the plan's block entries from ``model`` (sub-blocks skipped, layers dropped); True if any."""
    entries = [e for e in plan.entries if getattr(e, "block", None)]
    if not entries:
        return False
    subs = [e for e in entries if e.block["part"] != "layer"]
    paths = [m for e in subs for m in e.block["modules"]]
    specs = structures(model, paths) if paths else {}
    skip_modules(model, specs, undo)
    records.add_skipped(record, specs)
    removed: dict = {}
    for e in entries:
        if e.block["part"] == "layer":
            removed.setdefault(e.block["list"], []).append(e.block["index"])
    if removed:
        for lst, gone in removed.items():
            before = len(model.get_submodule(lst))
            drop_layers(model, {lst: gone}, undo)
            if getattr(model, "config", None) is not None:
                update_config(model.config, before, gone)
        gone = next(iter(removed.values()))  # per-layer records index the decoder layers (one ModuleList)
        records.renumber_layers(record, renumbering(removed), gone)
    return True
