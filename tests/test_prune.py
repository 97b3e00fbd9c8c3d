"""depgraph.prune end to end on a tiny model."""
import copy

import pytest
import torch

import depgraph
from archs import ARCHS, ids


def test_prune_hits_target_and_keeps_working(tmp_path):
    model = ARCHS["llama-gqa"]()
    calib = torch.cat([ids(s, batch=2, length=16) for s in range(2)])
    dense = copy.deepcopy(model)
    pruned, report, _ = depgraph.prune(model, calib, target=0.1, method="taylor", round_to=1)
    assert pruned is model
    assert abs(report["removed_fraction"] - 0.1) < 0.05
    assert report["params_after"] == sum(p.numel() for p in model.parameters()) < report["params_before"]
    assert {"trace_s", "score_s", "plan_s", "shrink_s"} <= set(report["times"])
    x = ids(7)
    with torch.no_grad():
        out = model(x).logits
        ref = dense(x).logits
    assert out.shape == ref.shape and torch.isfinite(out).all()
    depgraph.save_pruned(model, tmp_path / "m")
    loaded = depgraph.load_pruned(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, out)


def test_iterative_pruning_ends_at_target():
    model = ARCHS["llama-gqa"]()
    calib = ids(3, batch=2, length=16)
    _, report, plans = depgraph.prune(model, calib, target=0.15, method="taylor", steps=3, round_to=1,
                                      progress=False)
    assert len(plans) == 3 and all(p.entries for p in plans)
    assert abs(report["removed_fraction"] - 0.15) < 0.04


def test_uniform_mode_is_stock_loadable(tmp_path):
    from transformers import AutoModelForCausalLM

    model = ARCHS["llama-gqa"]()
    _, report, _ = depgraph.prune(model, None, target=0.1, method="l2", uniform=True, round_to=8, progress=False)
    assert report["stock_loadable"]
    depgraph.save_pruned(model, tmp_path / "m")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    x = ids(5)
    with torch.no_grad():
        assert torch.equal(stock(x).logits, model(x).logits)


def test_bad_arguments_fail_before_touching_the_model():
    model = ARCHS["llama-gqa"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs, message in (({"target": 1.5}, "ratio must be in"), ({"method": "nope"}, "unknown method"),
                            ({"steps": 0}, "steps must be")):
        try:
            depgraph.prune(model, None, **{"target": 0.1, "method": "l2", **kwargs})
        except depgraph.PlanError as e:
            assert message in str(e)
        else:
            raise AssertionError(f"{kwargs} did not raise")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def mean_output(model, path, calib):
    """Mean output of module ``path`` over every token of ``calib`` (one forward per row)."""
    acc = []
    h = model.get_submodule(path).register_forward_hook(lambda mod, a, out: acc.append(out.reshape(-1, out.shape[-1])))
    with torch.no_grad():
        for row in calib:
            model(row.unsqueeze(0))
    h.remove()
    return torch.cat(acc).mean(0)


@pytest.mark.parametrize("arch,consumer", [("llama-gqa", "model.layers.0.mlp.down_proj"),
                                           ("gpt2", "transformer.h.0.mlp.c_proj")])  # nn.Linear; Conv1D [in, out]
def test_compensation_keeps_the_mean_output_and_round_trips(tmp_path, arch, consumer):
    """FLAP bias: on the calibration tokens, the compensated layer's mean output equals the dense one's."""
    from depgraph.compensate import apply_bias, bias_deltas

    model = ARCHS[arch]()
    graph = depgraph.trace(model)
    mlp = next(g for g in graph.groups() if g.kind == "mlp" and g.layer == 0)
    assert mlp.id == "mlp.0"
    plan = depgraph.Plan.from_units(graph, {"mlp.0": list(range(0, 64, 3))})
    calib = ids(4, batch=3, length=16)

    def mean_out(m):
        return mean_output(m, consumer, calib)

    dense_mean = mean_out(model)
    plain = depgraph.shrink(copy.deepcopy(model), plan)
    comp = copy.deepcopy(model)
    deltas = bias_deltas(comp, plan, calib)
    assert set(deltas) == {consumer} and deltas[consumer].shape == (48,)
    depgraph.shrink(comp, plan)
    apply_bias(comp, deltas)
    assert comp.get_submodule(consumer).bias is not None
    err_plain = (mean_out(plain) - dense_mean).abs().max()
    err_comp = (mean_out(comp) - dense_mean).abs().max()
    assert err_plain > 1e-5 and err_comp < 1e-3 * err_plain
    if arch == "llama-gqa":
        assert comp.config.mlp_bias is True  # Llama's flag: the folder still builds from its config
    depgraph.save_pruned(comp, tmp_path / "m")
    x = ids(9)
    with torch.no_grad():
        assert torch.equal(depgraph.load_pruned(tmp_path / "m")(x).logits, comp(x).logits)


def test_prune_with_compensation_needs_calibration():
    model = ARCHS["llama-gqa"]()
    try:
        depgraph.prune(model, None, target=0.1, method="l2", compensate=True)
    except depgraph.PlanError as e:
        assert "needs calibration" in str(e)
    else:
        raise AssertionError("no error")
    _, report, _ = depgraph.prune(model, ids(2), target=0.1, method="l2", compensate=True, progress=False)
    assert report["compensate"] and report["removed_fraction"] > 0.05


def test_report_counts_parameters_per_group_and_without_embeddings():
    model = ARCHS["llama-gqa"]()
    _, report, plans = depgraph.prune(model, None, method="l2", ratios={"mlp": 0.25}, round_to=1, progress=False)
    removed = report["params_before"] - report["params_after"]
    assert sum(g["params_removed"] for g in report["groups"]) == removed
    emb = model.model.embed_tokens.weight.numel()
    assert report["non_embedding_removed_fraction"] == pytest.approx(removed / (report["params_before"] - emb))


@pytest.mark.parametrize("kwargs,message", [
    ({"target": 0.9}, r"target 0.9 cannot be met: at most 0\.\d+ \(\d+\.\d%\) of the parameters can be removed "
                      r"with kinds \('attention', 'mlp'\)"),  # the default kinds from a target of 0.5 on
    ({"target": 0.9, "steps": 3}, "target 0.9 cannot be met"),
    ({"target": 0.1, "ratios": {"mlp": 0.2}}, "either a parameter target or per-kind ratios, not both"),
    ({"round_to": 0}, "round_to must be a positive integer"),
    ({"round_to": -8}, "round_to must be a positive integer"),
    ({"layers": [5, 6]}, r"layers \[5, 6\] are not in the model \(its layers: 0..1\)"),
    ({"layers": []}, "empty layer range"),
    ({"kinds": ("hidden",), "layers": [0]}, "nothing to prune: no prunable groups of kinds \\('hidden',\\) in layers"),
])
def test_unmeetable_targets_and_bad_options_fail_before_scoring(monkeypatch, kwargs, message):
    """Refused right after the trace: the scoring never runs, the model is untouched."""
    import importlib

    prune_mod = importlib.import_module("depgraph.prune")

    def no_scoring(*args, **kw):
        raise AssertionError("scored before refusing")

    monkeypatch.setattr(prune_mod, "score", no_scoring)
    model = ARCHS["llama-gqa"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(depgraph.PlanError, match=message):
        depgraph.prune(model, None, **{"method": "l2", "progress": False, "layers": None, **kwargs})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_reachable_target_is_met_and_just_beyond_is_refused():
    """The largest reachable fraction itself is met; a little more is refused with that figure."""
    from depgraph.plan import most_removable

    model = ARCHS["llama-gqa"]()
    graph = depgraph.trace(model)
    reach = most_removable(graph, ("mlp",), None, round_to=8).params_removed() / graph.num_params
    scores = {g.id: torch.rand(g.num_units).tolist() for g in graph.groups("mlp")}
    plan = depgraph.Plan.from_scores(graph, scores, reach, kinds=("mlp",))
    assert plan.params_removed() / graph.num_params == pytest.approx(reach)
    with pytest.raises(depgraph.PlanError, match=f"at most {reach:.4f}"):
        depgraph.Plan.from_scores(graph, scores, reach + 0.01, kinds=("mlp",))


@pytest.mark.parametrize("target, kinds", [(0.2, {"mlp"}), (0.5, {"attention", "mlp"})])
def test_default_kinds_follow_the_target(target, kinds):
    """No kinds given: MLP neurons below half of all parameters, heads and neurons from there on (the measured
    defaults, depgraph.prune.default_kinds); the report names them and the pruned model still equals its mask
    (prune's verify)."""
    from depgraph.prune import default_kinds

    model = ARCHS["llama-gqa"]()
    calib = torch.cat([ids(s, batch=2, length=16) for s in range(2)])
    _, report, plans = depgraph.prune(model, calib, target=target, round_to=1, progress=False)
    assert set(default_kinds(target)) == kinds
    touched = {e.kind for p in plans for e in p.entries if e.units}
    assert touched == kinds, touched
    assert abs(report["removed_fraction"] - target) < 0.05
