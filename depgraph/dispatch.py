"""Models dispatched with accelerate (``device_map``, ``max_memory``, disk offload): reading and resizing the weights
that accelerate keeps outside the module (its hook's ``weights_map``: CPU RAM or memory-mapped files in
``offload_dir``) while the module's own parameters sit on the meta device between forwards.

Scoring reads offloaded weights through :func:`fetch`; :func:`materialized` brings the planned tensors of offloaded
modules in for ``mask``/``shrink`` and writes the (resized) results back into accelerate's offload, so the next
forward loads the pruned weights. Modules placed on a device (not offloaded) need nothing: hooks and slicing work
where the tensors are.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .errors import PlanError


def _hook(module):
    """The accelerate hook of ``module`` that holds offloaded weights, or None."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        if h is not None and getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h
    return None


def is_dispatched(model) -> bool:
    """True when some module of ``model`` keeps its weights in an accelerate offload."""
    return any(_hook(m) is not None for m in model.modules())


def _owner(model, name: str):
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def fetch(model, name: str) -> torch.Tensor:
    """Tensor ``name`` of ``model``: the module's own, or, on the meta device, the one in accelerate's offload."""
    module, attr = _owner(model, name)
    t = module._parameters.get(attr)
    t = t if t is not None else module._buffers.get(attr)
    if t is None or t.device.type != "meta":
        return t
    hook = _hook(module)
    if hook is None:
        raise PlanError(f"{name} is on the meta device and no accelerate offload holds its values; load the "
                        f"weights (or dispatch the model with offload_dir) before scoring or shrinking")
    return hook.weights_map[attr]


def _store(hook, attr: str, value: torch.Tensor) -> None:
    """Replace ``attr`` in the hook's offload (RAM dict or offload folder) by ``value``."""
    from accelerate.utils import offload_weight

    wm = hook.weights_map
    dataset, key = getattr(wm, "dataset", wm), getattr(wm, "prefix", "") + attr
    state = getattr(dataset, "state_dict", None)
    if isinstance(dataset, dict):
        dataset[key] = value
    elif state is not None and key in state:
        state[key] = value
    elif getattr(dataset, "index", None) is not None and getattr(dataset, "save_folder", None):
        dataset.index.pop(key, None)
        offload_weight(value.detach().cpu(), key, dataset.save_folder, dataset.index)
    else:
        raise PlanError(f"cannot write the pruned {key} back into accelerate's offload ({type(dataset).__name__})")


@contextmanager
def materialized(model, names):
    """Within the block, the tensors ``names`` of offloaded modules are real (CPU) tensors; on exit whatever they
    became (sliced by ``shrink``, zeroed by ``mask``) is written back into the offload and the parameters return
    to the meta device with their new shapes. A no-op for models without offloaded modules."""
    from accelerate.utils import set_module_tensor_to_device

    brought = []
    for name in names:
        module, attr = _owner(model, name)
        hook = _hook(module)
        t = module._parameters.get(attr)
        if hook is None or t is None or t.device.type != "meta":
            continue
        set_module_tensor_to_device(module, attr, "cpu", value=hook.weights_map[attr])
        brought.append((module, attr, hook))
    try:
        yield
    finally:
        for module, attr, hook in brought:
            value = getattr(module, attr)
            _store(hook, attr, value.detach())
            set_module_tensor_to_device(module, attr, "meta")
