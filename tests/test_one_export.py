"""The trace runs the model's export once: the literal reads, the fills and the constant indices are all recorded
while the graph is traced (depgraph.evidence), and the graph is the one a plain export gives."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from torch import nn

import depgraph
from archs import ARCHS, VOCAB
from depgraph import reads
from depgraph.capture import capture
from depgraph.evidence import observe


@pytest.fixture
def exports(monkeypatch):
    """Every torch.export.export call made while the test runs."""
    calls = []
    inner = torch.export.export

    def counted(*args, **kwargs):
        calls.append(type(args[0]).__name__)
        return inner(*args, **kwargs)
    monkeypatch.setattr(torch.export, "export", counted)
    return calls


def _falcon():  # multi-query: a constant index (depgraph.indices) and a counted literal (num_heads + 2)
    torch.manual_seed(0)
    cfg = tf.FalconConfig(vocab_size=VOCAB, hidden_size=48, num_attention_heads=4, num_hidden_layers=2,
                          multi_query=True, new_decoder_architecture=False, use_cache=False)
    return tf.FalconForCausalLM(cfg).eval()


def _neox_japanese():  # baddbmm(torch.zeros(b * h, t, s), q, k): a fill sized off the query (depgraph.fills)
    torch.manual_seed(0)
    cfg = tf.GPTNeoXJapaneseConfig(vocab_size=VOCAB, hidden_size=48, num_attention_heads=4, num_hidden_layers=2,
                                   intermediate_multiple_size=2, use_cache=False)
    return tf.GPTNeoXJapaneseForCausalLM(cfg).eval()


@pytest.mark.parametrize("build", [ARCHS["llama-gqa"], _falcon, _neox_japanese], ids=["llama", "falcon", "neox-ja"])
def test_the_trace_exports_once_and_its_proofs_hold(exports, build):
    model = build()
    graph = depgraph.trace(model)
    assert exports == [type(model).__name__]  # the capture itself: no second, tagged export
    layers = model.config.num_hidden_layers
    attention = graph.groups("attention")  # every layer's heads need the recorded proofs to be exact
    assert len(attention) == layers and all(g.exact for g in attention), [g.id for g in attention]
    assert len(graph.groups("mlp")) == layers


def _nodes(cap):
    return [(n.op, str(n.target), repr(n.args), repr(n.kwargs)) for n in cap.graph.nodes]


def test_the_watched_graph_is_the_plain_exports():
    model = ARCHS["llama-gqa"]()
    cap, seen = observe(model)
    plain = capture(model)
    assert _nodes(cap) == _nodes(plain)
    assert not any(type(v) is not int for m in cap.module.modules() for v in vars(m).values()
                   if isinstance(v, int) and not isinstance(v, bool))  # the attributes are plain again
    assert seen.reads({"model.layers.0.self_attn"}).lines  # and the recorders saw the forward


class Attention(nn.Module):
    """Heads merged by ``self.embed_dim``: a literal the reads must see passed."""

    def __init__(self):
        super().__init__()
        self.embed_dim, self.num_heads = 32, 4
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.num_heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, t, self.embed_dim))


class Picky(nn.Module):
    """An attention under a root whose forward breaks when its own int attribute is tagged."""

    def __init__(self):
        super().__init__()
        self.width, self.attn = 32, Attention()

    def forward(self, x):
        if type(self.width) is not int:
            raise TypeError("width must be an int")
        return x + self.attn(x)


def test_a_forward_the_tags_break_falls_back_to_the_old_exports(exports):
    torch.manual_seed(0)
    model, x = Picky().eval(), torch.randn(2, 5, 32)
    graph = depgraph.trace(model, (x,))
    # the tagged export failed, then the plain capture and the reads' own export (only the attention module tagged)
    assert len(exports) == 3
    attention = graph.groups("attention")
    assert len(attention) == 1 and attention[0].exact
    with pytest.MonkeyPatch.context() as mp:  # without the reads' own export (no evidence): the merge is blocked
        mp.setattr(reads, "tagged_reads", lambda *a, **k: None)
        assert not [g for g in depgraph.trace(model, (x,)).groups("attention") if g.exact]


class OnlyTagged(int):
    """The ints of an export that tagged some attributes only (the rules the separate tagged export ran by)."""

    def __new__(cls, value, attribute):
        out = super().__new__(cls, value)
        out.attribute = attribute
        return out

    def __mul__(self, other):
        if isinstance(other, int) and not isinstance(other, bool) and \
                "+" not in self.attribute + getattr(other, "attribute", ""):
            return OnlyTagged(int(self) * int(other), f"{self.attribute}*{getattr(other, 'attribute', int(other))}")
        return int(self) * other

    __rmul__ = __mul__

    def __add__(self, other):
        if type(other) is int and other > 0 and self.attribute.isidentifier():
            return OnlyTagged(int(self) + other, f"{self.attribute}+{other}")
        return int(self) + other

    __radd__ = __add__


def test_names_are_those_an_export_tagging_only_those_modules_gives():
    """Random sums, products and differences of attributes (of two modules), sizes and plain ints: every result is
    named by depgraph.tags.name exactly as the ints of an export tagging only the chosen modules' attributes."""
    import random

    from depgraph.tags import Tagged, name

    rng = random.Random(0)
    for _ in range(3000):
        leaves = [(rng.choice(["attr", "attr", "size", "plain"]), rng.choice([-1, 0, 1, 2, 8]), f"a{i}",
                   f"m{rng.randint(0, 1)}") for i in range(rng.randint(1, 4))]
        only = frozenset(m for m in ("m0", "m1") if rng.random() < 0.5)
        ops = [(rng.choice("*+-"), rng.randrange(1 << 20)) for _ in range(rng.randint(1, 4))]

        def run(every: bool) -> list:
            vals = []
            for kind, v, attr, mod in leaves:
                if kind == "plain":
                    vals.append(v)
                elif kind == "size":
                    vals.append(Tagged(v, ("size", f"@1:{attr}")) if every else OnlyTagged(v, f"@1:{attr}"))
                else:
                    vals.append(Tagged(v, ("attr", attr, mod)) if every else
                                OnlyTagged(v, attr) if mod in only else v)
            for op, r in ops:
                x, y = vals[r % len(vals)], vals[(r >> 8) % len(vals)]
                vals.append(x * y if op == "*" else x + y if op == "+" else x - y)
            return vals
        for want, got in zip(run(False), run(True)):
            assert int(want) == int(got)
            assert name(got, only) == (want.attribute if isinstance(want, OnlyTagged) else None), (leaves, only, ops)


class FusedSplit(nn.Module):
    """GPT-2-like fused qkv over [b, t, 32], 4 heads of 8, split by ``split_size`` (rewritten by shrink) or by
    ``width``, an attribute shrink does not rewrite that holds the same value (the ambiguous literal)."""

    def __init__(self, by: str):
        super().__init__()
        self.num_heads, self.head_dim, self.split_size, self.width, self.by = 4, 8, 32, 32, by
        self.qkv, self.o_proj = nn.Linear(32, 96), nn.Linear(32, 32)

    def forward(self, x):
        b, t, _ = x.shape
        size = {"split_size": self.split_size, "width": self.width, "derived": self.width - 0}[self.by]
        q, k, v = self.qkv(x).split(size, dim=-1)  # ``width - 0``: a plain int, no tag tells where it came from
        q, k, v = (z.view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


def test_an_ambiguous_split_the_tagged_export_settles_needs_no_perturbed_export(exports):
    """``split(self.split_size)`` equals the unrewritten ``width``: the tagged export shows the rewritten attribute
    at the literal's place, so no perturbed export runs and the heads stay exact (removal == masking); split by
    ``width`` itself, the tags show the forward reads it (no perturbed export either): the heads are blocked; by
    ``width - 0``, which no tag names, the perturbed export runs and shows the forward reads ``width``: blocked."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    model = nn.Sequential(FusedSplit("split_size"), FusedSplit("split_size")).eval()
    graph = depgraph.trace(model, (x,))
    assert exports == ["Sequential"]
    attention = graph.groups("attention")
    assert len(attention) == 2 and all(g.exact for g in attention)
    plan = depgraph.Plan.random(graph, 0.5, seed=0, kinds=("attention",))
    with torch.no_grad():
        masked = depgraph.mask(copy.deepcopy(model), plan)(x)
        shrunk = depgraph.shrink(copy.deepcopy(model), plan, verify=False)(x)
    torch.testing.assert_close(shrunk, masked, rtol=0, atol=1e-5)
    exports.clear()
    blocked = depgraph.trace(nn.Sequential(FusedSplit("width"), FusedSplit("width")).eval(), (x,))
    assert exports == ["Sequential"]  # the tags show ``width`` itself at the literal's place: it is read
    assert not [g for g in blocked.groups("attention") if g.exact]
    exports.clear()
    derived = depgraph.trace(nn.Sequential(FusedSplit("derived"), FusedSplit("derived")).eval(), (x,))
    assert exports == ["Sequential", "Sequential"]  # untold by the tags: the perturbed export (width + 1) decides
    assert not [g for g in derived.groups("attention") if g.exact]


def _deepseek_v3():  # MLA: split([qk_nope_head_dim, v_head_dim]) and key[..., :qk_nope_head_dim], all = num_heads
    torch.manual_seed(0)
    cfg = tf.DeepseekV3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                              n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                              first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=2,
                              qk_nope_head_dim=4, v_head_dim=4, use_cache=False)
    return tf.DeepseekV3ForCausalLM(cfg).eval()


def test_ambiguous_literals_each_place_its_own_attribute_need_no_perturbed_export(exports, monkeypatch):
    """DeepSeek-V3's ``split(kv, [self.qk_nope_head_dim, self.v_head_dim])`` and ``key[..., :self.qk_nope_head_dim]``
    with both head dims equal to ``num_heads`` (rewritten): each place holds a different unrewritten attribute,
    which the tags name per place (a slice's bounds as ``aten.slice`` takes them): one export, and the same graph
    (groups, blocked reasons, the attributes read) as the two perturbed exports it used to take."""
    from depgraph import graph as graph_module

    model = _deepseek_v3()
    told = depgraph.trace(model)
    assert exports == [type(model).__name__]
    exports.clear()
    monkeypatch.setattr(graph_module, "_told", lambda ambiguous, follows: {})  # every ambiguous literal perturbed
    perturbed = depgraph.trace(model)
    assert exports == [type(model).__name__] * 3  # the capture and one perturbed export per head-dim attribute
    assert told.summary_dict() == perturbed.summary_dict()
    assert told._flow.stale == perturbed._flow.stale == {
        f"model.layers.{i}.self_attn:{a}" for i in range(2) for a in ("qk_nope_head_dim", "v_head_dim")}
    plan = depgraph.Plan.random(told, 0.5, seed=0, kinds=("mlp", "experts"))
    x = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        masked = depgraph.mask(copy.deepcopy(model), plan)(x).logits
        shrunk = depgraph.shrink(copy.deepcopy(model), plan, verify=False)(x).logits
    torch.testing.assert_close(shrunk, masked, rtol=0, atol=1e-5)


def test_slice_calls_are_the_slices_aten_takes():
    assert reads.slice_calls(4, (Ellipsis, slice(None, 3))) == [(3, 0, 3)]
    assert reads.slice_calls(4, (Ellipsis, slice(3, None))) == [(3, 3, 2 ** 63 - 1)]
    assert reads.slice_calls(3, (slice(None), None, slice(1, 2))) == [(2, 1, 2)]  # the slice of the unsqueezed
    assert reads.slice_calls(3, (slice(None), slice(None))) == []  # full slices make no node
    assert reads.slice_calls(3, (0, slice(1, 2))) == []  # an int index: not read here
    assert reads.slice_calls(3, (slice(0, 4, 2),)) == []  # a step: not read here
