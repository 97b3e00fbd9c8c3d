"""Graph structure, plan validation and bad input."""
import copy
import json

import pytest
import torch

import depgraph
from archs import ARCHS, ids
from depgraph import PlanError, UnsupportedOpError


@pytest.fixture(scope="module")
def gqa():
    model = ARCHS["llama-gqa"]()  # 6 q heads over 2 kv heads, tied embeddings
    return model, depgraph.trace(model)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_trace_leaves_model_untouched(gqa):
    model, _ = gqa
    before = _state(model)
    use_cache = model.config.use_cache
    depgraph.trace(model)
    assert _same(model, before)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.config.use_cache == use_cache


def test_gqa_group_structure(gqa):
    model, graph = gqa
    att = graph.group("attention.0")
    assert (att.num_units, att.gqa, att.head_dim, att.module) == (6, (2, 3), 8, "model.layers.0.self_attn")
    levels = {m.param.rsplit(".", 2)[-2]: m.level for m in att.members}
    assert levels == {"q_proj": "unit", "k_proj": "kv", "v_proj": "kv", "o_proj": "unit"}
    q = next(m for m in att.members if "q_proj" in m.param)
    # q head h owns rows h*8 .. h*8+7
    assert q.indices([4]).tolist() == list(range(32, 40))
    # tied embedding / lm_head is one parameter in the hidden group
    (hidden,) = graph.groups("hidden")
    assert ("model.embed_tokens.weight", 1) in {(m.param, m.dim) for m in hidden.members}
    assert not any(m.param == "lm_head.weight" for m in hidden.members)
    assert graph.aliases["model.embed_tokens.weight"] == ["model.embed_tokens.weight", "lm_head.weight"]


def test_summary_and_networkx(gqa):
    _, graph = gqa
    text = str(graph)
    assert "attention.1" in text and "mlp.0" in text and "hidden" in text
    assert "embedding rows are selected by token ids" in text
    g = graph.nx
    assert g.nodes["attention.0"]["kind"] == "attention"
    assert g.has_edge("mlp.1", "model.layers.1.mlp.down_proj.weight[1]")
    counts = graph.summary_dict()["counts"]
    assert counts == {"hidden": 1, "attention": 2, "mlp": 2}


@pytest.mark.parametrize("units,message", [
    ([0, 3, 4], "GQA rule broken"),  # per-group counts [1, 2]: neither whole groups nor equal
    ([0, 1, 3], "GQA rule broken"),  # [2, 1]
    (list(range(6)), "removes all 6 heads"),
    ([6], "out of range"),
])
def test_plan_validation(gqa, units, message):
    _, graph = gqa
    with pytest.raises(PlanError, match=message):
        depgraph.Plan.from_units(graph, {"attention.0": units})


def test_legal_gqa_plans(gqa):
    _, graph = gqa
    whole = depgraph.Plan.from_units(graph, {"attention.0": [3, 4, 5]})
    assert whole.entries[0].attention["kv_after"] == 1
    per_group = depgraph.Plan.from_units(graph, {"attention.0": [0, 4]})  # one q head from each kv group
    assert per_group.entries[0].attention == {**per_group.entries[0].attention, "heads_after": 4, "kv_after": 2}
    both = depgraph.Plan.from_units(graph, {"attention.0": [0, 3, 4, 5]})  # kv group 1 and one head of group 0
    assert both.entries[0].attention["heads_after"] == 2 and both.entries[0].attention["kv_after"] == 1


def test_unknown_group_and_bad_ratio(gqa):
    _, graph = gqa
    with pytest.raises(PlanError, match="unknown group 'mlp.7'"):
        depgraph.Plan.from_units(graph, {"mlp.7": [0]})
    for ratio in (-0.1, 1.0, 1.5):
        with pytest.raises(PlanError, match="ratio must be in"):
            depgraph.Plan.random(graph, ratio)


def test_emptying_a_layer_is_refused(gqa):
    _, graph = gqa
    mlp = graph.group("mlp.1")
    with pytest.raises(PlanError, match="removes all 64 neurons of layer 1"):
        depgraph.Plan.from_units(graph, {"mlp.1": range(mlp.num_units)})


def test_plan_json_round_trip_and_stale_plan(gqa):
    model, graph = gqa
    plan = depgraph.Plan.random(graph, 0.3, seed=3, kinds=("attention", "mlp"))
    again = depgraph.Plan.from_json(plan.to_json())
    assert again.to_json() == plan.to_json()
    x = ids()
    a = depgraph.shrink(copy.deepcopy(model), plan)(x).logits
    b = depgraph.shrink(copy.deepcopy(model), again)(x).logits
    assert torch.equal(a, b)
    shrunk = depgraph.shrink(copy.deepcopy(model), plan)
    before = _state(shrunk)
    with pytest.raises(PlanError, match="re-trace the model"):
        depgraph.shrink(shrunk, plan)  # the plan was made for the dense shapes
    assert _same(shrunk, before)
    with pytest.raises(PlanError, match="not a depgraph plan"):
        depgraph.Plan.from_json(json.dumps({"format": 1}))


class BesselMLP(torch.nn.Module):
    """An MLP whose hidden activation goes through an op depgraph has no rule for."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)
        self.other = torch.nn.Linear(8, 12)
        self.out = torch.nn.Linear(12, 8)

    def forward(self, x):
        return self.down(torch.special.bessel_j0(self.up(x))) + self.out(torch.relu(self.other(x)))


def test_op_without_rule_is_reported_and_blocks_its_channels():
    model = BesselMLP()
    x = torch.randn(2, 8)
    graph = depgraph.trace(model, (x,))
    assert [n.op for n in graph.unsupported] == ["special_bessel_j0"]
    assert "special_bessel_j0" in str(graph) and "<root>" in str(graph)
    sizes = sorted(g.num_units for g in graph.groups())
    assert sizes == [12]  # the ReLU MLP stays prunable; the Bessel one does not
    blocked = [b for b in graph.blocked if "up.weight[0]" in b["params"]]
    assert blocked and "no dimension rule" in blocked[0]["reasons"][0]
    with pytest.raises(UnsupportedOpError, match="special_bessel_j0"):
        depgraph.trace(model, (x,), strict=True)


def test_non_module_and_missing_inputs_are_clear_errors():
    with pytest.raises(depgraph.TraceError, match="needs a torch.nn.Module"):
        depgraph.trace("not a model")
    with pytest.raises(depgraph.TraceError, match="pass example_inputs"):
        depgraph.trace(torch.nn.Linear(3, 4))
