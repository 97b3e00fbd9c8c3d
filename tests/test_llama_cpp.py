"""Opt-in (runs when llama-cpp-python is installed): exported GGUFs of SmolLM2 run in llama.cpp and agree with
transformers: f32 logits on a fixed prompt (top-1 token at every position), 32 greedy tokens identical."""
import copy

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

import depgraph  # noqa: E402
from depgraph.export.check import compare, open_llama  # noqa: E402
from depgraph.export.gguf import export_gguf, plan  # noqa: E402

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
MAX_ABS_DIFF = 1e-3  # f32 weights and KV cache: measured 5e-5 (dense) on logits up to ~27


@pytest.fixture(scope="module")
def smollm2():
    from depgraph.models import load_model

    return load_model()


VARIANTS = {
    "dense": lambda m: m,
    "uniform": lambda m: depgraph.prune(m, None, target=0.2, method="l2", uniform=True, progress=False)[0],
    "default": lambda m: depgraph.prune(m, None, target=0.2, method="l2", progress=False)[0],  # layers 1..28
    "depth": lambda m: _depth(m),  # a layer dropped, an attention sub-block skipped (0 heads in deci)
}
ARCH = {"dense": "llama", "uniform": "llama", "default": "deci", "depth": "deci"}


def _depth(model):
    graph = depgraph.trace(model)
    return depgraph.shrink(model, depgraph.Plan.from_units(graph, {"block.20": [0], "block.10.attention": [0]}))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_llama_cpp_agrees_with_transformers(variant, smollm2, tmp_path):
    dense, tok = smollm2
    model = VARIANTS[variant](copy.deepcopy(dense)).eval()
    assert plan(model)[0] == ARCH[variant]
    path = export_gguf(model, tok, tmp_path / "m.gguf", outtype="f32")
    llm = open_llama(path, threads=2, f32_cache=True)
    for text in (PROMPT, "Hello, world! 12345  tabs\tand ünïcödé"):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
            tok(text, add_special_tokens=False)["input_ids"]
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    r = compare(model, llm, ids, new_tokens=32)
    assert r["top1_equal_all"], r
    assert r["max_abs_diff"] < MAX_ABS_DIFF, r
    assert r["greedy_equal"], r
    if variant == "dense":
        assert "Paris" in tok.decode(r["greedy_llama"])
    llm.close()
