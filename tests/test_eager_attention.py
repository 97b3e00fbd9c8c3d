"""Attention without SDPA: eager matmul -> softmax -> matmul (soft-capping, sliding windows, ALiBi, MQA,
fused qkv) and MLA, found exactly as SDPA's rule finds heads, with removal == masking and working shrunk models."""
import copy
import functools

import pytest
import torch
import transformers as tf

import depgraph
from archs import VOCAB, ids
from depgraph.shrink import attention_attributes

SMALL = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2)
MLA = dict(SMALL, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
           qk_nope_head_dim=8, v_head_dim=12, first_k_dense_replace=2)  # dense MLPs: MoE is not what is tested


def _lm(cfg_cls, model_cls, impl="eager", **kw):
    def build():
        torch.manual_seed(0)
        cfg = cfg_cls(**kw)
        cfg.use_cache = False
        cfg._attn_implementation = impl
        return getattr(tf, model_cls)(cfg).eval()
    return build


EAGER = {
    "llama-eager": _lm(tf.LlamaConfig, "LlamaForCausalLM", num_attention_heads=6, num_key_value_heads=2, **SMALL),
    "qwen2-eager": _lm(tf.Qwen2Config, "Qwen2ForCausalLM", num_attention_heads=4, num_key_value_heads=2, **SMALL),
    "gemma-eager": _lm(tf.GemmaConfig, "GemmaForCausalLM", num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                       **SMALL),
    "gemma2-softcap": _lm(tf.Gemma2Config, "Gemma2ForCausalLM", num_attention_heads=4, num_key_value_heads=2,
                          head_dim=12, attn_logit_softcapping=5.0, final_logit_softcapping=30.0, sliding_window=3,
                          query_pre_attn_scalar=12, **SMALL),
    "gpt2-eager": _lm(tf.GPT2Config, "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_inner=64,
                      n_positions=64, bos_token_id=0, eos_token_id=0),
    "gpt_bigcode-mqa": _lm(tf.GPTBigCodeConfig, "GPTBigCodeForCausalLM", vocab_size=VOCAB, n_embd=48, n_layer=2,
                           n_head=4, n_positions=64, multi_query=True, bos_token_id=0, eos_token_id=0),
    "deepseek_v3-mla": _lm(tf.DeepseekV3Config, "DeepseekV3ForCausalLM", **MLA),
    "deepseek_v2-mla": _lm(tf.DeepseekV2Config, "DeepseekV2ForCausalLM", **MLA),  # complex RoPE
}


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _modules_by_layer(group):
    return {depgraph.graph.layer_of(m) for m in group.modules}


@functools.lru_cache(maxsize=None)
def _traced(name):
    model = EAGER[name]()
    assert model.config._attn_implementation == "eager"
    return model, depgraph.trace(model)


@pytest.fixture(scope="module", params=sorted(EAGER))
def traced(request):
    return (request.param,) + _traced(request.param)


def test_attention_in_every_layer(traced):
    name, model, graph = traced
    att = graph.groups("attention")
    assert att and all(g.exact for g in att), (name, graph)
    covered = set().union(*(_modules_by_layer(g) for g in att))
    assert covered == set(range(model.config.num_hidden_layers)), name
    assert sorted(g.layer for g in graph.groups("mlp")) == list(range(model.config.num_hidden_layers)), name
    for g in att:  # head_dim is never a group of its own: nothing but heads, mlp neurons and the residual stream
        assert g.head_dim and g.num_units in (4, 6)
    assert not graph.groups("channels")


@pytest.mark.parametrize("kinds,gqa,seed", [(("attention",), "heads", 0), (("attention",), "kv", 1),
                                             (("attention", "mlp"), "heads", 1), (("attention", "mlp"), "kv", 0)],
                         ids=["heads", "kv-groups", "heads+mlp", "kv-groups+mlp"])
def test_removal_equals_masking(traced, kinds, gqa, seed):
    name, model, graph = traced
    plan = depgraph.Plan.random(graph, 0.5, seed=seed, kinds=kinds, gqa=gqa)
    if gqa == "kv" and not plan.entries:  # one shared kv head (MQA): no kv group can go
        assert all(g.gqa and g.gqa[0] == 1 for g in graph.groups("attention"))
        return
    assert plan.params_removed() > 0
    x = ids(seed)
    masked = _logits(depgraph.mask(copy.deepcopy(model), plan), x)
    shrunk_model = depgraph.shrink(copy.deepcopy(model), plan)
    shrunk = _logits(shrunk_model, x)
    assert not torch.allclose(masked, _logits(model, x), atol=1e-4), "the plan changed nothing"
    torch.testing.assert_close(shrunk, masked, rtol=0, atol=1e-5)
    n_removed = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in shrunk_model.parameters())
    assert n_removed == plan.params_removed()


@pytest.mark.parametrize("name", ["llama-eager", "qwen2-eager", "gemma-eager"])
def test_eager_groups_equal_sdpa_groups(name):
    eager, a = _traced(name)
    sdpa = copy.deepcopy(eager)
    sdpa.set_attn_implementation("sdpa")
    b = depgraph.trace(sdpa)

    def view(graph):
        return [(g.id, g.kind, g.num_units, g.gqa, g.exact, g.head_dim, g.modules,
                 sorted((m.param, m.dim, m.level, tuple(m.unit_of_index)) for m in g.members))
                for g in graph.groups()]

    assert view(a) == view(b)


@pytest.mark.parametrize("name,model_cls,cfg_cls,kw", [
    ("bloom", "BloomForCausalLM", tf.BloomConfig, dict(hidden_size=48, n_layer=2, n_head=4)),
    ("mpt", "MptForCausalLM", tf.MptConfig, dict(d_model=48, n_layers=2, n_heads=4, expansion_ratio=2,
                                                 max_seq_len=64)),
])
def test_alibi_heads_are_refused_with_the_reason(name, model_cls, cfg_cls, kw):
    """ALiBi slopes are computed in forward from the head count: pruning heads would change every slope."""
    model = _lm(cfg_cls, model_cls, vocab_size=VOCAB, **kw)()
    graph = depgraph.trace(model)
    assert not graph.groups("attention")
    heads = [b for b in graph.blocked if "arange" in b["reasons"][0]]  # one alibi tensor couples every layer's heads
    params = {p.split("[")[0] for b in heads for p in b["params"]}
    for layer in range(2):
        assert any(f".{layer}." in p and ("query_key_value" in p or "Wqkv" in p) for p in params), graph
    plan = depgraph.Plan.random(graph, 0.5, kinds=("mlp",))
    x = ids()
    torch.testing.assert_close(_logits(depgraph.shrink(copy.deepcopy(model), plan), x),
                               _logits(depgraph.mask(copy.deepcopy(model), plan), x), rtol=0, atol=1e-5)


def test_mla_latents_are_blocked_and_heads_cover_both_up_projections():
    graph = _traced("deepseek_v3-mla")[1]
    att = graph.group("attention.0")
    members = {(m.param.rsplit(".", 2)[-2], m.dim) for m in att.members}
    assert members == {("q_b_proj", 0), ("kv_b_proj", 0), ("o_proj", 1)}
    assert att.gqa is None  # the rope key shared by every head does not make it MQA: kv_b_proj has per-head rows
    latent = [b for b in graph.blocked if "model.layers.0.self_attn.q_a_proj.weight[0]" in b["params"]]
    assert latent and "normalised" in latent[0]["reasons"][0]


@pytest.mark.parametrize("name", ["gemma2-softcap", "deepseek_v3-mla"])
def test_shrunk_eager_model_round_trips(name, tmp_path):
    model, graph = _traced(name)
    plan = depgraph.Plan.from_units(graph, {"attention.0": [1, 3] if graph.group("attention.0").gqa else [1],
                                            "mlp.1": [0, 5, 7]})
    shrunk = depgraph.shrink(copy.deepcopy(model), plan)
    depgraph.save_pruned(shrunk, tmp_path / "m")
    loaded = depgraph.load_pruned(tmp_path / "m")
    x = ids()
    assert torch.equal(_logits(loaded, x), _logits(shrunk, x))


def test_attention_attributes_only_rewrite_the_sizes_they_hold():
    class Attn(torch.nn.Module):
        num_heads, num_key_value_heads, num_key_value_groups, embed_dim, head_dim = 8, 2, 4, 96, 16

    a = {"heads_before": 8, "heads_after": 4, "kv_before": 2, "kv_after": 1, "head_dim": 16}
    # embed_dim (96) is not heads x head_dim (128) here: it is another size and stays
    assert attention_attributes(Attn(), a) == {"num_heads": 4, "num_key_value_heads": 1, "num_key_value_groups": 4}


class EinsumAttention(torch.nn.Module):
    """XLNet-style attention over [t, b, h] activations, all by einsum: projections [h, n, d], a per-head bias on
    the queries, softmax over the key letter, the values' head_dim carried to the output projection."""

    def __init__(self, h=32, n=4, d=8):
        super().__init__()
        self.n_head, self.d_head = n, d
        self.q, self.k, self.v, self.o = (torch.nn.Parameter(torch.randn(h, n, d) * 0.2) for _ in range(4))
        self.r_w_bias = torch.nn.Parameter(torch.randn(n, d) * 0.1)

    def forward(self, x):
        q, k, v = (torch.einsum("ibh,hnd->ibnd", x, w) for w in (self.q, self.k, self.v))
        score = torch.einsum("ibnd,jbnd->bnij", q + self.r_w_bias, k) / self.d_head ** 0.5
        vec = torch.einsum("bnij,jbnd->ibnd", torch.softmax(score, dim=3), v)
        return torch.einsum("ibnd,hnd->ibh", vec, self.o)


class EinsumLM(torch.nn.Module):
    def __init__(self, vocab=VOCAB, h=32, layers=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, h)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(h) for _ in range(layers))
        self.attn = torch.nn.ModuleList(EinsumAttention(h) for _ in range(layers))
        self.head = torch.nn.Linear(h, vocab)

    def forward(self, ids):
        x = self.embed(ids).transpose(0, 1)  # [t, b, h]
        for norm, attn in zip(self.norms, self.attn):
            x = x + attn(norm(x))
        return self.head(x.transpose(0, 1))


def test_einsum_attention_heads_are_found_and_exact():
    torch.manual_seed(0)
    model, x = EinsumLM().eval(), ids()
    graph = depgraph.trace(model, (x,))
    att = graph.groups("attention")
    assert sorted(g.layer for g in att) == [0, 1] and all(g.exact and g.num_units == 4 and g.head_dim == 8 for g in att)
    members = {m.param for m in att[0].members}
    assert {"attn.0.q", "attn.0.k", "attn.0.v", "attn.0.o", "attn.0.r_w_bias"} <= members
    plan = depgraph.Plan.from_units(graph, {"attention.0": [1], "attention.1": [0, 3]})
    with torch.no_grad():
        masked = depgraph.mask(copy.deepcopy(model), plan)(x)
        shrunk_model = depgraph.shrink(copy.deepcopy(model), plan)
        shrunk = shrunk_model(x)
    torch.testing.assert_close(shrunk, masked, rtol=0, atol=1e-5)
    assert [a.n_head for a in shrunk_model.attn] == [3, 2] and shrunk_model.attn[1].o.shape == (32, 2, 8)
