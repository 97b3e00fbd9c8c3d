"""Split sizes and slice bounds read off tensors (depgraph.sizes.SizeSpaces.sizes_part): exact when the size is
read off exactly the space it sizes (another tensor's dim in that space, or half of a dim that is two copies of it
concatenated, ``h.split(h.size(-1) // 2, -1)`` over a fused gate ++ up), blocked otherwise (a fixed number; half
of two different spaces side by side, whose midpoint moves when only one of them is pruned). Slice bounds
(``h[..., :n]``) are not proved this way yet: the export's record skips the ints inside slices."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import depgraph
from masking import blocked_reasons, groups_of, removal_is_masking

HALVES = {
    "split": lambda h, n: h.split(n, -1),
    "split_with_sizes": lambda h, n: h.split([n, n], -1),
}


class GatedMLP(nn.Module):
    """A fused gate ++ up projection halved by ``how`` at ``h.size(-1) // 2`` (or a fixed 64)."""

    def __init__(self, how: str, fixed: bool = False):
        super().__init__()
        self.how, self.fixed = how, fixed
        self.gate_up, self.down = nn.Linear(32, 128), nn.Linear(64, 32)

    def forward(self, x):
        h = self.gate_up(x)
        gate, up = HALVES[self.how](h, 64 if self.fixed else h.size(-1) // 2)
        return x + self.down(torch.relu(gate) * up)


class SideBySide(nn.Module):
    """Two projections in spaces of their own, concatenated and split again: by their own sizes (``own``), or at
    half the whole (``half``: wrong once only one side is pruned)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a, self.b = nn.Linear(32, 48), nn.Linear(32, 48)
        self.down_a, self.down_b = nn.Linear(48, 32), nn.Linear(48, 32)

    def forward(self, x):
        a, b = torch.relu(self.a(x)), torch.relu(self.b(x))
        h = torch.cat([a, b], -1)
        p, q = h.split([a.size(-1), b.size(-1)] if self.how == "own" else h.size(-1) // 2, -1)
        return x + self.down_a(p) + self.down_b(q)


def _traced(block):
    torch.manual_seed(0)
    model, x = nn.Sequential(block(), block()).eval(), torch.randn(2, 5, 32)
    return model, x, depgraph.trace(model, (x,))


@pytest.mark.parametrize("how", sorted(HALVES))
def test_halves_read_off_a_fused_gate_up_are_exact(how):
    model, x, graph = _traced(lambda: GatedMLP(how))
    neurons = groups_of(graph, "0.gate_up.weight")
    assert len(neurons) == 1 and neurons[0].exact and neurons[0].num_units == 64, \
        blocked_reasons(graph, "0.gate_up")
    removal_is_masking(model, x, graph, {neurons[0].id: [0, 9, 63]})


@pytest.mark.parametrize("how", sorted(HALVES))
def test_halves_at_a_fixed_number_block(how):
    model, x, graph = _traced(lambda: GatedMLP(how, fixed=True))
    assert not groups_of(graph, "0.gate_up.weight")
    assert any("literal size 64 in aten." in r and " at 0 " in r for r in blocked_reasons(graph, "0.gate_up")), \
        blocked_reasons(graph, "0.gate_up")


def test_sizes_read_off_each_side_are_exact():
    model, x, graph = _traced(lambda: SideBySide("own"))
    a, b = groups_of(graph, "0.a.weight"), groups_of(graph, "0.b.weight")
    assert len(a) == len(b) == 1 and a[0].exact and b[0].exact and a[0] is not b[0]
    removal_is_masking(model, x, graph, {a[0].id: [0, 1, 2, 3, 4], b[0].id: [7]})


def test_half_of_two_different_spaces_blocks_both():
    model, x, graph = _traced(lambda: SideBySide("half"))
    assert not groups_of(graph, "0.a.weight") and not groups_of(graph, "0.b.weight")
    reasons = blocked_reasons(graph, "0.a")
    assert any("literal size 48 in aten.split" in r for r in reasons), reasons
