"""Structured reconstruction on a tiny GQA Llama: sequential calibration, least-squares re-fit, mask == shrink."""
import copy

import pytest
import torch

import depgraph
from archs import ARCHS, ids
from depgraph.reconstruct import ReconstructConfig, consumers, reconstruct


@pytest.fixture(scope="module")
def setup():
    model = ARCHS["llama-gqa"]()
    graph = depgraph.trace(model)
    mlp = [g for g in graph.groups(("mlp",))]
    att = [g for g in graph.groups(("attention",))]
    removals = {g.id: list(range(1, g.num_units, 3)) for g in mlp}
    kv, rep = att[0].gqa
    removals[att[0].id] = [k * rep for k in range(kv)]  # one query head of every kv group
    plan = depgraph.Plan.from_units(graph, removals)
    calib = torch.cat([ids(s, batch=4, length=16) for s in range(3)])
    return model, plan, calib


def _layer_inputs(model, layer, calib):
    """[(hidden, args, kwargs)] at the input of ``layer`` of ``model`` for every calibration batch."""
    got = []

    def hook(mod, args, kwargs):
        got.append((args[0].detach(), args[1:], dict(kwargs)))

    h = layer.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(calib, use_cache=False)
    h.remove()
    return got


def _consumer_inputs(layer, module, items):
    xs = []
    h = module.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for hidden, args, kwargs in items:
            layer(hidden, *args, **kwargs)
    h.remove()
    return torch.cat(xs).double()


def test_consumers_come_from_the_plan_members(setup):
    model, plan, _ = setup
    found = consumers(model, plan)
    assert set(found) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)} | {"model.layers.0.self_attn.o_proj"}
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert len(found["model.layers.0.self_attn.o_proj"]) == 2 * head_dim


def test_refit_equals_lstsq_on_the_pruned_predecessors_outputs(setup):
    model, plan, calib = setup
    dense = copy.deepcopy(model)
    rec = copy.deepcopy(model)
    report = reconstruct(rec, plan, calib, ReconstructConfig(damp=0.0))
    for path, removed in consumers(model, plan).items():
        i = int(path.split(".")[2])
        sub = path.split(f"layers.{i}.")[1]
        # sequential calibration: the inputs of block i come from the reconstructed, pruned blocks before it
        items = _layer_inputs(rec, rec.model.layers[i], calib)
        X = _consumer_inputs(dense.model.layers[i], dense.model.layers[i].get_submodule(sub), items)
        W = dense.get_submodule(path).weight.detach().double()
        kept = [j for j in range(W.shape[1]) if j not in set(removed)]
        ref = torch.linalg.lstsq(X[:, kept], X @ W.T).solution.T
        new = rec.get_submodule(path).weight.detach().double()[:, kept]
        assert torch.allclose(new, ref, atol=1e-5, rtol=1e-5), path
        err_new = ((X @ W.T - X[:, kept] @ new.T) ** 2).sum()
        err_plain = ((X @ W.T - X[:, kept] @ W[:, kept].T) ** 2).sum()
        assert err_new <= err_plain
        info = next(r["consumers"][path] for r in report["layers"] if path in r["consumers"])
        assert info["error_after"] <= info["error_before"]
        assert info["error_after"] == pytest.approx(float(err_new), rel=1e-3)
        assert info["error_before"] == pytest.approx(float(((X[:, removed] @ W[:, removed].T) ** 2).sum()), rel=1e-6)
        assert info["signal"] == pytest.approx(float(((X @ W.T) ** 2).sum()), rel=1e-6)  # ||W X||^2, bias left out


def test_removal_equals_masking_of_the_reconstructed_model(setup):
    model, plan, calib = setup
    rec = copy.deepcopy(model)
    reconstruct(rec, plan, calib)
    masked = depgraph.mask(copy.deepcopy(rec), plan)
    shrunk = depgraph.shrink(copy.deepcopy(rec), plan)
    x = ids(11, batch=2, length=14)
    with torch.no_grad():
        assert torch.allclose(masked(x).logits, shrunk(x).logits, atol=1e-5)


def test_prune_with_reconstruction_is_closer_to_dense(tmp_path):
    model = ARCHS["llama-gqa"]()
    calib = torch.cat([ids(s, batch=4, length=16) for s in range(3)])
    x = ids(21, batch=2, length=16)
    with torch.no_grad():
        ref = model(x).logits
    errs = {}
    weights = {}
    for name, kw in {"plain": {"reconstruct": False}, "lstsq": {"reconstruct": True, "damp": 1.0},
                     "default": {}, "lstsq+bias": {"reconstruct": True, "compensate": True}}.items():
        m = copy.deepcopy(model)
        _, report, _ = depgraph.prune(m, calib, target=0.2, method="l2", kinds=("attention", "mlp"), layers=None,
                                      round_to=1, progress=False, **kw)
        assert report["reconstruct"] == kw.get("reconstruct", True)  # the default: re-fit when calibrated
        assert report["damp"] == (kw.get("damp", 1.0) if report["reconstruct"] else None)
        weights[name] = m.state_dict()
        with torch.no_grad():
            errs[name] = float(((m(x).logits - ref) ** 2).mean())
        if name == "lstsq+bias":
            assert m.model.layers[0].mlp.down_proj.bias is not None
            depgraph.save_pruned(m, tmp_path / "m")
            with torch.no_grad():
                assert torch.equal(depgraph.load_pruned(tmp_path / "m")(x).logits, m(x).logits)
    assert errs["lstsq"] < errs["plain"] and errs["lstsq+bias"] < errs["plain"]
    assert all(torch.equal(v, weights["lstsq"][k]) for k, v in weights["default"].items())  # default = damp 1 fit


def test_prune_gram_dtype_float32_fits_like_float64():
    """``gram_dtype=torch.float32``: the same re-fit as the float64 default to float32 precision, and not the
    un-refitted weights (the dtype reaches the re-fit)."""
    model = ARCHS["llama-gqa"]()
    calib = torch.cat([ids(s, batch=4, length=16) for s in range(3)])
    out = {}
    for name, kw in {"f64": {}, "f32": {"gram_dtype": torch.float32}, "plain": {"reconstruct": False}}.items():
        m = copy.deepcopy(model)
        depgraph.prune(m, calib, target=0.2, method="l2", kinds=("mlp",), layers=None, round_to=1, progress=False,
                       **kw)
        out[name] = m.model.layers[0].mlp.down_proj.weight
    assert torch.allclose(out["f32"], out["f64"], rtol=1e-3, atol=1e-5)
    assert not torch.equal(out["f32"], out["f64"]) and not torch.allclose(out["f64"], out["plain"], atol=1e-4)


def test_default_reconstruct_needs_no_calibration_it_was_not_given():
    """Without calibration data the default prunes as before (no re-fit), so data-free methods keep working."""
    model = ARCHS["llama-gqa"]()
    _, report, _ = depgraph.prune(model, None, target=0.2, method="l2", progress=False)
    assert report["reconstruct"] is False and report["damp"] is None


def test_mean_mode_is_flaps_bias_compensation(setup):
    """Mean-only re-fit: the bias increment W_P mean(X_P); on the first block it equals the one-pass FLAP bias."""
    from depgraph.compensate import bias_deltas

    model, plan, calib = setup
    flap = bias_deltas(copy.deepcopy(model), plan, calib)
    seq = reconstruct(copy.deepcopy(model), plan, calib, ReconstructConfig(mode="mean"))["bias"]
    assert set(seq) == set(flap)
    for path in ("model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj"):
        assert torch.allclose(seq[path], flap[path], atol=1e-6)
    # later blocks see the pruned blocks' outputs, so their means differ
    assert not torch.allclose(seq["model.layers.1.mlp.down_proj"], flap["model.layers.1.mlp.down_proj"], atol=1e-6)


def test_reconstruction_needs_calibration_and_a_known_mode(setup):
    model, plan, _ = setup
    with pytest.raises(depgraph.PlanError, match="needs calibration"):
        reconstruct(copy.deepcopy(model), plan, None)
    with pytest.raises(depgraph.PlanError, match="mode must be one of"):
        ReconstructConfig(mode="obs")
    with pytest.raises(depgraph.PlanError, match="reconstruct=True needs calibration"):
        depgraph.prune(copy.deepcopy(model), None, target=0.1, method="l2", reconstruct=True)


def test_select_obs_rechooses_units_by_greedy_obs_on_the_sequential_inputs():
    """select="obs": the plan's widths, each MLP's units re-chosen during the re-fit by greedy OBS
    (depgraph.refit.obs_select) on the block's sequential calibration inputs; removal equals masking (verify)."""
    from depgraph.refit import obs_select

    model = ARCHS["llama-gqa"]()
    calib = torch.cat([ids(s, batch=4, length=16) for s in range(3)])
    kw = dict(target=0.2, method="l2", layers=None, round_to=1, progress=False)
    by_scores = copy.deepcopy(model)
    _, rep_scores, plans_scores = depgraph.prune(by_scores, calib, **kw)
    pruned = copy.deepcopy(model)
    _, report, plans = depgraph.prune(pruned, calib, select="obs", **kw)
    assert report["select"] == "obs" and rep_scores["select"] == "scores"
    assert report["widths"] == rep_scores["widths"]
    units = {e.group: sorted(e.units) for e in plans[0].entries}
    assert units != {e.group: sorted(e.units) for e in plans_scores[0].entries}
    for i, layer in enumerate(pruned.model.layers):
        # block i's inputs in the pruned model are the sequential ones: only the blocks before it change them
        items = _layer_inputs(pruned, layer, calib)
        dense_mlp = model.model.layers[i].mlp
        X = _consumer_inputs(model.model.layers[i], dense_mlp.down_proj, items)
        entry = next(e for e in plans[0].entries if e.layer == i and e.kind == "mlp")
        want = obs_select(dense_mlp.down_proj.weight.detach(), X.T @ X, range(entry.num_units), len(entry.units),
                          damp=1.0, step=8)
        assert units[entry.group] == sorted(want)
    # on block 0 (the same inputs for both) the re-fit leaves less error than with the l2-chosen units
    err = {name: sum(r["rel_error_after"] for r in rep["reconstruction"] if r["layer"] == 0)
           for name, rep in (("obs", report), ("scores", rep_scores))}
    assert err["obs"] < err["scores"]
    with pytest.raises(depgraph.PlanError, match="select='obs'.*needs reconstruct"):
        depgraph.prune(copy.deepcopy(model), calib, select="obs", reconstruct=False, **kw)
    with pytest.raises(depgraph.PlanError, match="select must be one of"):
        depgraph.prune(copy.deepcopy(model), calib, select="greedy", **kw)


def test_select_shortlist_lets_obs_choose_among_the_lowest_scored_units():
    """select="shortlist": the plan's widths; OBS chooses each MLP's units on the block's sequential inputs, but
    only among the twice as many units of lowest score (depgraph.refit.obs_select's candidates); removal equals
    masking (verify)."""
    from depgraph.importance import score
    from depgraph.refit import obs_select

    model = ARCHS["llama-gqa"]()
    calib = torch.cat([ids(s, batch=4, length=16) for s in range(3)])
    kw = dict(target=0.2, method="l2", layers=None, round_to=1, progress=False)
    scores = score(model, depgraph.trace(model), calib, method="l2", kinds=("mlp",), progress=False)
    pruned = copy.deepcopy(model)
    _, report, plans = depgraph.prune(pruned, calib, select="shortlist", **kw)
    assert report["select"] == "shortlist"
    for i, layer in enumerate(pruned.model.layers):
        items = _layer_inputs(pruned, layer, calib)
        dense_mlp = model.model.layers[i].mlp
        X = _consumer_inputs(model.model.layers[i], dense_mlp.down_proj, items)
        entry = next(e for e in plans[0].entries if e.layer == i and e.kind == "mlp")
        count = len(entry.units)
        shortlist = sorted(range(entry.num_units), key=lambda u: float(scores[entry.group][u]))[:2 * count]
        want = obs_select(dense_mlp.down_proj.weight.detach(), X.T @ X, range(entry.num_units), count,
                          damp=1.0, step=8, candidates=shortlist)
        assert sorted(entry.units) == sorted(want) and set(entry.units) <= set(shortlist)


def test_half_precision_blocks_accumulate_their_gram_matrix_in_float32(setup):
    """bf16 blocks: X^T X in float32 (half the memory of float64, nothing lost from 8-bit inputs); fp32 blocks keep
    float64; an explicit ``gram_dtype`` wins. The float32 sums equal the float64 ones to float32 precision."""
    from depgraph.reconstruct import block_stats, gram_dtype_for
    from depgraph.sparsify import batches_of, capture_layer_inputs, find_layers

    model, _, calib = setup
    _, layers = find_layers(model)
    inputs = capture_layer_inputs(model, layers, batches_of(calib, 4), torch.device("cpu"))
    block = layers[1]
    assert gram_dtype_for(torch.float32) == torch.float64
    assert gram_dtype_for(torch.bfloat16) == gram_dtype_for(torch.float16) == torch.float32
    wide, _ = block_stats(block, inputs, ["mlp.down_proj"])
    narrow, _ = block_stats(block, inputs, ["mlp.down_proj"], dtype=torch.float32)
    assert wide["mlp.down_proj"].gram.dtype == torch.float64 and narrow["mlp.down_proj"].gram.dtype == torch.float32
    assert torch.allclose(narrow["mlp.down_proj"].gram.double(), wide["mlp.down_proj"].gram, rtol=1e-5, atol=1e-5)
    half_model = copy.deepcopy(model).to(torch.bfloat16)
    _, half_layers = find_layers(half_model)
    half_inputs = capture_layer_inputs(half_model, half_layers, batches_of(calib, 4), torch.device("cpu"))
    stats, _ = block_stats(half_layers[1], half_inputs, ["mlp.down_proj"])
    assert stats["mlp.down_proj"].gram.dtype == torch.float32
    assert ReconstructConfig(gram_dtype=torch.float64).gram_dtype == torch.float64


def test_half_precision_blocks_solve_in_their_float32_gram_dtype(setup):
    """A bf16 block's re-fit: the Gram matrix and the solve in float32 (half the time of float64 on a 7B
    ``down_proj``); the new bf16 weights are exactly the float32 solve's, and within bf16 rounding of float64's."""
    from depgraph.reconstruct import block_stats, reconstruct_block
    from depgraph.refit import refit_solve
    from depgraph.sparsify import batches_of, capture_layer_inputs, find_layers

    model, _, calib = setup
    half = copy.deepcopy(model).to(torch.bfloat16)
    _, layers = find_layers(half)
    inputs = capture_layer_inputs(half, layers, batches_of(calib, 4), torch.device("cpu"))
    block, removed = layers[1], list(range(1, 64, 3))
    gathered = block_stats(block, inputs, ["mlp.down_proj"])
    stats = gathered[0]
    W = block.mlp.down_proj.weight.data.clone()
    kept = [j for j in range(W.shape[1]) if j not in set(removed)]
    gram = stats["mlp.down_proj"].gram
    fit32 = refit_solve(W.float(), gram, removed, kept, damp=0.01, dtype=torch.float32)
    fit64 = refit_solve(W.double(), gram, removed, kept, damp=0.01)
    reconstruct_block(block, inputs, {"mlp.down_proj": removed}, ReconstructConfig(damp=0.01), gathered)
    new = block.mlp.down_proj.weight.data[:, kept]
    assert fit32.new.dtype == torch.float32 and new.dtype == torch.bfloat16
    assert torch.equal(new, fit32.new.to(torch.bfloat16))
    assert torch.allclose(new.double(), fit64.new, rtol=1e-2, atol=1e-2)
