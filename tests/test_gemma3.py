"""The second real model: Gemma 3 270M (Gemma3ForCausalLM, 18 layers, 4 query heads on 1 kv head of 256, MLP 2048,
hidden 640, tied 262,144-token embeddings, a BOS in front of every text). Skips unless `make fetch-model2` has
cached it; never downloads."""
import copy

import pytest
import torch

import depgraph
from depgraph.calibration import bos_prefix
from depgraph.models import gemma3_cache_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3():
    if not (gemma3_cache_dir() / "config.json").is_file():
        pytest.skip(f"Gemma 3 270M is not cached at {gemma3_cache_dir()}: run `make fetch-model2`")
    from depgraph.models import load_model

    model, tok = load_model(gemma3_cache_dir())
    model.config.use_cache = False
    return model, tok, depgraph.trace(model)


def test_loads_as_gemma3_with_a_bos(gemma3):
    model, tok, _ = gemma3
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert bos_prefix(tok) == tok.bos_token_id == 2  # the perplexity / calibration windows start with it
    x = tok("The capital of France is", return_tensors="pt").input_ids
    assert x[0, 0].item() == 2
    with torch.no_grad():
        logits = model(x).logits
    assert torch.isfinite(logits).all()


def test_groups_are_exact_heads_and_neurons(gemma3):
    _, _, graph = gemma3
    assert graph.summary_dict()["counts"] == {"hidden": 1, "attention": 18, "mlp": 18}
    for g in graph.groups("attention"):
        assert (g.num_units, g.gqa, g.head_dim, g.exact) == (4, (1, 4), 256, True)
    assert all(g.num_units == 2048 and g.exact for g in graph.groups("mlp"))
    (hidden,) = graph.groups("hidden")
    assert hidden.num_units == 640 and not hidden.exact  # RMSNorms average over the hidden channels
    assert "4 heads (1 kv x 4 q/kv) x 256" in str(graph)


def test_random_heads_and_neurons_removal_equals_masking(gemma3):
    model, tok, graph = gemma3
    plan = depgraph.Plan.random(graph, 0.2, seed=0, kinds=("attention", "mlp"))
    assert {e.kind for e in plan.entries if len(e.removed)} == {"attention", "mlp"}
    x = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        shrunk_model = depgraph.shrink(copy.deepcopy(model), plan)
        assert sum(p.numel() for p in shrunk_model.parameters()) == 268_098_176 - plan.params_removed()
        masked = depgraph.mask(copy.deepcopy(model), plan)(x).logits
        # fp32: matmuls of other shapes sum in another order; within 1e-5 of the logits' scale (up to ~55 here)
        assert (shrunk_model(x).logits - masked).abs().max() <= 1e-5 * masked.abs().max()
        del masked
        masked64 = depgraph.mask(copy.deepcopy(model).double(), plan)(x).logits
        shrunk64 = shrunk_model.double()(x).logits
    torch.testing.assert_close(shrunk64, masked64, rtol=0, atol=1e-5)  # fp64 removes the rounding
