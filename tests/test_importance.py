"""Importance scores: hand computations on tiny models."""
import numpy as np
import pytest
import torch

import depgraph
from archs import ARCHS, ids
from depgraph import importance as imp


@pytest.fixture(scope="module")
def gqa():
    model = ARCHS["llama-gqa"]()  # 6 q heads over 2 kv heads, tied embeddings
    return model, depgraph.trace(model)


def _per_sample_grads(model, x, names):
    params = dict(model.named_parameters())
    out = []
    for row in x:
        loss = model(input_ids=row[None], labels=row[None]).loss
        out.append(torch.autograd.grad(loss, [params[n] for n in names]))
    return out


def _mean_loss_grads(model, x, names):
    params = dict(model.named_parameters())
    loss = sum(model(input_ids=r[None], labels=r[None]).loss for r in x) / len(x)
    return dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_taylor_matches_hand_computation(gqa):
    model, graph = gqa
    x = ids(seed=1, batch=3)
    p = "model.layers.0.mlp."
    names = [p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"]
    g = _mean_loss_grads(model, x, names)
    w = dict(model.named_parameters())
    e = {n: (w[n] * g[n]).abs().detach() for n in names}
    want = (e[names[0]].sum(1) + e[names[1]].sum(1) + e[names[2]].sum(0)).double().numpy()
    got = imp.score(model, graph, x, method="taylor", kinds="mlp", progress=False)
    assert set(got) == {"mlp.0", "mlp.1"}
    np.testing.assert_allclose(got["mlp.0"], want, rtol=1e-4, atol=1e-9)

    # taylor-vector: |sum of w*g over the unit's elements|, per member
    s = {n: (w[n] * g[n]).detach() for n in names}
    want_v = (s[names[0]].sum(1).abs() + s[names[1]].sum(1).abs() + s[names[2]].sum(0).abs()).double().numpy()
    got_v = imp.score(model, graph, x, method="taylor-vector", kinds="mlp", progress=False)
    np.testing.assert_allclose(got_v["mlp.0"], want_v, rtol=1e-4, atol=1e-9)


def test_fisher_accumulates_every_sample(gqa):
    model, graph = gqa
    x = ids(seed=2, batch=4)
    names = ["model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"]  # embed is tied to lm_head
    per = _per_sample_grads(model, x, names)
    stats = imp.gradient_stats(model, graph, x, progress=False)
    assert stats.num_samples == 4
    for k, n in enumerate(names):
        gs = torch.stack([p[k] for p in per])
        np.testing.assert_allclose(stats.grad[n].numpy(), gs.mean(0).numpy(), rtol=1e-4, atol=1e-8)
        np.testing.assert_allclose(stats.fisher[n].numpy(), (gs ** 2).mean(0).numpy(), rtol=1e-4, atol=1e-10)
        last = gs[-1] ** 2
        for wrong in (last, last / len(x)):  # Torch-Pruning keeps only the last sample's g^2
            assert not torch.allclose(stats.fisher[n], wrong, rtol=1e-2, atol=0)
    # only group-member parameters are tracked; the tied lm_head is folded into the embedding
    assert "lm_head.weight" not in stats.grad
    assert set(stats.grad) == {n for n, _ in model.named_parameters()}

    # fisher and taylor+fisher element scores from those stats
    w = dict(model.named_parameters())[names[0]].detach()
    gm, fm = stats.grad[names[0]], stats.fisher[names[0]]
    grp = graph.group("mlp.1")
    f = imp.score(model, graph, method="fisher", kinds="mlp", stats=stats)["mlp.1"]
    tf = imp.score(model, graph, method="taylor+fisher", kinds="mlp", stats=stats)["mlp.1"]
    down = [m for m in grp.members if m.param == names[0]][0]
    assert down.dim == 1
    rest = [m for m in grp.members if m.param != names[0]]
    params = dict(model.named_parameters())

    def unit_sum(fn):
        total = fn(w, gm, fm).sum(0)
        for m in rest:
            pw = params[m.param].detach()
            total = total + fn(pw, stats.grad[m.param], stats.fisher[m.param]).sum(1)
        return total.double().numpy()

    np.testing.assert_allclose(f, unit_sum(lambda w_, g_, f_: 0.5 * w_ ** 2 * f_), rtol=1e-4)
    np.testing.assert_allclose(tf, unit_sum(lambda w_, g_, f_: (w_ * g_ - 0.5 * w_ ** 2 * f_).abs()), rtol=1e-4)


def test_aggregation_and_normalisation(gqa):
    model, graph = gqa
    p = dict(model.named_parameters())
    pre = "model.layers.0.mlp."
    rows = np.stack([p[pre + "gate_proj.weight"].detach().abs().sum(1).double().numpy(),
                     p[pre + "up_proj.weight"].detach().abs().sum(1).double().numpy(),
                     p[pre + "down_proj.weight"].detach().abs().sum(0).double().numpy()])
    for how, want in {"sum": rows.sum(0), "mean": rows.mean(0), "max": rows.max(0), "prod": rows.prod(0)}.items():
        got = imp.score(model, graph, method="l1", aggregate=how, kinds="mlp")["mlp.0"]
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=how)
    raw = imp.score(model, graph, method="l1", kinds=("mlp", "attention"))
    by_mean = imp.score(model, graph, method="l1", kinds=("mlp", "attention"), normalize="mean")
    by_max = imp.score(model, graph, method="l1", kinds=("mlp", "attention"), normalize="max")
    assert set(raw) == {"attention.0", "attention.1", "mlp.0", "mlp.1"}
    for gid in raw:
        np.testing.assert_allclose(by_mean[gid].mean(), 1.0)
        np.testing.assert_allclose(by_max[gid].max(), 1.0)
        np.testing.assert_allclose(by_mean[gid], raw[gid] / raw[gid].mean())
        assert (np.argsort(by_max[gid]) == np.argsort(raw[gid])).all()
    with pytest.raises(ValueError):
        imp.score(model, graph, method="l1", aggregate="median")
    with pytest.raises(ValueError):
        imp.score(model, graph, method="nope")
    with pytest.raises(ValueError):
        imp.score(model, graph, None, method="taylor")


def test_magnitude_is_per_unit_l2_of_slices(gqa):
    model, graph = gqa
    p = {n: t.detach().double() for n, t in model.named_parameters()}
    got = imp.score(model, graph, method="magnitude")
    assert set(got) == {g.id for g in graph.groups()}
    np.testing.assert_allclose(got["mlp.1"], imp.score(model, graph, method="l2")["mlp.1"])
    pre = "model.layers.1.mlp."
    want = (p[pre + "gate_proj.weight"].norm(dim=1) + p[pre + "up_proj.weight"].norm(dim=1)
            + p[pre + "down_proj.weight"].norm(dim=0)).numpy()
    np.testing.assert_allclose(got["mlp.1"], want, rtol=1e-6)

    # GQA attention: 6 q heads of 8 over 2 kv heads; a kv group's k/v norms are shared by its 3 q heads
    att = graph.group("attention.0")
    kv, rep = att.gqa
    hd = att.head_dim
    a = "model.layers.0.self_attn."
    want = []
    for h in range(att.num_units):
        q = p[a + "q_proj.weight"][h * hd:(h + 1) * hd].norm()
        o = p[a + "o_proj.weight"][:, h * hd:(h + 1) * hd].norm()
        kg = h // rep
        k = p[a + "k_proj.weight"][kg * hd:(kg + 1) * hd].norm()
        v = p[a + "v_proj.weight"][kg * hd:(kg + 1) * hd].norm()
        want.append(float(q + o + (k + v) / rep))
    np.testing.assert_allclose(got["attention.0"], want, rtol=1e-6)

    # hidden channels: the tied embedding (one member) and every input column / norm entry
    hid = got["hidden"]
    assert hid.shape == (48,) and (hid > 0).all()


def test_scoring_leaves_model_unchanged(gqa):
    model, graph = gqa
    before = _state(model)
    flags = {n: t.requires_grad for n, t in model.named_parameters()}
    model.model.norm.weight.requires_grad_(False)  # a frozen parameter stays frozen
    for method in ("taylor", "taylor+fisher", "activation"):
        imp.score(model, graph, ids(batch=2), method=method, progress=False)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(t.grad is None for t in model.parameters())
    assert not model.model.norm.weight.requires_grad
    model.model.norm.weight.requires_grad_(True)
    assert flags == {n: t.requires_grad for n, t in model.named_parameters()}
    assert not model.training


def test_activation_needs_no_backward(gqa, monkeypatch):
    model, graph = gqa
    x = ids(seed=3, batch=2)

    def no_backward(*a, **k):
        raise AssertionError("activation scoring ran a backward pass")

    monkeypatch.setattr(torch.autograd, "backward", no_backward)
    stats = imp.activation_stats(model, graph, x, progress=False)
    got = imp.score(model, graph, x, method="activation", kinds="mlp", progress=False)["mlp.0"]
    monkeypatch.undo()
    assert all(t.grad is None for t in model.parameters())

    # q/k/v of layer 0 read input_layernorm(embeddings): squared L2 norm per feature over all tokens
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(x))
    sq = h.pow(2).sum((0, 1))
    for n in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(stats[f"model.layers.0.self_attn.{n}.weight"], sq, rtol=1e-5, atol=1e-6)
    assert "model.embed_tokens.weight" in stats  # the tied lm_head reads the final hidden state

    # mlp.0: gate/up rows are output rows (fallback |w|); down_proj columns are inputs: |w| * ||x_j||
    p = {n: t.detach().double() for n, t in model.named_parameters()}
    pre = "model.layers.0.mlp."
    norm = stats[pre + "down_proj.weight"].double().sqrt()
    want = (p[pre + "gate_proj.weight"].abs().sum(1) + p[pre + "up_proj.weight"].abs().sum(1)
            + (p[pre + "down_proj.weight"].abs() * norm[None]).sum(0)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_fluctuation_is_variance_times_squared_consumer_weights(gqa):
    """FLAP's metric: Var_tokens(x_j) * ||W[:, j]||^2 of the consumer (o_proj / down_proj) alone."""
    model, graph = gqa
    x = ids(seed=4, batch=3)
    seen = {}
    layer = model.model.layers[1]
    hooks = [layer.mlp.down_proj.register_forward_hook(lambda m, i, o: seen.setdefault("mlp", []).append(i[0])),
             layer.self_attn.o_proj.register_forward_hook(lambda m, i, o: seen.setdefault("attn", []).append(i[0]))]
    with torch.no_grad():
        for row in x:
            model(input_ids=row[None])
    for h in hooks:
        h.remove()
    got = imp.score(model, graph, x, method="fluctuation", kinds=("mlp", "attention"), progress=False)

    def var(key):
        a = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[key]]).double()
        return a.var(0, unbiased=False)

    w = layer.mlp.down_proj.weight.detach().double()
    np.testing.assert_allclose(got["mlp.1"], (w.pow(2).sum(0) * var("mlp")).numpy(), rtol=1e-5)
    # heads: the sum over each head's head_dim input columns of o_proj
    w = layer.self_attn.o_proj.weight.detach().double()
    per_col = (w.pow(2).sum(0) * var("attn")).numpy()
    heads = graph.group("attention.1").num_units
    np.testing.assert_allclose(got["attention.1"], per_col.reshape(heads, -1).sum(1), rtol=1e-5)

    # a feature that is constant over the calibration tokens carries no information: score 0
    saved = _state(model)
    with torch.no_grad():
        layer.mlp.up_proj.weight[3].zero_()
        layer.mlp.gate_proj.weight[3].zero_()
    try:
        s = imp.score(model, graph, x, method="fluctuation", kinds="mlp", progress=False)["mlp.1"]
        assert s[3] == pytest.approx(0.0, abs=1e-12) and (np.delete(s, 3) > 0).all()
    finally:
        model.load_state_dict(saved)


def test_fluctuation_needs_calibration(gqa):
    model, graph = gqa
    with pytest.raises(ValueError, match="'fluctuation' needs calibration"):
        imp.score(model, graph, method="fluctuation")


def test_random_is_seeded(gqa):
    model, graph = gqa
    a = imp.score(model, graph, method="random", seed=1)
    b = imp.score(model, graph, method="random", seed=1)
    c = imp.score(model, graph, method="random", seed=2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)
    assert all(a[g.id].shape == (g.num_units,) for g in graph.groups())


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_other_architectures(arch):
    model = ARCHS[arch]()
    graph = depgraph.trace(model)
    x = ids(batch=2, length=8)
    for method in ("taylor", "activation"):
        s = imp.score(model, graph, x, method=method, progress=False)
        assert s and all(s[g.id].shape == (g.num_units,) and np.isfinite(s[g.id]).all() and (s[g.id] >= 0).all()
                         for g in graph.groups())
    if arch == "gpt2":  # Conv1D layers read their input along dim 0
        stats = imp.activation_stats(model, graph, x, progress=False)
        assert stats["transformer.h.0.mlp.c_proj.weight"].shape == (64,)


def test_batched_gradient_equals_mean_of_per_sample_gradients():
    """First-order methods take one batched pass; with equal lengths its gradient is the per-sample mean."""
    import depgraph
    from archs import ARCHS, ids
    from depgraph.importance import gradient_stats

    model = ARCHS["llama-gqa"]()
    graph = depgraph.trace(model)
    batch = ids(11, batch=3, length=12)
    per = gradient_stats(model, graph, batch, progress=False)
    once = gradient_stats(model, graph, batch, progress=False, per_sample=False)
    assert once.fisher == {} and once.num_samples == 3
    for name, g in per.grad.items():
        torch.testing.assert_close(once.grad[name], g, rtol=1e-4, atol=1e-6)


def test_obs_is_the_consumer_error_left_after_the_least_squares_refit(gqa):
    """OBS cost of a neuron / head = ||W X - W' X_S||^2 with the other columns re-fitted (depgraph.refit)."""
    from depgraph.refit import output_error, refit

    model, graph = gqa
    x = torch.cat([ids(seed=s, batch=4, length=16) for s in range(3)])
    layer = model.model.layers[1]
    seen = {}
    hooks = [layer.mlp.down_proj.register_forward_hook(lambda m, i, o: seen.setdefault("mlp", []).append(i[0])),
             layer.self_attn.o_proj.register_forward_hook(lambda m, i, o: seen.setdefault("attn", []).append(i[0]))]
    grams = imp.gram_stats(model, graph, x, progress=False)
    for h in hooks:
        h.remove()
    got = imp.obs_scores(model, graph, grams, graph.groups(("mlp", "attention")), damp=0.0)
    assert got.keys() == {g.id for g in graph.groups(("mlp", "attention"))}
    for key, gid, mod in (("mlp", "mlp.1", layer.mlp.down_proj), ("attn", "attention.1", layer.self_attn.o_proj)):
        X = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[key]]).double()
        H, W = X.T @ X, mod.weight.detach().double()
        per = W.shape[1] // graph.group(gid).num_units
        for u in (0, 2):
            G = list(range(u * per, (u + 1) * per))
            S = [j for j in range(W.shape[1]) if j not in G]
            assert got[gid][u] == pytest.approx(output_error(W, H, G, refit(W, H, G, S, damp=0.0), S), rel=1e-4)
    s = imp.score(model, graph, x, method="obs", kinds="mlp", progress=False)
    assert (s["mlp.1"] > 0).all()
    with pytest.raises(ValueError, match="'obs' needs calibration"):
        imp.score(model, graph, method="obs")


def test_input_stats_are_the_same_whatever_the_batch(gqa):
    """input_stats runs 8 calibration rows per forward: the same count and sums as one row at a time."""
    model, graph = gqa
    x = ids(seed=4, batch=11)
    one, batched = (imp.input_stats(model, graph, x, progress=False, batch_size=b) for b in (1, 8))
    assert one.keys() == batched.keys()
    for w, s in one.items():
        assert batched[w].count == s.count == 11 * x.shape[1]
        torch.testing.assert_close(batched[w].sumsq, s.sumsq, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(batched[w].sum, s.sum, rtol=1e-6, atol=1e-6)
