"""Tensors created filled with one value (zeros, ones, full) join the space they meet only when their size is read
off the dims they meet (:mod:`depgraph.fills`): GPT-NeoX-Japanese's ``baddbmm(torch.zeros(b * h, t, s), q, k)`` with
``b, h, t, d = q.size()`` keeps its heads exact; a fixed size, or a size read off another tensor of the same width,
blocks the space."""
import copy

import pytest
import torch
from torch import nn

import depgraph


class Attention(nn.Module):
    """Eager attention over [b, t, 32], 4 heads of 8; the scores start from a zeros tensor sized ``size``."""

    def __init__(self, size: str):
        super().__init__()
        self.num_heads, self.head_dim, self.size = 4, 8, size
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(32, 32) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape

        def heads(p):
            return p(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj), heads(self.k_proj), heads(self.v_proj)
        return self.o_proj(self._attn(q, k, v).transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def _attn(self, q, k, v):
        bsz, nh, tq, d = q.size()  # the sizes reach torch.zeros through a helper, as in GPT-NeoX-Japanese
        rows = {"read": bsz * nh, "fixed": 3 * 4}[self.size]
        q3, k3 = q.reshape(bsz * nh, tq, d), k.reshape(bsz * nh, k.size(-2), d)
        scores = torch.zeros(rows, tq, k.size(-2), dtype=q.dtype, device=q.device)
        scores = torch.baddbmm(scores, q3, k3.transpose(1, 2), beta=1.0, alpha=d ** -0.5)
        return torch.softmax(scores.view(bsz, nh, tq, -1), dim=-1) @ v


class MLP(nn.Module):
    """Two branches of 16 neurons; a ``fill`` tensor added to branch ``a``, its width from ``width``."""

    def __init__(self, fill: str, width: str):
        super().__init__()
        self.fill, self.width = fill, width
        self.up_a, self.up_b = nn.Linear(32, 16), nn.Linear(32, 16)
        self.down_a, self.down_b = nn.Linear(16, 32), nn.Linear(16, 32)

    def forward(self, x):
        a, bb = torch.relu(self.up_a(x)), torch.relu(self.up_b(x))
        n = {"own": a.size(-1), "other": bb.size(-1), "fixed": 16}[self.width]
        shape = (a.size(0), a.size(1), n)
        on = dict(device=a.device)
        c = {"zeros": lambda: torch.zeros(shape, **on), "ones": lambda: torch.ones(shape, **on),
             "full": lambda: torch.full(shape, 0.5, **on), "new_ones": lambda: a.new_ones(shape)}[self.fill]()
        a = a * c if self.fill != "zeros" else a + c
        return self.down_a(a) + self.down_b(bb)


class Net(nn.Module):
    def __init__(self, size="read", fill="zeros", width="own"):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.attn = nn.ModuleList(Attention(size) for _ in range(2))
        self.mlp = nn.ModuleList(MLP(fill, width) for _ in range(2))
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        for attn, mlp in zip(self.attn, self.mlp):
            x = x + attn(self.norm(x))
            x = x + mlp(x)
        return self.head(x)


def _traced(**kw):
    torch.manual_seed(0)
    model, x = Net(**kw).eval(), torch.randn(3, 5, 32)  # b * h = 12: no attribute's value
    return model, x, depgraph.trace(model, (x,))


def _removal_equals_masking(model, graph, x, kinds):
    plan = depgraph.Plan.random(graph, 0.5, seed=0, kinds=kinds)
    assert plan.params_removed() > 0
    with torch.no_grad():
        masked = depgraph.mask(copy.deepcopy(model), plan)(x)
        shrunk = depgraph.shrink(copy.deepcopy(model), plan, verify=False)(x)
    torch.testing.assert_close(shrunk, masked, rtol=0, atol=1e-5)


def _branch_a(graph, layer):
    return [g for g in graph.groups("mlp") if any(m.param == f"mlp.{layer}.up_a.weight" for m in g.members)]


def _reasons(graph, param):
    return [r for b in graph.blocked if any(p.startswith(param) for p in b["params"]) for r in b["reasons"]]


def test_zeros_sized_off_the_query_keeps_heads_exact():
    model, x, graph = _traced(size="read")
    attention = graph.groups("attention")
    assert len(attention) == 2 and all(g.exact for g in attention)
    _removal_equals_masking(model, graph, x, ("attention",))


def test_zeros_of_a_fixed_size_blocks_heads():
    model, x, graph = _traced(size="fixed")  # 3 * 4 equals b * h here, but does not follow the heads kept
    assert not graph.groups("attention")
    reasons = _reasons(graph, "attn.0.q_proj.weight")
    assert any("tensor created from a fixed size (zeros at attn.0)" in r for r in reasons), reasons
    _removal_equals_masking(model, graph, x, ("mlp",))


@pytest.mark.parametrize("fill", ["zeros", "ones", "full", "new_ones"])
def test_fill_sized_off_the_branch_it_meets_is_exact(fill):
    model, x, graph = _traced(fill=fill)
    assert all(len(_branch_a(graph, i)) == 1 and _branch_a(graph, i)[0].exact for i in range(2))
    _removal_equals_masking(model, graph, x, ("mlp",))


@pytest.mark.parametrize("width", ["other", "fixed"])
def test_fill_sized_otherwise_blocks_the_branch(width):
    """A width read off the other branch (the same size, another space) or written as a number does not follow the
    neurons pruned from branch ``a``: that branch is blocked."""
    model, x, graph = _traced(width=width)
    assert not _branch_a(graph, 0) and not _branch_a(graph, 1)
    assert any("tensor created from a fixed size" in r for r in _reasons(graph, "mlp.0.up_a.weight"))
    _removal_equals_masking(model, graph, x, ("attention",))
