"""Capture a model as an aten graph with ``torch.export`` on a meta-device twin.

The twin shares nothing with the caller's model: parameters and buffers are replaced by meta tensors
of the same shape and dtype (``copy.deepcopy`` with a memo), so a 70B model traces without its
weights and the caller's model is never touched.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch

from .errors import TraceError


@dataclass
class Capture:
    """An exported graph plus the mapping of its placeholders to the model's tensors."""

    program: torch.export.ExportedProgram
    params: dict  # placeholder name -> canonical parameter name
    buffers: dict  # placeholder name -> buffer name
    persistent_buffers: set
    aliases: dict  # canonical parameter name -> all names sharing that tensor (tied weights)
    shapes: dict = field(default_factory=dict)  # canonical tensor name -> shape
    module: torch.nn.Module | None = None  # the meta twin that was exported (its attributes explain literals)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph


CACHE_FLAGS = ("use_cache", "use_mems_eval")  # config flags that make the forward return a cache (XLNet: mems)


def meta_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the meta device."""
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in memo:
            continue
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta
    twin = copy.deepcopy(model, memo)
    if any(hasattr(m, "_hf_hook") for m in twin.modules()):  # dispatched with accelerate: trace the plain model
        from accelerate.hooks import remove_hook_from_module

        for m in twin.modules():  # offload=False: detaching must not load the offloaded weights into the twin
            hook = getattr(m, "_hf_hook", None)
            for h in getattr(hook, "hooks", None) or [hook]:
                if h is not None and hasattr(h, "offload"):
                    h.offload = False
        remove_hook_from_module(twin, recurse=True)
    twin.eval()
    config = getattr(twin, "config", None)
    if config is not None:
        for flag in CACHE_FLAGS:  # caches are extra outputs that would block the spaces they hold
            if hasattr(config, flag):
                setattr(config, flag, False)
        _traceable_attention(twin, config)
        if getattr(config, "_experts_implementation", None) not in (None, "grouped_mm", "batched_mm"):
            try:  # eager experts loop over data-dependent expert hits, which torch.export cannot capture
                twin.set_experts_implementation("grouped_mm")
            except Exception:
                pass
    return twin


TRACEABLE_ATTENTION = ("eager", "sdpa")  # implementations that run on meta tensors on any machine


def _traceable_attention(twin, config) -> None:
    """Trace the attention the model runs; only kernels that cannot run on meta (flash, flex, ...) are
    swapped for SDPA, or eager where the model has no SDPA path. The rules read heads from both."""
    if getattr(config, "_attn_implementation", None) in TRACEABLE_ATTENTION + (None,):
        return
    for impl in TRACEABLE_ATTENTION[::-1]:
        try:
            twin.set_attn_implementation(impl)
            return
        except Exception:  # noqa: BLE001 - the model does not support this implementation
            continue


def default_inputs(model: torch.nn.Module) -> tuple:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "vocab_size"):
        raise TraceError(
            f"{type(model).__name__} has no config.vocab_size: pass example_inputs=(tensor, ...) to trace()")
    return (torch.zeros(2, 8, dtype=torch.long),)


def _persistent_buffer_names(model: torch.nn.Module) -> set:
    names = set()
    for mod_name, mod in model.named_modules():
        for b in mod._buffers:
            if b not in mod._non_persistent_buffers_set and mod._buffers[b] is not None:
                names.add(f"{mod_name}.{b}" if mod_name else b)
    return names


def capture(model: torch.nn.Module, example_inputs=None, prepare=None, mode=None) -> Capture:
    """Export a meta twin of ``model`` (non-strict) and map placeholders to state-dict names.
    ``prepare(twin)``, if given, edits the twin before the export; ``mode`` (a torch-function mode), if given, is
    active during the export only."""
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"trace() needs a torch.nn.Module, got {type(model).__name__}")
    inputs = tuple(example_inputs) if example_inputs is not None else default_inputs(model)
    inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs)
    twin = meta_twin(model)
    if prepare is not None:
        prepare(twin)

    # Canonical name of every tensor: the first name ``named_parameters`` gives it; tied names are aliases.
    canonical, aliases = {}, {}
    for name, p in twin.named_parameters(remove_duplicate=False):
        first = canonical.setdefault(id(p), name)
        aliases.setdefault(first, []).append(name)
    by_name = {n: canonical[id(p)] for n, p in twin.named_parameters(remove_duplicate=False)}
    shapes = {canonical[id(p)]: tuple(p.shape) for _, p in twin.named_parameters(remove_duplicate=False)}
    for name, b in twin.named_buffers():
        shapes[name] = tuple(b.shape)

    try:
        with mode if mode is not None else contextlib.nullcontext():
            program = torch.export.export(twin, inputs, strict=False)
    except Exception as e:  # noqa: BLE001 - report what torch.export said, with the model class
        raise TraceError(f"torch.export failed on {type(model).__name__}: {type(e).__name__}: {e}") from e

    sig = program.graph_signature
    params = {ph: by_name.get(name, name) for ph, name in sig.inputs_to_parameters.items()}
    buffers = dict(sig.inputs_to_buffers)
    return Capture(program, params, buffers, _persistent_buffer_names(twin), aliases, shapes, twin)
