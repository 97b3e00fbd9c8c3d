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


def test_embedding_is_63_percent_and_targets_count_against_the_rest(gemma3):
    from depgraph.errors import PlanError
    from depgraph.plan import check_target

    _, _, graph = gemma3
    assert graph.embedding_params == ("model.embed_tokens.weight",)  # tied: the output head is the same table
    assert graph.num_embedding_params == 262_144 * 640 == 167_772_160
    assert "167,772,160 in embeddings, 63%" in str(graph)
    layers = range(1, 17)  # layers="auto"
    most = 16 * (2048 - 8) * 3 * 640  # every MLP of layers 1-16 at its minimum width, 8 neurons
    assert f"{most / 268_098_176:.4f}" == "0.2338" and f"{most / (268_098_176 - 167_772_160):.4f}" == "0.6247"
    with pytest.raises(PlanError, match=r"target 0.3 cannot be met: at most 0\.2338 \(23\.4%\) of the parameters .*"
                                        r"the embedding tables are 63% of the parameters: target_of='non-embedding'"):
        check_target(graph, 0.3, ("mlp",), layers)
    check_target(graph, 0.5, ("mlp",), layers, target_of="non-embedding")  # 0.2338 of all is 0.6247 of the rest
    with pytest.raises(PlanError, match=r"target 0.7 \(of the non-embedding parameters\) cannot be met: at most "
                                        r"0\.6247 \(62\.5%\) of the non-embedding parameters"):
        check_target(graph, 0.7, ("mlp",), layers, target_of="non-embedding")


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
