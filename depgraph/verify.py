"""Check a shrink against its mask on a short probe, decoder block by decoder block.

:func:`masked_reference` runs the model once with the plan's units zeroed (restored afterwards) and records
every decoder block's inputs and output; :func:`compare` runs the shrunk blocks on those same inputs. For
exact plans removal equals masking, so every block must agree; the first block that differs names the
groups that broke it. Plans with inexact entries (hidden channels change every block's width) are only
checked to run and give finite logits.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from .errors import ShrinkVerifyError


@dataclass
class Reference:
    probe: torch.Tensor
    logits: torch.Tensor
    blocks: dict = field(default_factory=dict)  # block path -> (args, kwargs, output)
    exact: bool = True


def probe_ids(model, length: int = 8) -> torch.Tensor | None:
    """Token ids [1, length] for models with a vocabulary (None otherwise: nothing to verify)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) and config is not None and hasattr(config, "get_text_config"):
        vocab = getattr(config.get_text_config(), "vocab_size", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(emb, torch.nn.Embedding):
        vocab = min(vocab or emb.num_embeddings, emb.num_embeddings)
    if not isinstance(vocab, int) or vocab < 2:
        return None
    g = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    return torch.randint(0, vocab, (1, length), generator=g).to(device)


def decoder_blocks(model) -> list:
    """Paths of the entries of the shallowest ModuleList holding weights (the decoder layers)."""
    best = None
    for path, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and any(p.dim() >= 2 for p in mod.parameters()):
            depth = path.count(".")
            if best is None or depth < best[0]:
                best = (depth, path, len(mod))
    return [] if best is None else [f"{best[1]}.{i}" for i in range(best[2])]


def _logits(model, ids):
    try:  # no KV cache: the captured block inputs must not carry a cache the first run filled
        out = model(ids, use_cache=False)
    except TypeError:
        out = model(ids)
    out = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
    return out.detach().float()


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return None


@torch.no_grad()
def masked_reference(model, plan, get_tensor) -> Reference | None:
    """The plan's masked outputs (per block and logits); the model is unchanged afterwards."""
    ids = probe_ids(model)
    dispatched = any(hasattr(m, "_hf_hook") for m in model.modules())
    if ids is None or dispatched:  # nothing to probe with, or an accelerate-dispatched model (weights in its offload)
        why = "is dispatched by accelerate" if dispatched else "has no token vocabulary to build a probe from"
        warnings.warn(f"shrink(verify=True): {type(model).__name__} {why}; shrunk without the removal == masking "
                      f"check", stacklevel=3)
        return None
    exact = all(e.exact for e in plan.entries)
    saved = []
    for name, dims in plan.removed_by_param().items():
        t = get_tensor(model, name)
        for d, idx in dims.items():
            idx = torch.as_tensor(idx, device=t.device)
            saved.append((t, d, idx, t.index_select(d, idx).clone()))
            t.index_fill_(d, idx, 0)
    blocks, handles = {}, []
    if exact:
        for path in decoder_blocks(model):
            mod = model.get_submodule(path)

            def hook(m, args, kwargs, out, path=path):
                blocks[path] = (args, kwargs, _first_tensor(out))
            handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        logits = _logits(model, ids)
    finally:
        for h in handles:
            h.remove()
        for t, d, idx, vals in reversed(saved):
            t.index_copy_(d, idx, vals)
    return Reference(ids, logits, blocks, exact)


def _tolerance(ref: torch.Tensor) -> float:
    scale = max(1.0, float(ref.abs().max()))
    return (1e-4 if ref.dtype == torch.float32 else 2e-2) * scale


@torch.no_grad()
def compare(model, plan, ref: Reference) -> None:
    """Raise ShrinkVerifyError naming the first block (and its planned groups) whose shrunk output differs."""
    def groups_in(path):
        layer = path.rsplit(".", 1)[-1]
        names = [e.group for e in plan.entries if str(e.layer) == layer]
        return ", ".join(names) or ", ".join(e.group for e in plan.entries[:4])

    from .depth import renumbering

    dropped: dict = {}
    for e in plan.entries:
        if e.block and e.block["part"] == "layer":
            dropped.setdefault(e.block["list"], []).append(e.block["index"])
    rename = renumbering(dropped)
    for path, (args, kwargs, want) in ref.blocks.items():
        if want is None or rename(path) is None:  # a dropped layer: the masked one returned its input
            continue
        try:
            got = _first_tensor(model.get_submodule(rename(path))(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - a shrunk block that cannot run is the failure we report
            raise ShrinkVerifyError(f"shrink verification failed at block {path} (groups {groups_in(path)}): "
                                    f"the shrunk block raises {type(e).__name__}: {e}") from e
        if got is None or got.shape != want.shape or (got.float() - want.float()).abs().max() > _tolerance(want):
            diff = "shape " + str(tuple(got.shape)) if got is not None and got.shape != want.shape else \
                f"max |diff| {(got.float() - want.float()).abs().max():.2e}" if got is not None else "no output"
            raise ShrinkVerifyError(f"shrink verification failed: block {path} differs from the masked model "
                                    f"({diff}); groups {groups_in(path)}")
    try:
        logits = _logits(model, ref.probe)
    except Exception as e:  # noqa: BLE001
        raise ShrinkVerifyError(f"shrink verification failed: the shrunk model raises {type(e).__name__}: {e} "
                                f"(groups {', '.join(e2.group for e2 in plan.entries[:6])})") from e
    if not torch.isfinite(logits).all() or logits.shape != ref.logits.shape:
        raise ShrinkVerifyError(f"shrink verification failed: the shrunk model gives logits of shape "
                                f"{tuple(logits.shape)} (want {tuple(ref.logits.shape)}) or non-finite values")
    if ref.exact and (logits - ref.logits).abs().max() > _tolerance(ref.logits):
        raise ShrinkVerifyError(f"shrink verification failed: the model output differs from the masked model "
                                f"(max |diff| {(logits - ref.logits).abs().max():.2e}) though every block agrees; "
                                f"groups {', '.join(e.group for e in plan.entries[:6])}")
