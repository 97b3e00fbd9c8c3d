"""Never wrong: shrink(verify=True) catches a broken shrink and restores the model; ops that move data
along a channel dim are blocked (or exact and verified); literal sizes must be owned by what the shrinker
rewrites."""
import copy

import pytest
import torch

import depgraph
from archs import ARCHS, ids
import importlib

shrink_mod = importlib.import_module("depgraph.shrink")
from depgraph.errors import ShrinkVerifyError


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_verify_accepts_a_correct_shrink():
    model = ARCHS["llama-gqa"]()
    graph = depgraph.trace(model)
    plan = depgraph.Plan.random(graph, 0.5, kinds=("attention", "mlp"))
    masked = _logits(depgraph.mask(copy.deepcopy(model), plan), ids())
    shrunk = depgraph.shrink(model, plan, verify=True)
    torch.testing.assert_close(_logits(shrunk, ids()), masked, rtol=0, atol=1e-5)


def test_verify_catches_a_fixer_that_skips_an_attribute(monkeypatch):
    model = ARCHS["gpt2"]()  # fused c_attn, split by the attention module's split_size
    attn = model.transformer.h[0].attn
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    attrs = {n: getattr(attn, n) for n in ("split_size", "num_heads", "embed_dim")}
    dense = _logits(model, ids())
    graph = depgraph.trace(model)
    plan = depgraph.Plan.random(graph, 0.25, kinds=("attention",))
    broken = {k: f for k, f in shrink_mod.ATTENTION_ATTRIBUTES.items() if k != "split_size"}
    monkeypatch.setattr(shrink_mod, "ATTENTION_ATTRIBUTES", broken)
    with pytest.raises(ShrinkVerifyError, match=r"block transformer\.h\.0 \(groups attention\.0\)"):
        depgraph.shrink(model, plan, verify=True)
    # restored: same tensors, same attributes, same outputs, no record of a shrink
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in before.items()}
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)
    assert {n: getattr(attn, n) for n in attrs} == attrs
    assert not getattr(model.config, "depgraph", {}).get("modules")
    torch.testing.assert_close(_logits(model, ids()), dense, rtol=0, atol=0)
    # without verify the same broken shrink hands back a model that is not its mask
    masked = _logits(depgraph.mask(copy.deepcopy(model), plan), ids())
    broken_model = depgraph.shrink(copy.deepcopy(model), plan)
    try:
        out = _logits(broken_model, ids())
    except Exception:  # noqa: BLE001 - a crash is also what verify prevents
        return
    assert not torch.allclose(out, masked, atol=1e-5)


def test_prune_verifies_by_default(monkeypatch):
    """The graph and the shrinker read the same attribute tables, so break the shrinker only where it applies them."""
    model = ARCHS["gpt2"]()
    set_attrs = shrink_mod._set_attrs

    def skip_split_size(mod, values, *args, **kwargs):
        return set_attrs(mod, {k: v for k, v in values.items() if k != "split_size"}, *args, **kwargs)
    monkeypatch.setattr(shrink_mod, "_set_attrs", skip_split_size)
    with pytest.raises(ShrinkVerifyError):
        depgraph.prune(model, None, method="random", kinds=("attention",), ratios={"attention": 0.25},
                       layers=None, progress=False)
