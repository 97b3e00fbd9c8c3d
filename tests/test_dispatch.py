"""A model dispatched with accelerate across "cpu" and "disk" scores and shrinks like the undispatched one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import depgraph
from depgraph.dispatch import fetch, is_dispatched
from depgraph.errors import PlanError


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def _dispatched(tmp_path):
    from accelerate import dispatch_model

    model = _tiny()
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    return dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path / "offload"))


def test_dispatched_scores_and_shrink_match(tmp_path):
    plain = _tiny()
    model = _dispatched(tmp_path)
    assert is_dispatched(model)
    assert model.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # offloaded to disk
    assert torch.equal(fetch(model, "model.layers.1.mlp.down_proj.weight"), plain.model.layers[1].mlp.down_proj.weight)
    calib = torch.randint(0, 128, (2, 10))
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    kw = dict(kinds=("attention", "mlp"), layers=None, round_to=1, target=0.25, progress=False)
    for method in ("activation", "magnitude"):
        g1, g2 = depgraph.trace(plain), depgraph.trace(model)
        s1 = depgraph.score(plain, g1, calib, method=method, kinds=kw["kinds"], progress=False)
        s2 = depgraph.score(model, g2, calib, method=method, kinds=kw["kinds"], progress=False)
        assert s1.keys() == s2.keys() and all(np.array_equal(s1[k], s2[k]) for k in s1)
    before = {name: fetch(model, name).clone() for name in plain.state_dict()}
    with pytest.raises(PlanError, match="dispatched"):  # the re-fit would write into the offload: refused first
        depgraph.prune(model, calib, reconstruct=True, **kw)
    assert all(torch.equal(fetch(model, n), t) for n, t in before.items())  # nothing was modified
    _, r1, p1 = depgraph.prune(plain, calib, reconstruct=False, **kw)
    _, r2, p2 = depgraph.prune(model, calib, **kw)  # the default leaves the re-fit out on a dispatched model
    assert r2["reconstruct"] is False
    assert p1[0].to_json() == p2[0].to_json() and r1["params_after"] == r2["params_after"]
    assert model.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # still offloaded, new shape
    assert model.model.layers[1].mlp.down_proj.weight.shape == plain.model.layers[1].mlp.down_proj.weight.shape
    for name, p in plain.state_dict().items():
        assert torch.equal(fetch(model, name), p), name
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)  # the next forward loads the pruned weights
