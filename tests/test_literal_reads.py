"""A merge sized by a value equal to an attention attribute is owned only when the forward passes that attribute
itself: TrOCR's ``attn_output.reshape(bsz, tgt_len, embed_dim)`` with ``bsz, tgt_len, embed_dim =
hidden_states.size()`` equals ``self.embed_dim`` by value, but keeps the residual width when heads are pruned."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import depgraph


class Attention(nn.Module):
    """Self-attention over [b, t, 32]: 4 heads of 8; ``merge`` says where the merged width comes from."""

    def __init__(self, merge: str, attr: str = "embed_dim"):
        super().__init__()
        self.num_heads, self.head_dim, self.merge = 4, 8, merge
        if attr:  # the width as an attribute (None: only the head count and head size are kept)
            setattr(self, attr, 32)
        self.width_attr = attr
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(32, 32) for _ in range(4))

    def forward(self, x):
        bsz, tgt_len, embed_dim = x.size()

        def heads(t):
            return t.view(bsz, tgt_len, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        out = out.transpose(1, 2).contiguous()
        if self.merge == "helper":  # GPT-Neo: the attributes reach the view through a helper method
            return self.out_proj(self._merge_heads(out, self.num_heads, self.head_dim))
        if self.merge == "helper_input":  # the same helper handed the width read off the input: stale
            return self.out_proj(self._merge_width(out, embed_dim))
        if self.merge == "own_shape":  # GPT-1: the merged width is the product of the tensor's own dims
            return self.out_proj(out.view(*out.size()[:-2], out.size(-2) * out.size(-1)))
        width = {"input": embed_dim, "attribute": getattr(self, self.width_attr or "", None), "minus_one": -1}[self.merge]
        return self.out_proj(out.reshape(bsz, tgt_len, width))

    def _merge_heads(self, t, num_heads, head_dim):
        return t.view(t.size()[:-2] + (num_heads * head_dim,))

    def _merge_width(self, t, width):
        return t.view(t.size()[:-2] + (width,))


class Block(nn.Module):
    def __init__(self, merge: str, attr: str):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.self_attn = Attention(merge, attr)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        x = x + self.self_attn(self.norm(x))
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, merge: str, attr: str = "embed_dim"):
        super().__init__()
        self.layers = nn.ModuleList(Block(merge, attr) for _ in range(2))
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _setup(merge, attr="embed_dim"):
    torch.manual_seed(0)
    model = Net(merge, attr).eval()
    x = torch.randn(2, 5, 32)
    return model, x, depgraph.trace(model, (x,))


def _masked_and_shrunk(model, graph, x, kinds):
    groups = [g for g in graph.groups() if g.kind in kinds]
    plan = depgraph.Plan.from_units(graph, {g.id: [0] for g in groups})
    with torch.no_grad():
        masked = depgraph.mask(copy.deepcopy(model), plan)(x)
        shrunk = depgraph.shrink(copy.deepcopy(model), plan, verify=False)(x)
    return masked, shrunk


@pytest.mark.parametrize("merge,attr", [("input", "embed_dim"), ("input", "hidden_size"),  # rewritten or never
                                       ("helper_input", "embed_dim")])
def test_merge_read_off_the_input_shape_blocks_heads_and_hidden(merge, attr):
    model, x, graph = _setup(merge, attr)
    assert not [g for g in graph.groups() if g.kind == "attention"]
    reasons = [r for b in graph.blocked if "layers.0.self_attn.q_proj.weight" in " ".join(b["params"])
               for r in b["reasons"]]
    assert any(op in r and "layers.0.self_attn" in r for op in ("aten.reshape", "aten.view") for r in reasons), reasons
    # the residual width is what the merge really reads: pruning it would break the reshape
    assert not [g for g in graph.groups() if g.kind == "hidden"]
    hidden = [r for b in graph.blocked if "layers.0.norm.weight[0]" in b["params"] for r in b["reasons"]]
    assert any("read off a tensor's shape" in r and "at layers.0.self_attn" in r for r in hidden), hidden
    masked, shrunk = _masked_and_shrunk(model, graph, x, ("mlp",))  # the MLP stays exact
    torch.testing.assert_close(shrunk, masked, rtol=0, atol=1e-5)


@pytest.mark.parametrize("merge,attr", [("attribute", "embed_dim"), ("minus_one", "embed_dim"),
                                       ("helper", "embed_dim"), ("own_shape", "embed_dim"),
                                       ("minus_one", None), ("helper", None), ("own_shape", None)])
def test_merge_by_the_attribute_or_minus_one_is_exact(merge, attr):
    """With no attribute equal to the merged width (``attr=None``) the merge is proved all the same when it is
    passed the product of the rewritten counts, or the product of the dims of the very tensor it reshapes."""
    model, x, graph = _setup(merge, attr)
    attention = [g for g in graph.groups() if g.kind == "attention"]
    assert len(attention) == 2 and all(g.exact for g in attention)
    masked, shrunk = _masked_and_shrunk(model, graph, x, ("attention", "mlp"))
    torch.testing.assert_close(shrunk, masked, rtol=0, atol=1e-5)


def repeat_kv(h, n_rep):
    """transformers' repeat_kv: the kv head count is read off the tensor's shape, ``n_rep`` passed in."""
    b, kv, s, d = h.shape
    return h[:, :, None, :, :].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


class GQAAttention(nn.Module):
    """Eager GQA attention over [b, t, 32]: 4 query heads of 8 on 2 kv heads (StableLM-like). The first ``rot``
    dims of each head are scaled by a table handed in from outside (a perturbed ``rot`` breaks the forward), and
    ``rot`` equals the head count; ``n_rep`` says where ``repeat_kv``'s repeat count comes from."""

    def __init__(self, n_rep: str):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim, self.rot = 4, 2, 8, 4
        self.num_key_value_groups, self.n_rep = 2, n_rep
        self.q_proj, self.o_proj = nn.Linear(32, 32), nn.Linear(32, 32)
        self.k_proj, self.v_proj = nn.Linear(32, 16), nn.Linear(32, 16)

    def forward(self, x, table):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        q = torch.cat([q[..., :self.rot] * table, q[..., self.rot:]], dim=-1)
        n_rep = self.num_key_value_groups if self.n_rep == "attribute" else 2
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        probs = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out)


class GQANet(nn.Module):
    def __init__(self, n_rep: str):
        super().__init__()
        self.table = nn.Parameter(torch.randn(4))  # enters each attention module from outside: size 4 = heads
        self.layers = nn.ModuleList(GQAAttention(n_rep) for _ in range(2))
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x, self.table)
        return self.head(x)


def test_repeat_kv_and_a_coinciding_rope_width_are_exact():
    """``view(b, t, self.num_heads, d)`` equals ``rot`` too, whose perturbed export breaks: the tagged export shows
    the view passed ``num_heads``; ``repeat_kv``'s merge ``kv * n_rep`` (kv read off the tensor it expanded,
    ``n_rep`` the rewritten ``num_key_value_groups``) follows the heads kept, under both GQA policies."""
    torch.manual_seed(0)
    model, x = GQANet("attribute").eval(), torch.randn(2, 5, 32)
    graph = depgraph.trace(model, (x,))
    attention = graph.groups("attention")
    assert len(attention) == 2 and all(g.exact and g.gqa == (2, 2) for g in attention)
    for gqa in ("heads", "kv"):
        plan = depgraph.Plan.random(graph, 0.5, seed=0, kinds=("attention",), gqa=gqa)
        assert plan.params_removed() > 0
        with torch.no_grad():
            masked = depgraph.mask(copy.deepcopy(model), plan)(x)
            shrunk = depgraph.shrink(copy.deepcopy(model), plan, verify=False)(x)
        torch.testing.assert_close(shrunk, masked, rtol=0, atol=1e-5)


def test_repeat_kv_by_a_fixed_count_blocks_heads():
    """``repeat_kv(k, 2)``: the repeat count is no attribute shrink rewrites, so the merge is not proved."""
    torch.manual_seed(0)
    model, x = GQANet("fixed").eval(), torch.randn(2, 5, 32)
    graph = depgraph.trace(model, (x,))
    assert not graph.groups("attention")
    reasons = [r for b in graph.blocked for r in b["reasons"] if "layers.0" in r]
    assert any("aten.reshape" in r or "aten.view" in r for r in reasons), reasons


def test_merge_read_off_the_input_shape_with_no_width_attribute_blocks_heads():
    """No attribute equals the merged width 32 (only ``num_heads`` and ``head_dim``): the literal is still one
    the forward must be seen to pass from something that follows the heads, and it is not."""
    model, x, graph = _setup("input", None)
    assert not [g for g in graph.groups() if g.kind == "attention"]
    reasons = [r for b in graph.blocked if "layers.0.self_attn.q_proj.weight" in " ".join(b["params"])
               for r in b["reasons"]]
    assert any("aten.reshape" in r and "layers.0.self_attn" in r and "no module attribute" in r
               for r in reasons), reasons
    assert not [g for g in graph.groups() if g.kind == "hidden"]  # the width it reads off the residual
    masked, shrunk = _masked_and_shrunk(model, graph, x, ("mlp",))
    torch.testing.assert_close(shrunk, masked, rtol=0, atol=1e-5)


def test_verify_without_a_probe_warns():
    """A model with no vocabulary gives verify=True nothing to probe with: it says so instead of passing silently."""
    model, x, graph = _setup("attribute")
    plan = depgraph.Plan.from_units(graph, {g.id: [0] for g in graph.groups() if g.kind == "attention"})
    with pytest.warns(UserWarning, match="no token vocabulary"):
        depgraph.shrink(model, plan, verify=True)
