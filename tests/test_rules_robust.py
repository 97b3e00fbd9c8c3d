"""Tracer robustness: a rule that cannot read its op blocks what it touches (strict: raises), rules for einsum,
complex views, no_grad regions, gather/index over non-prunable dims, and unique group ids."""
import copy

import pytest
import torch
from torch import nn

import depgraph
from depgraph.errors import UnsupportedOpError
from depgraph.rules import RULES


class MLP(nn.Module):
    """x [2, 5, 4] -> up (16) -> body -> down (4)."""

    def __init__(self, body):
        super().__init__()
        self.up, self.down = nn.Linear(4, 16), nn.Linear(16, 4)
        self.register_buffer("freqs", torch.polar(torch.ones(5, 8), torch.randn(5, 8)))
        self.body = body

    def forward(self, x):
        return self.down(self.body(self, torch.relu(self.up(x))))


def _exact_groups_verify(model, x):
    graph = depgraph.trace(model, (x,))
    for g in graph.groups():
        if g.exact:
            plan = depgraph.Plan.from_units(graph, {g.id: list(range(0, g.num_units, 3))})
            with torch.no_grad():
                masked = depgraph.mask(copy.deepcopy(model), plan)(x)
                shrunk = depgraph.shrink(copy.deepcopy(model), plan)(x)
            torch.testing.assert_close(shrunk, masked, rtol=0, atol=1e-5)
    return graph


def _neurons(graph):
    return [g for g in graph.groups() if g.exact and any(m.param == "up.weight" for m in g.members)]


def test_a_crashing_rule_blocks_with_its_name(monkeypatch):
    def broken(ctx):
        raise IndexError("tuple index out of range")
    monkeypatch.setitem(RULES, "relu", broken)
    model, x = MLP(lambda m, h: h).eval(), torch.randn(2, 5, 4)
    graph = depgraph.trace(model, (x,))
    assert not _neurons(graph)
    assert any("relu" in str(n) and "IndexError" in str(n) for n in graph.unsupported)
    with pytest.raises(UnsupportedOpError, match="relu"):
        depgraph.trace(model, (x,), strict=True)


@pytest.mark.parametrize("body,prunable", [
    (lambda m, h: torch.einsum("bti,bti->bti", h, h.tanh()), True),
    (lambda m, h: torch.einsum("bti,btj->btij", h, h).sum(-1), False),  # an activation outer product
])
def test_einsum_by_its_equation(body, prunable):
    graph = _exact_groups_verify(MLP(body).eval(), torch.randn(2, 5, 4))
    assert bool(_neurons(graph)) == prunable
    assert not graph.unsupported


def test_complex_rope_is_traced():
    def rope(m, h):
        z = torch.view_as_complex(h.reshape(2, 5, 8, 2)) * m.freqs
        return torch.view_as_real(z).flatten(-2)
    graph = _exact_groups_verify(MLP(rope).eval(), torch.randn(2, 5, 4))
    assert not graph.unsupported


def test_no_grad_region_is_descended():
    def body(m, h):
        with torch.no_grad():
            scale = h.abs() + 1
        return h * scale
    graph = _exact_groups_verify(MLP(body).eval(), torch.randn(2, 5, 4))
    assert _neurons(graph) and not graph.unsupported


@pytest.mark.parametrize("body", [
    lambda m, h: torch.gather(h, 1, h.argsort(1)),  # sorts along the positions
    lambda m, h: h[:, torch.tensor([4, 3, 2, 1, 0], device=h.device)],
    lambda m, h: h.index_select(1, torch.tensor([1, 0, 2, 4, 3], device=h.device)),
])
def test_moving_data_along_a_non_prunable_dim_keeps_the_neurons(body):
    graph = _exact_groups_verify(MLP(body).eval(), torch.randn(2, 5, 4))
    assert _neurons(graph) and not graph.unsupported


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(4, 6), nn.Linear(6, 4), nn.Linear(4, 5), nn.Linear(5, 4)
        self.layers = nn.ModuleList([nn.Identity(), nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 4))])

    def forward(self, x):
        return self.layers[1](torch.relu(self.b(torch.relu(self.a(x)))) + self.d(torch.relu(self.c(x))))


def test_group_ids_are_unique():
    graph = depgraph.trace(Blocks().eval(), (torch.randn(3, 4),))
    ids = [g.id for g in graph.groups()]
    assert len(ids) == len(set(ids)) and len(ids) >= 3, ids


def test_probe_reads_vocab_from_text_config():
    from transformers import Gemma3Config

    from depgraph.verify import probe_ids

    class Composite(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Gemma3Config()
            self.config.text_config.vocab_size = 50
            self.emb = nn.Embedding(50, 4)

    ids = probe_ids(Composite())
    assert ids is not None and int(ids.max()) < 50
