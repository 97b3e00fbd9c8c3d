"""Ops that move data along a channel dim, or size it with fixed numbers, over an MLP's hidden dim: each
is either blocked with its reason or exact (removal == masking), and ``depgraph.prune`` never hands back a
model that differs from its mask."""
import copy

import pytest
import torch
from torch import nn

import depgraph
from depgraph.errors import PlanError


class Permute(torch.autograd.Function):
    """A custom autograd.Function that reverses the last dim (torch.export traces through it)."""

    @staticmethod
    def forward(ctx, x):
        return x.flip(-1)

    @staticmethod
    def backward(ctx, g):
        return g.flip(-1)


class Shifted(nn.Linear):
    """Linear(16 -> 8) over ``op(h)``; ``n`` is a module attribute equal to one of the literal sizes."""


OPS = {
    # name: (function of (module, h) -> tensor [2, 8, k], input width of the down projection, blocked?)
    "roll": (lambda m, h: torch.roll(h, 1, -1), 16, True),
    "sort": (lambda m, h: torch.sort(h, dim=-1).values, 16, True),
    "argsort": (lambda m, h: h + torch.argsort(h).to(h.dtype), 16, True),
    "topk": (lambda m, h: torch.topk(h, 16).values, 16, True),
    "cumsum": (lambda m, h: h.cumsum(-1), 16, True),
    "diff": (lambda m, h: torch.diff(h), 15, True),
    "flip": (lambda m, h: h.flip(-1), 16, True),
    "autograd_function": (lambda m, h: Permute.apply(h), 16, True),
    "view_attribute": (lambda m, h: h.view(2, 8, m.n, 4).transpose(-1, -2).reshape(2, 8, 16), 16, True),
    "split_fixed": (lambda m, h: torch.cat(h.split([6, 10], -1)[::-1], -1), 16, True),
    "cat_fixed_halves": (lambda m, h: torch.cat([h[..., 8:], h[..., :8]], -1), 16, "first half"),
    "reshape_from_shape": (lambda m, h: h.reshape(*h.shape[:-1], 2, -1).flatten(-2), 16, False),
    "chunk_product": (lambda m, h: (lambda a, b: a * b)(*m.pair(h).chunk(2, -1)), 16, False),
}


class Net(nn.Module):
    def __init__(self, op, width):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.pair = nn.Linear(16, 32)
        self.down = nn.Linear(width if op != "chunk_product" else 16, 8)
        self.n = 4
        self.op = op

    def forward(self, x):
        h = torch.relu(self.up(x))
        return self.down(OPS[self.op][0](self, h))


def _build(op):
    torch.manual_seed(0)
    return Net(op, OPS[op][1]).eval()


def _hidden_group(graph, model):
    """The group over up.weight's rows (the MLP dim the op acts on), or None when it is blocked."""
    for g in graph.groups():
        if any(m.param == "up.weight" and m.dim == 0 for m in g.members):
            return g
    return None


@pytest.mark.parametrize("op", sorted(OPS))
def test_op_is_blocked_or_exact(op):
    model = _build(op)
    x = torch.randn(2, 8, 8)
    graph = depgraph.trace(model, (x,))
    group = _hidden_group(graph, model)
    if OPS[op][2] == "first half":  # h[..., 8:] ++ h[..., :8]: the offset 8 fixes the first half only
        reasons = [r for b in graph.blocked if "up.weight[0]" in b["params"] and b["size"] == 8 for r in b["reasons"]]
        assert any("literal size 8 in aten.slice" in r for r in reasons), reasons
        assert group is not None and group.exact and group.num_units == 8  # the second half: exact, checked below
    elif OPS[op][2]:
        assert group is None or not group.exact, f"{op}: graded exact"
        reasons = [r for b in graph.blocked if "up.weight[0]" in b["params"] for r in b["reasons"]]
        reasons += [str(n) for n in graph.unsupported]
        assert reasons, f"{op}: blocked without a reason"
    else:
        assert group is not None and group.exact, f"{op}: expected an exact group"
    for g in graph.groups():
        if not g.exact:
            continue
        plan = depgraph.Plan.from_units(graph, {g.id: list(range(0, g.num_units, 3))})
        with torch.no_grad():
            masked = depgraph.mask(copy.deepcopy(model), plan)(x)
            shrunk = depgraph.shrink(copy.deepcopy(model), plan)(x)
        torch.testing.assert_close(shrunk, masked, rtol=0, atol=1e-5)


@pytest.mark.parametrize("op", ["roll", "split_fixed", "view_attribute", "reshape_from_shape"])
def test_prune_never_differs_from_its_mask(op):
    model = _build(op)
    x = torch.randn(2, 8, 8)
    graph = depgraph.trace(model, (x,))
    exact = [g for g in graph.groups() if g.exact]
    if not exact:
        with pytest.raises(PlanError):
            depgraph.Plan.from_scores(graph, {}, ratios={"channels": 0.5})
        return
    plan = depgraph.Plan.from_units(graph, {g.id: [0] for g in exact})
    with torch.no_grad():
        masked = depgraph.mask(copy.deepcopy(model), plan)(x)
        shrunk = depgraph.shrink(copy.deepcopy(model), plan, verify=False)(x)
    torch.testing.assert_close(shrunk, masked, rtol=0, atol=1e-5)


def test_roll_reads_dims_not_shifts():
    """aten.roll(self, shifts, dims): the rule must block ``dims`` (here 2), not the dim named by shifts (1)."""
    class R(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 4)

        def forward(self, x):  # x [2, 5, 4] -> [2, 5, 6]; roll by 1 along dim 2 (the neurons)
            return self.b(torch.roll(self.a(x), shifts=1, dims=2))

    graph = depgraph.trace(R().eval(), (torch.randn(2, 5, 4),))
    assert not [g for g in graph.groups() if g.exact and any(m.param == "a.weight" for m in g.members)]
