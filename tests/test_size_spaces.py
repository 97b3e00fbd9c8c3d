"""A size read off a tensor follows the pruning only when that tensor's dim is in the space it sizes
(depgraph.sizes): sizes read off another tensor in the same spaces are exact, sizes read off a tensor in another
space of the same width (here the residual: 32 = 4 heads x 8) block the heads, for merges, ``new_empty`` and
fused ``split`` sizes alike."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import depgraph


class Attention(nn.Module):
    """SDPA self-attention over [b, t, 32], 4 heads of 8; ``how`` says where the merge's sizes come from. Only
    ``num_heads`` and ``head_dim`` are attributes (nothing equals the width 32)."""

    def __init__(self, how: str):
        super().__init__()
        self.num_heads, self.head_dim, self.how = 4, 8, how
        self.qkv = nn.Linear(32, 96)
        self.out_proj = nn.Linear(32, 32)

    def forward(self, x):
        b, t, width = x.size()
        if self.how == "split_off_input":  # fused qkv split by the input width, which equals the q width
            q, k, v = self.qkv(x).split(width, dim=-1)
        else:
            q, k, v = self.qkv(x).split(self.num_heads * self.head_dim, dim=-1)
        q, k, v = (s.view(b, t, self.num_heads, self.head_dim) for s in (q, k, v))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2)
        if self.how == "other_same_space":  # v has the very head spaces the merge sizes
            out = out.reshape(b, t, v.size(-2) * v.size(-1))
        elif self.how == "other_space":  # q's head_dim is a space of its own (q.k), not the values' head_dim
            out = out.reshape(b, t, q.size(-2) * q.size(-1))
        elif self.how == "new_empty_own":  # a buffer the size of the merged heads, read off them
            out = out.reshape(b, t, -1)
            out = out.new_empty(out.shape).copy_(out)
        elif self.how == "new_empty_input":  # the same buffer sized by the residual width: stale when heads shrink
            out = out.reshape(b, t, -1)
            out = out.new_empty(b, t, width).copy_(out)
        else:
            out = out.reshape(b, t, -1)
        return self.out_proj(out)


class Net(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.attn = nn.ModuleList(Attention(how) for _ in range(2))
        self.norms = nn.ModuleList(nn.LayerNorm(32) for _ in range(2))
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        for norm, attn in zip(self.norms, self.attn):
            x = x + attn(norm(x))
        return self.head(x)


def _removal_equals_masking(model, plan, x):
    with torch.no_grad():
        masked = depgraph.mask(copy.deepcopy(model), plan)(x)
        shrunk = depgraph.shrink(copy.deepcopy(model), plan, verify=False)(x)
    torch.testing.assert_close(shrunk, masked, rtol=0, atol=1e-5)


def _setup(how):
    torch.manual_seed(0)
    model = Net(how).eval()
    x = torch.randn(2, 5, 32)
    return model, x, depgraph.trace(model, (x,))


@pytest.mark.parametrize("how", ["other_same_space", "new_empty_own", "plain"])
def test_sizes_read_off_the_same_spaces_are_exact(how):
    model, x, graph = _setup(how)
    attention = graph.groups("attention")
    assert len(attention) == 2 and all(g.exact for g in attention), graph.blocked
    plan = depgraph.Plan.random(graph, 0.5, seed=0, kinds=("attention",))
    assert plan.params_removed() > 0
    _removal_equals_masking(model, plan, x)


@pytest.mark.parametrize("how,op", [("new_empty_input", "aten.new_empty"), ("split_off_input", "aten.split"),
                                    ("other_space", "aten.reshape")])
def test_sizes_read_off_the_residual_block_heads(how, op):
    """The width 32 read off the input equals the heads' width by value only: pruning heads would leave a
    32-wide buffer (a failing ``copy_``) or split the narrower fused projection at the old offsets. A merge sized
    by q's dims sizes the values' head_dim by q's: equal sizes, other spaces, so it is not proved either."""
    model, x, graph = _setup(how)
    assert not graph.groups("attention")
    reasons = [r for b in graph.blocked if any(p.startswith("attn.0.qkv") for p in b["params"]) for r in b["reasons"]]
    assert any(op in r and "at attn.0" in r for r in reasons), reasons


class Gate(nn.Module):
    """A per-channel gate over the MLP's hidden units: ``scale`` [1, 1, 64] expanded to the activation's shape,
    by the activation's own sizes or by a fixed width (``self.width`` is no attribute the shrinker rewrites)."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.width = how, 64
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        b, t, n = h.shape
        gate = torch.sigmoid(h).expand(b, t, n if self.how == "own" else self.width)
        return x + self.fc2(h * gate)


@pytest.mark.parametrize("how", ["own", "fixed"])
def test_expand_of_a_kept_dim_is_proved_or_blocks(how):
    torch.manual_seed(0)
    model, x = nn.Sequential(Gate(how), Gate(how)).eval(), torch.randn(2, 5, 32)
    graph = depgraph.trace(model, (x,))
    mlp = [g for g in graph.groups() if any(m.param.endswith("fc1.weight") for m in g.members)]  # "channels": no LM
    if how == "fixed":  # 64 would not follow the pruned hidden units: expand of a 48-wide dim to 64 fails
        assert not mlp
        reasons = [r for b in graph.blocked if "0.fc1.weight[0]" in b["params"] for r in b["reasons"]]
        assert any("aten.expand" in r and "at 0" in r for r in reasons), reasons
        return
    assert len(mlp) == 2 and all(g.exact for g in mlp)
    plan = depgraph.Plan.from_units(graph, {g.id: [0, 3, 7] for g in mlp})
    _removal_equals_masking(model, plan, x)


class GatedAttention(nn.Module):
    """Fused qkv over a 48-wide residual, 4 heads of 8 (``split_size`` = 32, which shrink rewrites), and a 32-wide
    gate branch of its own (``gate`` -> ``gate_out``): nothing entering the module is 32 wide, so only the tagged
    export can tell ``split(self.split_size)`` from ``split(g.size(-1))``, read off the gate's space."""

    def __init__(self, how: str):
        super().__init__()
        self.num_heads, self.head_dim, self.split_size, self.how = 4, 8, 32, how
        self.qkv, self.out_proj = nn.Linear(48, 96), nn.Linear(32, 48)
        self.gate, self.gate_out = nn.Linear(48, 32), nn.Linear(32, 48)

    def forward(self, x):
        b, t, _ = x.shape
        g = torch.relu(self.gate(x))
        q, k, v = self.qkv(x).split(self.split_size if self.how == "attribute" else g.size(-1), dim=-1)
        q, k, v = (s.view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for s in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        return x + self.out_proj(out) + self.gate_out(g)


@pytest.mark.parametrize("how", ["attribute", "gate"])
def test_split_equal_to_a_rewritten_attribute_must_be_that_attribute(how):
    torch.manual_seed(0)
    model, x = nn.Sequential(GatedAttention(how), GatedAttention(how)).eval(), torch.randn(2, 5, 48)
    graph = depgraph.trace(model, (x,))
    attention = graph.groups("attention")
    if how == "gate":
        assert not attention
        reasons = [r for b in graph.blocked if "0.qkv.weight[0]" in b["params"] for r in b["reasons"]]
        assert any("aten.split" in r and "at 0" in r for r in reasons), reasons
        return
    assert len(attention) == 2 and all(g.exact for g in attention)
    plan = depgraph.Plan.random(graph, 0.5, seed=0, kinds=("attention",))
    assert plan.params_removed() > 0
    _removal_equals_masking(model, plan, x)


class HeadBias(nn.Module):
    """A per-head score bias computed in a child module holding its own ``num_heads`` (which no shrink rewrites:
    only the attention module's attributes are)."""

    def __init__(self):
        super().__init__()
        self.num_heads = 4
        self.linear = nn.Linear(32, 8)

    def forward(self, h):
        r = self.linear(h).view(*h.shape[:-1], self.num_heads, -1)  # [b, t, 4, 2]
        return r.sum(-1).transpose(1, 2)[..., None]  # [b, 4, t, 1]


class BiasedAttention(nn.Module):
    """Eager attention over [b, t, 32], 4 heads of 8, plus ``HeadBias`` on the scores."""

    def __init__(self):
        super().__init__()
        self.num_heads, self.head_dim = 4, 8
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(32, 32) for _ in range(4))
        self.bias = HeadBias()

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        probs = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5 + self.bias(x), dim=-1)
        return x + self.o_proj((probs @ v).transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


def test_a_child_modules_own_head_count_is_not_rewritten():
    """The tagged export sees ``view(..., self.num_heads, -1)`` passed an attribute named like a head count, but
    it is the child's: pruning the heads would leave it at 4, so the heads are blocked at the child's view."""
    torch.manual_seed(0)
    model, x = nn.Sequential(BiasedAttention(), BiasedAttention()).eval(), torch.randn(2, 5, 32)
    graph = depgraph.trace(model, (x,))
    assert not graph.groups("attention")
    reasons = [r for b in graph.blocked if "0.q_proj.weight[0]" in b["params"] for r in b["reasons"]]
    assert any("aten.view" in r and "at 0.bias" in r for r in reasons), reasons
