"""Fixed positions in a dim: Falcon's multi-query ``qkv.view(b, t, self.num_heads + 2, d)`` then ``[..., :-2, :]``
(the query heads), ``[..., [-2], :]`` (the key) and ``[..., [-1], :]`` (the value). Bounds and positions counted
from the end read a fixed tail (blocked), so the heads before it stay prunable; ``num_heads + 2`` follows the heads
kept (:mod:`depgraph.indices`, :class:`depgraph.reads.Tagged`). A position counted from the start past the heads, or
a fixed ``6``, blocks them."""
import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn

import depgraph
from archs import VOCAB, ids


class MultiQuery(nn.Module):
    """4 query heads of 8 and one shared key/value head in one fused projection of (4 + 2) * 8."""

    def __init__(self, variant: str):
        super().__init__()
        self.num_heads, self.head_dim, self.variant = 4, 8, variant
        self.qkv = nn.Linear(32, (4 + 2) * 8)
        self.dense = nn.Linear(32, 32)

    def forward(self, x):
        b, t, _ = x.shape
        slots = 6 if self.variant == "fixed_count" else self.num_heads + 2
        fused = self.qkv(x).view(b, t, slots, self.head_dim)
        if self.variant == "from_start":  # the key/value found by counting the heads: stale once heads go
            q, k, v = fused[..., :self.num_heads, :], fused[..., [self.num_heads], :], fused[..., [5], :]
        else:
            q, k, v = fused[..., :-2, :], fused[..., [-2], :], fused[..., [-1], :]
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k.expand_as(q), v.expand_as(q))
        return self.dense(out.transpose(1, 2).reshape(b, t, -1))


class Net(nn.Module):
    def __init__(self, variant: str):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.attn = nn.ModuleList(MultiQuery(variant) for _ in range(2))
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        for attn in self.attn:
            x = x + attn(self.norm(x))
        return self.head(x + self.fc2(torch.relu(self.fc1(x))))


def _traced(variant):
    torch.manual_seed(0)
    model, x = Net(variant).eval(), torch.randn(2, 5, 32)
    return model, x, depgraph.trace(model, (x,))


def _removal_equals_masking(model, graph, x, kinds, seed=0):
    plan = depgraph.Plan.random(graph, 0.5, seed=seed, kinds=kinds)
    assert plan.params_removed() > 0
    with torch.no_grad():
        masked = depgraph.mask(copy.deepcopy(model), plan)
        shrunk = depgraph.shrink(copy.deepcopy(model), plan, verify=False)
        torch.testing.assert_close(shrunk(x), masked(x), rtol=0, atol=1e-5)
    return shrunk


def test_heads_before_a_fixed_tail_are_exact():
    model, x, graph = _traced("from_end")
    attention = graph.groups("attention")
    assert len(attention) == 2 and all(g.exact and g.num_units == 4 for g in attention)
    for seed in (0, 1):
        shrunk = _removal_equals_masking(model, graph, x, ("attention", "mlp"), seed)
    assert {m.num_heads for m in shrunk.attn} != {4}  # the count the view reads was rewritten


@pytest.mark.parametrize("variant,reason", [("from_start", "dim indexed by a tensor"),
                                            ("fixed_count", "literal size 6 in aten.view")])
def test_positions_or_counts_that_do_not_follow_block_heads(variant, reason):
    model, x, graph = _traced(variant)
    assert not graph.groups("attention")
    reasons = [r for b in graph.blocked if any(p.startswith("attn.0.qkv.weight") for p in b["params"])
               for r in b["reasons"]]
    assert any(reason in r for r in reasons), reasons
    _removal_equals_masking(model, graph, x, tuple({g.kind for g in graph.groups() if g.exact}))


class Tail(nn.Module):
    """A 20-wide projection: ``[..., :-4]`` feeds an MLP-like branch, ``[..., -4:]`` a fixed 4-wide gate."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.gate = nn.Linear(32, 20), nn.Linear(16, 32), nn.Linear(4, 32)

    def forward(self, x):
        h = torch.relu(self.up(x))
        return self.down(h[..., :-4]) * self.gate(h[..., -4:])


def test_slice_bounds_counted_from_the_end_block_only_the_tail():
    torch.manual_seed(0)
    model, x = Tail().eval(), torch.randn(2, 5, 32)
    graph = depgraph.trace(model, (x,))
    mlp = [g for g in graph.groups() if any(m.param == "up.weight" for m in g.members)]
    assert len(mlp) == 1 and mlp[0].num_units == 16 and mlp[0].exact
    tail = [r for b in graph.blocked if "gate.weight[1]" in b["params"] for r in b["reasons"]]
    assert any("counted from the end" in r for r in tail), tail
    _removal_equals_masking(model, graph, x, (mlp[0].kind,))


def test_falcon_multi_query_heads_are_exact():
    """The real model code (a read-only ``config.head_dim`` property too, which shrink leaves to the rebuild)."""
    torch.manual_seed(0)
    cfg = tf.FalconConfig(vocab_size=VOCAB, hidden_size=48, num_attention_heads=4, num_hidden_layers=2,
                          multi_query=True, new_decoder_architecture=False, use_cache=False)
    model = tf.FalconForCausalLM(cfg).eval()
    graph = depgraph.trace(model)
    assert len(graph.groups("attention")) == 2
    plan = depgraph.Plan.random(graph, 0.5, seed=0, kinds=("attention", "mlp"))
    x = ids(0, batch=2, length=8)
    with torch.no_grad():
        masked = depgraph.mask(copy.deepcopy(model), plan)(x).logits
        shrunk = depgraph.shrink(copy.deepcopy(model), plan, verify=False)(x).logits
    torch.testing.assert_close(shrunk, masked, rtol=0, atol=1e-5)
