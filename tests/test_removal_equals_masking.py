"""The central invariant: for every exact group, zeroing units equals removing them (fp32, 1e-5)."""
import copy

import pytest
import torch

import depgraph
from archs import ARCHS, ids, small_cnn

CASES = [
    (("attention",), "heads"),
    (("attention",), "kv"),
    (("mlp",), "heads"),
    (("attention", "mlp"), "heads"),
]


@pytest.fixture(scope="module", params=sorted(ARCHS))
def traced(request):
    model = ARCHS[request.param]()
    return request.param, model, depgraph.trace(model)


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("kinds,gqa", CASES, ids=["heads", "kv-groups", "mlp", "heads+mlp"])
@pytest.mark.parametrize("seed", [0, 1])
def test_mask_equals_shrink(traced, kinds, gqa, seed):
    name, model, graph = traced
    groups = graph.groups(kinds)
    assert groups, f"{name}: no {kinds} groups found"
    assert all(g.exact for g in groups)
    plan = depgraph.Plan.random(graph, 0.5, seed=seed, kinds=kinds, gqa=gqa)
    assert plan.params_removed() > 0
    x = ids(seed)
    masked = _logits(depgraph.mask(copy.deepcopy(model), plan), x)
    shrunk_model = depgraph.shrink(copy.deepcopy(model), plan)
    shrunk = _logits(shrunk_model, x)
    dense = _logits(model, x)
    assert not torch.allclose(masked, dense, atol=1e-4), "the plan changed nothing"
    torch.testing.assert_close(shrunk, masked, rtol=0, atol=1e-5)
    n_before = sum(p.numel() for p in model.parameters())
    n_after = sum(p.numel() for p in shrunk_model.parameters())
    assert n_before - n_after == plan.params_removed()


def test_hidden_channels_are_inexact_but_shrink_runs(traced):
    name, model, graph = traced
    (hidden,) = graph.groups("hidden")
    assert not hidden.exact and hidden.inexact_reasons
    plan = depgraph.Plan.random(graph, 0.25, kinds=("hidden",))
    shrunk = depgraph.shrink(copy.deepcopy(model), plan)
    out = _logits(shrunk, ids())
    assert out.shape[-1] == model.config.vocab_size and torch.isfinite(out).all()


def test_every_layer_has_attention_and_mlp(traced):
    name, model, graph = traced
    n_layers = model.config.num_hidden_layers
    for kind in ("attention", "mlp"):
        assert sorted(g.layer for g in graph.groups(kind)) == list(range(n_layers)), (name, kind)


def test_cnn_channels():
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    graph = depgraph.trace(model, (x,))
    kinds = {g.kind for g in graph.groups()}
    assert kinds == {"channels"}
    sizes = sorted(g.num_units for g in graph.groups())
    assert sizes == [8, 12]  # the residual stream (stem + block output + head input) and the inner block
    residual = max(graph.groups(), key=lambda g: len(g.members))
    members = {(m.param, m.dim) for m in residual.members}
    assert {("stem.0.weight", 0), ("stem.1.running_mean", 0), ("block.3.weight", 0), ("block.0.weight", 1),
            ("head.weight", 1)} <= members
    for seed in range(3):
        plan = depgraph.Plan.random(graph, 0.4, seed=seed)
        with torch.no_grad():
            a = depgraph.mask(copy.deepcopy(model), plan)(x)
            b = depgraph.shrink(copy.deepcopy(model), plan)(x)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


class _GatedMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.gate, self.up, self.down = torch.nn.Linear(16, 24), torch.nn.Linear(16, 24), torch.nn.Linear(24, 16)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


class _EmbeddingLM(torch.nn.Module):
    """Token embedding, ``layers`` attention-free blocks (``block(hidden)``), a head: no attention anywhere."""

    def __init__(self, block, vocab=32, hidden=16, layers=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.layers = torch.nn.ModuleList(block(hidden) for _ in range(layers))
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_attention_free_language_model_has_hidden_and_mlp_groups():
    """A model that looks its input up in an embedding is a language model with or without attention: its
    per-layer widths are ``mlp`` groups (exact: removal == masking), its residual ``hidden``; a CNN keeps
    ``channels`` (test_cnn_channels)."""
    torch.manual_seed(0)
    model = _EmbeddingLM(lambda hidden: _GatedMLP()).eval()  # a state-space layer's MLP, its mixer left out
    x = torch.randint(0, 32, (2, 6))
    graph = depgraph.trace(model, (x,))
    assert {g.kind for g in graph.groups()} == {"hidden", "mlp"}
    mlp = graph.groups("mlp")
    assert sorted(g.layer for g in mlp) == [0, 1] and all(g.exact and g.num_units == 24 for g in mlp)
    plan = depgraph.Plan.from_units(graph, {g.id: list(range(0, 24, 3)) for g in mlp})
    with torch.no_grad():
        masked = depgraph.mask(copy.deepcopy(model), plan)(x)
        shrunk = depgraph.shrink(copy.deepcopy(model), plan)(x)
    torch.testing.assert_close(shrunk, masked, rtol=0, atol=1e-5)


class _MixFFN(torch.nn.Module):
    """An attention-free block (RWKV/xLSTM-like): a [1, 1, H] token-shift mix, a stale width attribute on the
    residual stream, and a ReLU feed-forward."""

    def __init__(self, hidden=16, inner=24):
        super().__init__()
        self.hidden_width = hidden  # no fixer rewrites it: the residual stream is blocked, the neurons are not
        self.norm = torch.nn.LayerNorm(hidden)
        self.mix = torch.nn.Parameter(torch.rand(1, 1, hidden))
        self.up = torch.nn.Linear(hidden, inner)
        self.down = torch.nn.Linear(inner, hidden)

    def forward(self, x):
        h = self.norm(x)
        shifted = torch.nn.functional.pad(h, (0, 0, 1, -1))
        h = h * self.mix + shifted * (1 - self.mix)
        return x + self.down(torch.relu(self.up(h)))


def test_attention_free_mlp_groups_survive_a_blocked_residual_stream():
    """RWKV/xLSTM: a stale width attribute blocks the residual stream, not the layers' ``mlp`` neurons."""
    torch.manual_seed(0)
    model = _EmbeddingLM(_MixFFN).eval()
    x = torch.randint(0, 32, (2, 6))
    graph = depgraph.trace(model, (x,))
    assert not graph.groups("channels")
    mlp = graph.groups("mlp")
    assert sorted(g.layer for g in mlp) == [0, 1] and all(g.exact and g.num_units == 24 for g in mlp)
    assert any("hidden_width" in r for b in graph.blocked for r in b["reasons"])  # the residual stream
    for seed in range(2):
        plan = depgraph.Plan.random(graph, 0.5, seed=seed, kinds=("mlp",))
        with torch.no_grad():
            masked = depgraph.mask(copy.deepcopy(model), plan)(x)
            shrunk = depgraph.shrink(copy.deepcopy(model), plan)(x)
        torch.testing.assert_close(shrunk, masked, rtol=0, atol=1e-5)
