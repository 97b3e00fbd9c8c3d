"""The real model: SmolLM2-135M-Instruct (Llama, GQA 9 q / 3 kv heads, 30 layers, tied embeddings)."""
import copy

import pytest
import torch

import depgraph
from depgraph.models import is_depgraph_folder, smollm2_cache_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    if not (smollm2_cache_dir() / "config.json").is_file():
        pytest.skip("SmolLM2 is not cached: run `make fetch-model` (CI does)")
    from depgraph.models import load_model

    model, tok = load_model()
    return model, tok, depgraph.trace(model)


def test_summary_lists_every_group(smollm2):
    model, _, graph = smollm2
    counts = graph.summary_dict()["counts"]
    assert counts == {"hidden": 1, "attention": 30, "mlp": 30}
    for g in graph.groups("attention"):
        assert (g.num_units, g.gqa, g.head_dim) == (9, (3, 3), 64)
    assert all(g.num_units == 1536 for g in graph.groups("mlp"))
    (hidden,) = graph.groups("hidden")
    assert hidden.num_units == 576 and not hidden.exact
    text = str(graph)
    assert "attention.29" in text and "9 heads (3 kv x 3 q/kv) x 64" in text


def test_random_20_percent_mask_equals_shrink_and_generates(smollm2):
    model, tok, graph = smollm2
    plan = depgraph.Plan.random(graph, 0.2, seed=0, kinds=("attention", "mlp"))
    x = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        masked = depgraph.mask(copy.deepcopy(model), plan)(x).logits
        shrunk_model = depgraph.shrink(copy.deepcopy(model), plan)
        shrunk = shrunk_model(x).logits
        # fp32: 30 layers of matmuls with other shapes sum in another order (about 1e-5 relative)
        torch.testing.assert_close(shrunk, masked, rtol=1e-4, atol=1e-3)
        # fp64 removes the rounding: removal equals masking to 1e-5
        masked64 = depgraph.mask(copy.deepcopy(model).double(), plan)(x).logits
        shrunk64 = copy.deepcopy(shrunk_model).double()(x).logits
    torch.testing.assert_close(shrunk64, masked64, rtol=0, atol=1e-5)
    n = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in shrunk_model.parameters()) == n - plan.params_removed()
    # greedy text of the shrunk model is the masked model's text (fp64: no near-tie flips), and it is real text
    texts = []
    for m in (copy.deepcopy(shrunk_model).double(), depgraph.mask(copy.deepcopy(model).double(), plan)):
        m.generation_config.pad_token_id = tok.eos_token_id
        out = m.generate(x, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        assert out.shape[1] == x.shape[1] + 8
        texts.append(tok.decode(out[0, x.shape[1]:], skip_special_tokens=True))
    assert texts[0] == texts[1] and texts[0].strip(), texts
