"""One plan validation (depgraph.plan.check_plan) for every entry point: Plan.from_json, viz, mask, shrink.
Each tampered plan is refused with a PlanError naming the group, before anything is modified."""
import copy
import importlib
import json

import pytest
import torch

import depgraph
from archs import ARCHS, ids
from depgraph import PlanError
from depgraph.plan import check_plan

shrink_mod = importlib.import_module("depgraph.shrink")  # the module (depgraph.shrink is also the function)


@pytest.fixture(scope="module")
def gqa():
    model = ARCHS["llama-gqa"]()  # 6 q heads over 2 kv heads
    graph = depgraph.trace(model)
    plan = depgraph.Plan.from_units(graph, {"attention.0": [0, 4], "mlp.1": [1, 2, 3, 9]})
    return model, graph, plan


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def _entry(data, group):
    return next(e for e in data["entries"] if e["group"] == group)


def _mlp_rows(data):
    return _entry(data, "mlp.1")["removed"]["model.layers.1.mlp.up_proj.weight"]["0"]


def dup_units(d):
    _entry(d, "mlp.1")["units"] = [1, 1, 1, 2]


def negative_unit(d):
    _entry(d, "mlp.1")["units"][0] = -1


def unit_out_of_range(d):
    _entry(d, "mlp.1")["units"][0] = 64


def index_out_of_range(d):
    _mlp_rows(d)[0] = 640


def negative_index(d):
    _mlp_rows(d)[0] = -1


def dup_index(d):
    rows = _mlp_rows(d)
    rows[1] = rows[0]


def emptied_layer(d):
    e = _entry(d, "mlp.1")
    e["units"] = list(range(64))


def heads_after_wrong(d):
    _entry(d, "attention.0")["attention"]["heads_after"] = 5


def kv_after_wrong(d):
    _entry(d, "attention.0")["attention"]["kv_after"] = 1


def gqa_rule(d):
    _entry(d, "attention.0")["units"] = [0, 1, 4]


def units_contradict_indices(d):
    _entry(d, "mlp.1")["units"] = [1, 2, 3, 10]  # rows still those of 9


def group_listed_twice(d):
    d["entries"].append(copy.deepcopy(_entry(d, "mlp.1")))


def unknown_group(d):
    _entry(d, "mlp.1")["group"] = "mlp.7"


def wrong_size(d):
    _entry(d, "mlp.1")["num_units"] = 32


TAMPER = {  # function -> (message, caught without the graph too)
    dup_units: ("group mlp.1: units listed more than once", True),
    negative_unit: ("group mlp.1: unit index out of range", True),
    unit_out_of_range: ("group mlp.1: unit index out of range", True),
    index_out_of_range: ("group mlp.1: indices of .* out of range", True),
    negative_index: ("group mlp.1: indices of .* out of range", True),
    dup_index: ("group mlp.1: indices of .* more than once", True),
    emptied_layer: ("group mlp.1: the plan removes all 64 neurons", True),
    heads_after_wrong: ("group attention.0: heads_after 5 .* contradict", True),
    kv_after_wrong: ("group attention.0: .* kv_after 1 contradict", True),
    gqa_rule: ("group attention.0: GQA rule broken", True),
    group_listed_twice: ("group mlp.1: listed twice", True),
    units_contradict_indices: ("group mlp.1: its removed parameter indices are not the ones", False),
    unknown_group: ("unknown group 'mlp.7'", False),
    wrong_size: ("group mlp.1: made for a mlp group of 32 units", False),
}


@pytest.mark.parametrize("tamper", list(TAMPER), ids=lambda f: f.__name__)
def test_tampered_plan_is_refused_everywhere(gqa, tamper, tmp_path):
    model, graph, plan = gqa
    data = json.loads(plan.to_json())
    tamper(data)
    text = json.dumps(data)
    message, without_graph = TAMPER[tamper]
    with pytest.raises(PlanError, match=message):
        depgraph.Plan.from_json(text, graph)
    from viz import draw

    with pytest.raises(PlanError, match=message):
        draw(graph, text)
    if without_graph:
        with pytest.raises(PlanError, match=message):
            depgraph.Plan.from_json(text)
        raw = copy.deepcopy(plan)  # built by hand, not read: mask/shrink check the plan themselves
        raw.entries = [depgraph.plan.PlanEntry(**{**e, "removed": {p: {int(k): v for k, v in dims.items()}
                                                                   for p, dims in e["removed"].items()}})
                       for e in data["entries"]]
        for apply in (depgraph.mask, depgraph.shrink):
            m = copy.deepcopy(model)
            before = _state(m)
            with pytest.raises(PlanError, match=message):
                apply(m, raw)
            assert _same(m, before)


def test_plan_of_another_model_is_refused(gqa, tmp_path):
    model, graph, _ = gqa
    other = ARCHS["llama-mha"]()
    other_plan = depgraph.Plan.random(depgraph.trace(other), 0.3, seed=1, kinds=("attention", "mlp"))
    from viz import draw

    with pytest.raises(PlanError, match="group attention.0: made for|another model"):
        draw(graph, other_plan.to_json())
    with pytest.raises(PlanError):
        depgraph.Plan.from_json(other_plan.to_json(), graph)
    m = copy.deepcopy(model)
    before = _state(m)
    with pytest.raises(PlanError, match="re-trace|does not have"):
        depgraph.shrink(m, other_plan)
    assert _same(m, before)


def test_multi_step_plan_file_is_named(gqa):
    _, graph, plan = gqa
    with pytest.raises(PlanError, match="holds 2 plans"):
        depgraph.Plan.from_json("[" + plan.to_json() + "," + plan.to_json() + "]")


def test_legal_plan_passes_and_round_trips(gqa):
    model, graph, plan = gqa
    again = depgraph.Plan.from_json(plan.to_json(), graph)
    assert check_plan(again, graph) is again and again.to_json() == plan.to_json()
    x = ids()
    a = depgraph.shrink(copy.deepcopy(model), again)(x).logits
    b = depgraph.mask(copy.deepcopy(model), again)(x).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_shrink_failing_half_way_puts_everything_back(gqa, monkeypatch):
    model, _, plan = gqa
    m = copy.deepcopy(model)
    before = _state(m)
    config_before = m.config.to_dict()
    attrs_before = {n: dict(vars(mod)) for n, mod in m.named_modules()}
    calls = []
    shapes = {id(mod): tuple(mod.weight.shape) for mod in m.modules() if isinstance(mod, torch.nn.Linear)}

    def failing_fixer(mod):
        if tuple(mod.weight.shape) != shapes.get(id(mod)):  # rewriting a sliced module (not shrink's read-ahead)
            calls.append(mod)
            if len(calls) == 3:
                raise RuntimeError("disk on fire")
        return {"in_features": mod.weight.shape[1], "out_features": mod.weight.shape[0]}

    fixers = shrink_mod.MODULE_FIXERS
    monkeypatch.setattr(shrink_mod, "MODULE_FIXERS", [(fixers[0][0], failing_fixer)] + fixers[1:])
    with pytest.raises(RuntimeError, match="disk on fire"):
        depgraph.shrink(m, plan)
    assert len(calls) == 3  # two modules were already rewritten when it failed
    assert _same(m, before)
    assert m.config.to_dict() == config_before and "depgraph" not in vars(m.config)
    for n, mod in m.named_modules():
        now = vars(mod)
        assert {k: now[k] for k in attrs_before[n] if k not in ("_parameters", "_buffers", "_modules")} == \
            {k: v for k, v in attrs_before[n].items() if k not in ("_parameters", "_buffers", "_modules")}, n
    monkeypatch.undo()
    x = ids()
    torch.testing.assert_close(depgraph.shrink(m, plan)(x).logits, depgraph.mask(copy.deepcopy(model), plan)(x).logits,
                               rtol=1e-5, atol=1e-5)


def test_mask_failing_half_way_puts_everything_back(gqa, monkeypatch):
    model, _, plan = gqa
    m = copy.deepcopy(model)
    before = _state(m)
    real, calls = shrink_mod._get_tensor, []

    def failing_get(model_, name):
        calls.append(name)
        if len(calls) == len(plan.shapes) + 3:  # after check_model's reads, two tensors already zeroed
            raise RuntimeError("device lost")
        return real(model_, name)

    monkeypatch.setattr(shrink_mod, "_get_tensor", failing_get)
    with pytest.raises(RuntimeError, match="device lost"):
        depgraph.mask(m, plan)
    assert len(calls) == len(plan.shapes) + 3
    assert _same(m, before)
