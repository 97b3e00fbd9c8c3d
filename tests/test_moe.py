"""Routed experts: whole-expert removal and per-expert neuron removal equal masking (fp32, 1e-5), where
masking an expert zeroes its parameters and gives it a router logit of -inf; top-k is respected."""
import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import depgraph
from depgraph import PlanError
from moe_archs import (MOE_CONFIGS, VOCAB, argmax_grouped_lm, biased_router_lm, build_moe, dense_scatter_lm, ids,
                       sigmoid_lm, sparse_mixer_lm, unfused_lm)

IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")


@pytest.fixture(scope="module", params=sorted(MOE_CONFIGS))
def traced(request):
    model = build_moe(request.param)
    return request.param, model, depgraph.trace(model)


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def _expert_neurons(graph, layer):
    """The fused per-expert MLP neuron group of a layer: the space along the experts' down_proj input."""
    (g,) = [g for g in graph.groups() if g.layer == layer and g.kind != "experts"
            and any("experts.down_proj" in m.param for m in g.members)]
    return g


def _check(model, plan, x, implementations=IMPLEMENTATIONS):
    masked = _logits(depgraph.mask(copy.deepcopy(model), plan), x)
    shrunk = depgraph.shrink(copy.deepcopy(model), plan)
    assert not torch.allclose(masked, _logits(model, x), atol=1e-4), "the plan changed nothing"
    for impl in implementations:  # the shrunk model runs with every experts implementation
        shrunk.set_experts_implementation(impl)
        torch.testing.assert_close(_logits(shrunk, x), masked, rtol=0, atol=1e-5, msg=f"experts={impl}")
    removed = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in shrunk.parameters())
    assert removed == plan.params_removed()
    return shrunk


def _removal_equals_masking(model, graph, units, x):
    """Plan ``units`` ({group id: units}) on a hand-written model: it changes the output, shrunk == masked."""
    plan = depgraph.Plan.from_units(graph, units)
    masked = _logits(depgraph.mask(copy.deepcopy(model), plan), x)
    shrunk = depgraph.shrink(copy.deepcopy(model), plan)
    assert not torch.allclose(masked, _logits(model, x), atol=1e-4), "the plan changed nothing"
    torch.testing.assert_close(_logits(shrunk, x), masked, rtol=0, atol=1e-5)
    return shrunk


def test_experts_group_per_layer(traced):
    name, model, graph = traced
    groups = graph.groups("experts")
    assert [g.layer for g in groups] == list(range(model.config.num_hidden_layers))
    n_experts = MOE_CONFIGS[name][2]
    for g in groups:
        assert g.exact and g.num_units == n_experts and g.min_units == 2
        members = {(m.param.rsplit(".", 1)[-1], m.dim) for m in g.members}
        assert {("gate_up_proj", 0), ("down_proj", 0)} <= members
        assert ("weight", 0) in members  # the router row
        assert g.routing["router"][0] in {m.param for m in g.members}
        if name == "gpt_oss":  # router bias and per-expert biases go with their expert
            assert {("bias", 0), ("gate_up_proj_bias", 0), ("down_proj_bias", 0)} <= members


def test_fused_expert_neuron_group_per_layer(traced):
    name, model, graph = traced
    for g in graph.groups("experts"):
        neurons = _expert_neurons(graph, g.layer)
        assert neurons.exact and neurons.num_units == 32
    # the residual stream is found through the experts ("channels" while eager attention is not traced)
    assert [g for g in graph.groups(("hidden", "channels")) if g.layer is None and g.num_units == 64]


@pytest.mark.parametrize("seed", [0, 1])
def test_expert_removal_equals_masking(traced, seed):
    name, model, graph = traced
    plan = depgraph.Plan.random(graph, 0.5, seed=seed, kinds=("experts",))
    shrunk = _check(model, plan, ids(seed))
    for e in plan.entries:  # expert counts rewritten on the router and experts modules
        for path in e.experts["modules"]:
            mod = shrunk.get_submodule(path)
            if hasattr(mod, "num_experts"):
                assert mod.num_experts == e.units_after


@pytest.mark.parametrize("seed", [0, 1])
def test_expert_neuron_removal_equals_masking(traced, seed):
    name, model, graph = traced
    rng = np.random.default_rng(seed)
    groups = [_expert_neurons(graph, layer) for layer in range(model.config.num_hidden_layers)]
    plan = depgraph.Plan.from_units(graph, {g.id: rng.choice(g.num_units, 8, replace=False) for g in groups})
    _check(model, plan, ids(seed))


def test_fused_expert_widths_stay_grouped_mm_aligned(traced):
    name, model, graph = traced
    g = _expert_neurons(graph, 0)
    assert g.align == 8
    with pytest.raises(PlanError, match="multiple of 8"):
        depgraph.Plan.from_units(graph, {g.id: list(range(13))})
    plan = depgraph.Plan.random(graph, 0.4, kinds=(g.kind,))
    assert all(e.units_after % 8 == 0 for e in plan.entries if e.group == g.id)


def test_experts_and_neurons_together(traced):
    name, model, graph = traced
    removals = {g.id: [1, 2] for g in graph.groups("experts")}
    removals.update({_expert_neurons(graph, g.layer).id: list(range(0, 32, 4)) for g in graph.groups("experts")})
    _check(model, depgraph.Plan.from_units(graph, removals), ids(2))


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_zeroing_the_router_row_alone_is_not_removal(name):
    """Why masking sets the logit to -inf: a zeroed router row still takes softmax mass and can be selected."""
    model = build_moe(name)
    graph = depgraph.trace(model)
    plan = depgraph.Plan.from_units(graph, {g.id: [0, 1] for g in graph.groups("experts")})
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for p, dims in plan.removed_by_param().items():
            for d, idx in dims.items():
                zeroed.get_parameter(p).index_fill_(d, torch.tensor(idx), 0)
    shrunk = depgraph.shrink(copy.deepcopy(model), plan)
    x = ids(3)
    assert (_logits(zeroed, x) - _logits(shrunk, x)).abs().max() > 1e-3
    torch.testing.assert_close(_logits(depgraph.mask(copy.deepcopy(model), plan), x), _logits(shrunk, x),
                               rtol=0, atol=1e-5)


def test_fewer_experts_than_top_k_is_refused(traced):
    name, model, graph = traced
    g = graph.groups("experts")[0]
    with pytest.raises(PlanError, match=r"top_k=2") as err:
        depgraph.Plan.from_units(graph, {g.id: list(range(g.num_units - 1))})
    assert "\n" not in str(err.value)
    depgraph.Plan.from_units(graph, {g.id: list(range(g.num_units - 2))})  # exactly top_k left: legal
    plan = depgraph.Plan.random(graph, 0.99, kinds=("experts",))
    assert all(e.units_after == 2 for e in plan.entries)


def test_save_load_round_trip(traced, tmp_path):
    name, model, graph = traced
    groups = graph.groups("experts")
    uniform = depgraph.Plan.from_units(graph, {g.id: [0] for g in groups})
    shrunk = depgraph.shrink(copy.deepcopy(model), uniform)
    assert shrunk.config.depgraph["uniform"] is True
    assert shrunk.config.num_experts_per_tok == 2
    depgraph.save_pruned(shrunk, tmp_path / "u")
    x = ids(4)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "u").eval()
    torch.testing.assert_close(_logits(stock, x), _logits(shrunk, x), rtol=0, atol=0)
    uneven = depgraph.Plan.from_units(graph, {groups[0].id: [1], groups[1].id: [0, 2]})
    shrunk = depgraph.shrink(copy.deepcopy(model), uneven)
    assert shrunk.config.depgraph["uniform"] is False
    depgraph.save_pruned(shrunk, tmp_path / "n")
    loaded = depgraph.load_pruned(tmp_path / "n")
    assert torch.equal(_logits(loaded, x), _logits(shrunk, x))
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "n", trust_remote_code=True).eval()  # modeling file
    torch.testing.assert_close(_logits(stock, x), _logits(shrunk, x), rtol=0, atol=0)


def test_activation_scores_routed_mass_and_plan(traced):
    name, model, graph = traced
    calib = ids(5, batch=4, length=16)
    scores = depgraph.score(model, graph, calib, method="activation", kinds=("experts",), progress=False)
    for g in graph.groups("experts"):
        s = scores[g.id]
        assert s.shape == (g.num_units,) and (s >= 0).all()
        assert 0 < s.sum() <= calib.numel() + 1e-6  # each token routes at most its whole probability mass
    plan = depgraph.Plan.from_scores(graph, scores, target=0.1, kinds=("experts",))
    for e in plan.entries:
        order = scores[e.group].argsort(kind="stable")
        assert sorted(e.units) == sorted(order[:len(e.units)].tolist())
        assert e.units_after >= 2
    shrunk = depgraph.shrink(copy.deepcopy(model), plan)
    removed = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in shrunk.parameters())
    assert removed == plan.params_removed() > 0


def test_taylor_scores_come_from_routed_tokens(traced):
    name, model, graph = traced
    scores = depgraph.score(model, graph, ids(6, batch=2, length=16), method="taylor", kinds=("experts",),
                            progress=False)
    for g in graph.groups("experts"):
        assert (scores[g.id] > 0).any() and (scores[g.id] >= 0).all()


def test_prune_experts_end_to_end():
    model = build_moe("mixtral")
    dense = copy.deepcopy(model)
    depgraph.prune(model, ids(7, batch=4, length=16), target=0.15, kinds=("experts", "mlp"), layers=None,
                   progress=False)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in dense.parameters())
    assert torch.isfinite(_logits(model, ids(8))).all()


def test_unfused_experts_block_router_rows_but_prune_expert_neurons():
    """Experts as separate modules: the router rows are blocked with the op that reads the expert indices
    (never a group on their own); every expert's own MLP neurons are an exact group."""
    model = unfused_lm()
    x = ids(9)
    graph = depgraph.trace(model, (x,))
    assert not graph.groups("experts")
    router = [b for b in graph.blocked if any(p.startswith("moes.0.gate.weight[0]") for p in b["params"])]
    assert router and "expert indices read by aten.eq" in router[0]["reasons"][0]
    assert not any(m.param == "moes.0.gate.weight" and m.dim == 0 for g in graph.groups() for m in g.members)
    per_expert = [g for g in graph.groups() if g.layer is not None
                  and any(m.param.endswith("down_proj.weight") and m.dim == 1 for m in g.members)]
    assert len(per_expert) == 2 * 4 and all(g.exact and g.num_units == 32 for g in per_expert)
    plan = depgraph.Plan.from_units(graph, {g.id: list(range(0, 32, 2)) for g in per_expert})
    a = _logits(depgraph.mask(copy.deepcopy(model), plan), x)
    b = _logits(depgraph.shrink(copy.deepcopy(model), plan), x)
    assert not torch.allclose(a, _logits(model, x), atol=1e-4)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_sigmoid_routing_over_gathered_expert_weights():
    """Hand-written fused experts (W[ids] and bmm), sigmoid scores: a masked expert scores 0, never chosen."""
    model = sigmoid_lm()
    x = ids(10)
    graph = depgraph.trace(model, (x,))
    groups = graph.groups("experts")
    assert [g.layer for g in groups] == [0, 1] and all(g.exact for g in groups)
    assert {(m.param, m.dim) for m in groups[0].members} == {("moes.0.gate.weight", 0), ("moes.0.up", 0),
                                                            ("moes.0.down", 0)}
    for units in ([0, 3], [2]):
        plan = depgraph.Plan.from_units(graph, {g.id: units for g in groups})
        a = _logits(depgraph.mask(copy.deepcopy(model), plan), x)
        shrunk = depgraph.shrink(copy.deepcopy(model), plan)
        assert shrunk.moes[0].num_experts == 4 - len(units)
        assert not torch.allclose(a, _logits(model, x), atol=1e-4)
        torch.testing.assert_close(_logits(shrunk, x), a, rtol=0, atol=1e-5)


def test_score_bias_after_sigmoid_is_masked_with_minus_inf():
    """DeepSeek-V3-style correction bias added after the sigmoid: masking gives the removed experts a bias of
    -inf (a zeroed bias would still be scored and could be chosen), so removal equals masking."""
    model = sigmoid_lm(score_bias=True)
    graph = depgraph.trace(model, (ids(),))
    groups = graph.groups("experts")
    assert [g.layer for g in groups] == [0, 1]
    for g in groups:
        assert g.routing["correction"] == [f"moes.{g.layer}.score_bias"]
        assert (f"moes.{g.layer}.score_bias", 0) in {(m.param, m.dim) for m in g.members}
    plan = depgraph.Plan.from_units(graph, {g.id: [1, 2] for g in groups})
    x = ids(4)
    masked = _logits(depgraph.mask(copy.deepcopy(model), plan), x)
    shrunk = depgraph.shrink(copy.deepcopy(model), plan)
    torch.testing.assert_close(_logits(shrunk, x), masked, rtol=0, atol=1e-5)
    assert not torch.allclose(masked, _logits(model, x), atol=1e-4)
    zero_bias = copy.deepcopy(model)  # router masked, bias only zeroed: a removed expert can still be chosen
    with torch.no_grad():
        for g in groups:  # kept experts scored below zero: a removed expert's 0 + 0 would win
            zero_bias.moes[g.layer].score_bias[[0, 3]] = -5.0
    plan_out = depgraph.mask(copy.deepcopy(zero_bias), plan)
    with torch.no_grad():
        for g in groups:
            plan_out.moes[g.layer].score_bias[1:3] = 0.0
    assert not torch.allclose(_logits(plan_out, x), _logits(depgraph.shrink(copy.deepcopy(zero_bias), plan), x),
                              atol=1e-4)  # a removed expert chosen (its weight 0: even 0/0)


@pytest.mark.parametrize("where, dim", [("probabilities", 1), ("logits", 0)])
def test_choice_bias_is_a_member_of_the_expert_unit(where, dim):
    """A per-expert bias that only chooses the experts (a [1, E] parameter on softmax probabilities, ERNIE-4.5's
    moe_statics; a persistent buffer on the logits, Kolibri's correction) is sliced with its expert; on the
    probabilities it is masked with -inf along its expert dim. Whole experts and per-expert neurons: removal
    equals masking; fewer experts left than top_k is refused."""
    model = biased_router_lm(where)
    x = ids(3)
    graph = depgraph.trace(model, (ids(),))
    groups = graph.groups("experts")
    assert [g.layer for g in groups] == [0, 1] and all(g.exact for g in groups)
    for g in groups:
        assert (f"moes.{g.layer}.choice_bias", dim) in {(m.param, m.dim) for m in g.members}
        assert g.routing["correction"] == ([f"moes.{g.layer}.choice_bias"] if where == "probabilities" else [])
    neurons = [g for g in graph.groups() if g.exact and g.kind != "experts" and g.layer is not None]
    assert len(neurons) == 2
    for units in ({g.id: [1, 2] for g in groups}, {groups[0].id: [3], neurons[1].id: list(range(0, 32, 3))}):
        shrunk = _removal_equals_masking(model, graph, units, x)
    assert shrunk.moes[0].choice_bias.shape[dim] == 3
    with pytest.raises(PlanError, match=r"top_k=2"):
        depgraph.Plan.from_units(graph, {groups[0].id: [0, 1, 2]})


def test_choice_bias_from_a_non_persistent_buffer_is_refused():
    """A bias recomputed from the config at load time cannot be sliced with the experts: no experts group."""
    graph = depgraph.trace(biased_router_lm("logits-volatile"), (ids(),))
    assert not graph.groups("experts")
    assert any("non-persistent buffer moes.0.choice_bias" in r for b in graph.blocked for r in b["reasons"])


@pytest.mark.parametrize("canvas", ["fill", "logits"])
def test_top_k_scattered_into_a_canvas_over_the_experts_is_routed(canvas):
    """Llama-4-style dense routing weights (top-k scores scattered into full_like(logits, -inf) or into a copy of
    the logits, then sigmoid; every expert run on every token and the outputs summed over the experts): the
    canvas's dim is the expert dim, the sum over it exact (a removed expert's output is zero); whole experts and
    per-expert neurons: removal equals masking; fewer experts left than top_k is refused."""
    model = dense_scatter_lm(canvas)
    x = ids(4)
    graph = depgraph.trace(model, (ids(),))
    groups = graph.groups("experts")
    assert [g.layer for g in groups] == [0, 1] and all(g.exact for g in groups)
    assert {(m.param, m.dim) for m in groups[0].members} == {("moes.0.gate.weight", 0), ("moes.0.up", 0),
                                                            ("moes.0.down", 0)}
    neurons = [g for g in graph.groups() if g.exact and g.kind != "experts" and g.layer is not None]
    assert [g.layer for g in neurons] == [0, 1]
    for units in ({g.id: [0, 3] for g in groups}, {groups[1].id: [2], neurons[0].id: list(range(1, 32, 2))}):
        _removal_equals_masking(model, graph, units, x)
    with pytest.raises(PlanError, match=r"top_k=2"):
        depgraph.Plan.from_units(graph, {groups[0].id: [0, 1, 3]})


def test_max_then_max_of_the_rest_is_a_top_2_routing_site():
    """PhiMoE-style sparse mixer: the max logit, then the max once it is scattered to -inf (under no_grad), each
    weighted by a softmax over -inf-masked logits: a top-2 routing site; removal equals masking for whole experts
    and per-expert neurons, and leaving one expert is refused."""
    model = sparse_mixer_lm()
    x = ids(7)
    graph = depgraph.trace(model, (ids(),))
    groups = graph.groups("experts")
    assert [g.layer for g in groups] == [0, 1] and all(g.exact for g in groups)
    assert all(g.routing["top_k"] == 2 for g in groups)
    neurons = [g for g in graph.groups() if g.exact and g.kind != "experts" and g.layer is not None]
    assert [g.layer for g in neurons] == [0, 1]
    for units in ({g.id: [1, 2] for g in groups}, {groups[0].id: [0], neurons[1].id: list(range(0, 32, 4))}):
        _removal_equals_masking(model, graph, units, x)
    with pytest.raises(PlanError, match=r"top_k=2"):
        depgraph.Plan.from_units(graph, {groups[0].id: [0, 1, 2]})


def test_a_mean_over_the_experts_after_routing_is_not_exact():
    """A reduction over the expert dim after the top-k (here a mean of the router probabilities, which changes with
    the number of experts) makes the experts group inexact, even though the dim was blocked for routing then."""
    model = sparse_mixer_lm(mean_gate=True)
    graph = depgraph.trace(model, (ids(),))
    groups = graph.groups("experts")
    assert groups and not any(g.exact for g in groups)
    assert all(any("aten.mean" in r for r in g.inexact_reasons) for g in groups)
    plan = depgraph.Plan.from_units(graph, {groups[0].id: [1]})  # and indeed: removal differs from masking
    x = ids(3)
    masked = _logits(depgraph.mask(copy.deepcopy(model), plan), x)
    assert not torch.allclose(_logits(depgraph.shrink(copy.deepcopy(model), plan), x), masked, atol=1e-4)


def test_grouped_mm_with_unrouted_groups_prunes_expert_neurons_only():
    """transformers' grouped_mm_fallback over groups that are not a routed top-k's offsets (tokens grouped by an
    argmax): the group dim (W's dim 0) is blocked with the op, not the whole op; the fused per-expert neurons
    stay one exact group per layer and their removal equals masking."""
    model = argmax_grouped_lm()
    x = ids(6)
    graph = depgraph.trace(model, (ids(),))
    assert not graph.unsupported and not graph.groups("experts")
    up = [b for b in graph.blocked if "moes.0.up[0]" in b["params"]]
    assert up and "groups of aten.grouped_mm_fallback are not offsets of a routed top-k" in up[0]["reasons"][0]
    neurons = [g for g in graph.groups() if g.exact and g.layer is not None]
    assert [(g.layer, g.num_units) for g in neurons] == [(0, 32), (1, 32)]
    assert {(m.param, m.dim) for m in neurons[0].members} == {("moes.0.up", 2), ("moes.0.down", 1)}
    _removal_equals_masking(model, graph, {neurons[0].id: list(range(0, 32, 2)), neurons[1].id: list(range(3, 11))}, x)


def test_hidden_pruning_runs_through_the_experts(traced):
    """The residual stream is inexact, but its shrunk model must run: routers reshape by their hidden_dim."""
    name, model, graph = traced
    hidden = [g for g in graph.groups(("hidden", "channels")) if g.layer is None and g.num_units == 64]
    plan = depgraph.Plan.from_units(graph, {hidden[0].id: list(range(0, 64, 2))})
    shrunk = depgraph.shrink(copy.deepcopy(model), plan)
    if name != "gpt_oss":  # eager attention (no attention site yet) keeps literal head sizes
        out = _logits(shrunk, ids(11))
        assert out.shape[-1] == VOCAB and torch.isfinite(out).all()
    for e in graph.groups("experts"):
        router = shrunk.get_submodule(e.routing["router_module"])
        assert getattr(router, "hidden_dim", 32) == 32


def test_router_weight_through_a_no_op_cast_is_a_routing_site():
    """DeepSeek-V2's router runs F.linear(x.type(float32), self.weight.type(float32)): on an fp32 weight the cast
    returns the parameter itself, so the top-k is a routing site and removing experts equals masking them."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.DeepseekV2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                              num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32,
                              kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
                              topk_method="greedy", n_group=1, topk_group=1)
    cfg.use_cache = False
    model = tf.DeepseekV2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gate.weight") or "experts" in n:
                p.normal_(0, 0.5 if "experts" not in n else 0.1)
    graph = depgraph.trace(model)
    (g,) = graph.groups("experts")
    assert g.layer == 1 and g.exact and g.routing["router"][0] == "model.layers.1.mlp.gate.weight"
    plan = depgraph.Plan.from_units(graph, {g.id: [0, 3]})
    _check(model, plan, ids(5), implementations=("grouped_mm",))


def test_mask_failing_half_way_takes_the_routing_masks_back(traced, monkeypatch):
    """All or nothing for experts too: a failure after one layer's router got its -inf mask puts the router back."""
    import importlib

    shrink_mod = importlib.import_module("depgraph.shrink")  # the module (depgraph.shrink is also the function)
    name, model, graph = traced
    plan = depgraph.Plan.random(graph, 0.5, seed=0, kinds=("experts",))
    assert len([e for e in plan.entries if e.experts]) >= 2
    m, x = copy.deepcopy(model), ids(0)
    before = _logits(m, x)
    real, calls = shrink_mod.mask_experts, []

    def failing(*args):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real(*args)

    monkeypatch.setattr(shrink_mod, "mask_experts", failing)
    with pytest.raises(RuntimeError, match="device lost"):
        depgraph.mask(m, plan)
    assert len(calls) == 2
    router = m.get_submodule(calls[0][1])
    assert "_depgraph_masked_experts" not in router.__dict__ and not router._forward_hooks
    torch.testing.assert_close(_logits(m, x), before, rtol=0, atol=0)
    monkeypatch.undo()
    torch.testing.assert_close(_logits(depgraph.mask(m, plan), x), _logits(depgraph.mask(copy.deepcopy(model), plan), x),
                               rtol=0, atol=0)  # and masking again works as on a fresh copy
