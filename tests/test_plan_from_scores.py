"""Plans from scores: parameter targets, layer ranges, rounding, GQA policies."""
import numpy as np
import pytest

import depgraph
from archs import ARCHS


@pytest.fixture(scope="module")
def graph():
    return depgraph.trace(ARCHS["llama-gqa"]())


def _scores(graph, seed=0):
    rng = np.random.default_rng(seed)
    return {g.id: rng.random(g.num_units) for g in graph.groups()}


@pytest.mark.parametrize("policy", ["uniform", "global", "adaptive"])
@pytest.mark.parametrize("target", [0.05, 0.15])
def test_meets_parameter_target_within_one_unit_per_group(graph, policy, target):
    plan = depgraph.Plan.from_scores(graph, _scores(graph), target, policy=policy, round_to=1)
    removed = plan.params_removed() / graph.num_params
    slack = sum(g.params_per_unit * (g.gqa[1] if g.gqa else 1) for g in graph.groups(("attention", "mlp")))
    assert abs(removed - target) * graph.num_params <= slack


def test_lowest_scores_go_first(graph):
    scores = _scores(graph, 1)
    plan = depgraph.Plan.from_scores(graph, scores, 0.1, kinds=("mlp",), round_to=1)
    for e in plan.entries:
        s = scores[e.group]
        kept = np.setdiff1d(np.arange(len(s)), e.units)
        assert s[e.units].max() <= s[kept].min()


def test_layer_range_and_rounding(graph):
    plan = depgraph.Plan.from_scores(graph, _scores(graph), 0.05, kinds=("mlp",), layers=[1], round_to=8)
    assert [e.group for e in plan.entries] == ["mlp.1"]
    assert plan.entries[0].units_after % 8 == 0


def test_gqa_policies(graph):
    heads = depgraph.Plan.from_scores(graph, _scores(graph), 0.06, kinds=("attention",), gqa="heads")
    for e in heads.entries:
        assert e.attention["kv_after"] == 2 and e.attention["heads_after"] % 2 == 0
    kv = depgraph.Plan.from_scores(graph, _scores(graph), 0.06, kinds=("attention",), gqa="kv")
    for e in kv.entries:
        assert e.attention["heads_after"] == 3 * e.attention["kv_after"]


def test_bad_target(graph):
    with pytest.raises(depgraph.PlanError, match="ratio must be in"):
        depgraph.Plan.from_scores(graph, _scores(graph), 1.5)


def test_per_kind_ratios(graph):
    plan = depgraph.Plan.from_scores(graph, _scores(graph), ratios={"attention": 0.34, "mlp": 0.25}, round_to=1)
    for e in plan.entries:
        if e.kind == "mlp":
            assert e.units_after == 48
        else:
            assert e.attention["heads_after"] == 4 and e.attention["kv_after"] == 2
    with pytest.raises(depgraph.PlanError, match="either a parameter target or per-kind ratios"):
        depgraph.Plan.from_scores(graph, _scores(graph), 0.1, ratios={"mlp": 0.2})


def test_adaptive_widths_follow_sensitivity_with_a_floor(graph):
    """A layer whose scores are all higher keeps more; no layer drops below min_width; widths stay multiples of 8."""
    scores = _scores(graph, 2)
    scores["mlp.1"] = scores["mlp.1"] + 0.3  # layer 1 is more sensitive
    plan = depgraph.Plan.from_scores(graph, scores, 0.15, kinds=("mlp",), policy="adaptive", round_to=8)
    after = {e.group: e.units_after for e in plan.entries}
    n = {g.id: g.num_units for g in graph.groups(("mlp",))}
    assert after.get("mlp.1", n["mlp.1"]) > after["mlp.0"]
    assert all(v % 8 == 0 for v in after.values())
    skewed = {g: s * 0 + (5 if g == "mlp.1" else 0) + s * 0.01 for g, s in scores.items()}
    floor = depgraph.Plan.from_scores(graph, skewed, 0.2, kinds=("mlp",), policy="adaptive", round_to=1,
                                      min_width=0.5)
    assert all(e.units_after >= 0.5 * e.num_units for e in floor.entries)
    assert min(e.units_after / e.num_units for e in floor.entries) == 0.5  # the floor binds
    with pytest.raises(depgraph.PlanError, match="target 0.3 cannot be met"):  # every group at its floor: < 30%
        depgraph.Plan.from_scores(graph, skewed, 0.3, kinds=("mlp",), policy="adaptive", round_to=1, min_width=0.5)
    with pytest.raises(depgraph.PlanError, match="min_width"):
        depgraph.Plan.from_scores(graph, scores, 0.1, policy="adaptive", min_width=0)
