"""sparsify: magnitude, Wanda and SparseGPT, unstructured and N:M, layer by layer, on dense and shrunk models."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import depgraph
from archs import ARCHS, ids
from depgraph import cli
from depgraph.sparsify import (METHODS, SparsifyError, capture_layer_inputs, run_layer, check_nm, find_layers,
                               layer_linears, magnitude_mask, parse_nm, sparsegpt_prune, sparsify,
                               to_semi_structured, wanda_mask)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def _linears(model):
    path, layers = find_layers(model)
    for i, layer in enumerate(layers):
        for n, m in layer_linears(layer):
            yield f"{path}.{i}.{n}", (m.weight if isinstance(m, nn.Linear) else m.weight.t())


# ----------------------------------------------------------------------------------------------------------------------
# Wanda by hand
# ----------------------------------------------------------------------------------------------------------------------

# input feature norms over the calibration tokens are [1, 2, 3, 4] (tokens 0..3 once each, embedding diag(1..4))
W_HAND = torch.tensor([[4.0, 1.5, 1.2, 0.5],     # scores 4, 3, 3.6, 2     -> prune columns 1, 3
                       [-1.0, 2.0, -0.5, 0.3],   # scores 1, 4, 1.5, 1.2   -> prune columns 0, 3
                       [0.2, -0.15, 0.9, -0.6],  # scores .2, .3, 2.7, 2.4 -> prune columns 0, 1
                       [3.0, 0.4, -0.2, 0.05]])  # scores 3, .8, .6, .2    -> prune columns 2, 3
WANDA_HAND = torch.tensor([[False, True, False, True], [True, False, False, True],
                           [True, True, False, False], [False, False, True, True]])
MAGNITUDE_ROW_HAND = torch.tensor([[False, False, True, True], [False, False, True, True],
                                   [True, True, False, False], [False, False, True, True]])


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4, bias=False)

    def forward(self, h):
        return h + self.fc(h)


class _ToyLM(nn.Module):
    """embedding diag(1..4) -> one residual block holding W_HAND."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(4, 4)
        self.layers = nn.ModuleList([_Block()])
        with torch.no_grad():
            self.embed.weight.copy_(torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0])))
            self.layers[0].fc.weight.copy_(W_HAND)

    def forward(self, input_ids, use_cache=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return h


def test_wanda_mask_equals_hand_computation():
    assert torch.equal(wanda_mask(W_HAND, torch.tensor([1.0, 2.0, 3.0, 4.0]), 0.5), WANDA_HAND)
    assert torch.equal(magnitude_mask(W_HAND, 0.5, per_row=True), MAGNITUDE_ROW_HAND)
    # through the layer-by-layer pipeline: the norms come from the calibration tokens
    toy = _ToyLM()
    _, report = sparsify(toy, "wanda", sparsity=0.5, calibration=torch.tensor([[0, 1, 2, 3]]))
    assert torch.equal(toy.layers[0].fc.weight, W_HAND.masked_fill(WANDA_HAND, 0))
    assert report["layers"][0]["modules"]["fc"]["sparsity"] == 0.5
    assert torch.equal(toy.embed.weight, torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0])))  # embeddings untouched
    # magnitude over the whole matrix: the 8 smallest |w|
    toy = _ToyLM()
    sparsify(toy, "magnitude", sparsity=0.5)
    kept = toy.layers[0].fc.weight != 0
    assert kept.sum() == 8 and W_HAND.abs()[kept].min() > W_HAND.abs()[~kept].max()


def test_wanda_nm_by_hand():
    # 2:4 on one group of 4 is the per-row rule with 2 pruned per row
    assert torch.equal(wanda_mask(W_HAND, torch.tensor([1.0, 2.0, 3.0, 4.0]), nm=(2, 4)), WANDA_HAND)


# ----------------------------------------------------------------------------------------------------------------------
# Patterns and achieved sparsity
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_masks_have_exactly_n_per_group(arch, method, nm):
    model = ARCHS[arch]()
    embed = model.get_input_embeddings().weight.detach().clone()
    _, report = sparsify(model, method, nm=nm, calibration=ids(0, 4, 16))
    n, m = nm
    for name, w in _linears(model):
        per_group = (w.reshape(w.shape[0], -1, m) != 0).sum(-1)
        assert (per_group == n).all(), name
    assert report["pattern"] == f"{n}:{m}" and report["sparsity"] == pytest.approx(1 - n / m)
    assert all(r["sparsity"] == pytest.approx(1 - n / m) for r in report["layers"])
    assert torch.equal(model.get_input_embeddings().weight, embed)  # embeddings (and the tied lm_head) untouched


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_achieved_sparsity_equals_request(method, s):
    model = ARCHS["llama-gqa"]()
    _, report = sparsify(model, method, sparsity=s, calibration=ids(1, 4, 16))
    total_zeros = total = 0
    for name, w in _linears(model):
        zeros = int((w == 0).sum())
        total_zeros += zeros
        total += w.numel()
        # rounding to whole weights: within half a weight per row (wanda, the finest comparison set)
        assert abs(zeros / w.numel() - s) <= 0.5 / w.shape[1] + 1e-9, name
    assert report["sparsity"] == pytest.approx(total_zeros / total, abs=1e-6)
    assert report["sparsity"] == pytest.approx(s, abs=0.01)
    assert report["requested"] == s and len(report["layers"]) == 2
    for r in report["layers"]:
        assert set(r["modules"]) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


def test_half_sparsity_is_exact():
    model = ARCHS["llama-gqa"]()
    for method in METHODS:
        m = copy.deepcopy(model)
        _, report = sparsify(m, method, sparsity=0.5, calibration=ids(1, 4, 16))
        assert report["sparsity"] == 0.5
        assert all(v["sparsity"] == 0.5 for r in report["layers"] for v in r["modules"].values())


def test_zero_sparsity_changes_nothing():
    model = ARCHS["llama-gqa"]()
    state = _state(model)
    sparsify(model, "wanda", sparsity=0.0, calibration=ids(0, 2, 8))
    assert _same_state(model, state)


# ----------------------------------------------------------------------------------------------------------------------
# SparseGPT reconstruction
# ----------------------------------------------------------------------------------------------------------------------


def _correlated_inputs(n=512, d=64, rank=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, generator=g)
    a = torch.randn(rank, d, generator=g)
    scale = torch.rand(d, generator=g) * 3 + 0.1  # uneven feature scales, as in LLM activations
    return (z @ a + 0.1 * torch.randn(n, d, generator=g)) * scale


@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"nm": (2, 4)}, {"sparsity": 0.7}])
def test_sparsegpt_reconstruction_beats_magnitude_and_wanda(pattern):
    x = _correlated_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    hessian = 2 * x.t() @ x / x.shape[0]
    err = lambda w2: float(((x @ w.t() - x @ w2.t()) ** 2).sum())  # noqa: E731
    sparsity, nm = pattern.get("sparsity"), pattern.get("nm")
    w_mag = w.masked_fill(magnitude_mask(w, sparsity, nm), 0)
    w_wanda = w.masked_fill(wanda_mask(w, x.norm(dim=0), sparsity, nm), 0)
    w_sgpt, info = sparsegpt_prune(w, hessian, sparsity, nm, blocksize=32)
    expected = 1 - nm[0] / nm[1] if nm else sparsity
    assert float((w_sgpt == 0).float().mean()) == pytest.approx(expected, abs=1e-3)  # whole weights per block
    if nm:
        assert check_nm(w_sgpt, *nm)
    assert err(w_sgpt) < 0.8 * min(err(w_mag), err(w_wanda)), (err(w_sgpt), err(w_mag), err(w_wanda))
    assert info["loss"] > 0


def test_sparsegpt_lazy_batching_is_exact_and_damping_recovers_singular_hessian():
    x = _correlated_inputs(n=16)  # 16 tokens, 64 features: X^T X is singular without damping
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    h = 2 * x.t() @ x / x.shape[0]
    # with N:M the masks are chosen column group by column group, so lazy batching (any block size) changes nothing
    a, _ = sparsegpt_prune(w, h, nm=(2, 4), blocksize=64)
    b, _ = sparsegpt_prune(w, h, nm=(2, 4), blocksize=8)
    assert torch.isfinite(a).all()
    assert torch.equal(a == 0, b == 0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    h0 = h.clone()
    h0[:, 3] = 0
    h0[3, :] = 0  # a dead input feature: its weights go to zero
    c, _ = sparsegpt_prune(w, h0, 0.5)
    assert (c[:, 3] == 0).all() and torch.isfinite(c).all()


# ----------------------------------------------------------------------------------------------------------------------
# Layer by layer
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2", "opt", "phi"])
def test_replaying_captured_inputs_equals_the_forward(arch):
    model = ARCHS[arch]()
    x = ids(3, 2, 10)
    _, layers = find_layers(model)
    outs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in layers]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    (item,) = capture_layer_inputs(model, layers, [x], torch.device("cpu"))
    with torch.no_grad():
        for layer, expected in zip(layers, outs):
            item[0] = run_layer(layer, item)
            torch.testing.assert_close(item[0], expected)


def test_next_layer_is_calibrated_on_sparsified_outputs():
    model = ARCHS["llama-gqa"]()
    dense = copy.deepcopy(model)
    x = ids(4, 4, 16)
    sparsify(model, "wanda", sparsity=0.5, calibration=x, batch_size=3)
    # inputs of layer 1's q_proj (norm of layer 0's sparsified output) -> norms -> Wanda mask of the dense weights
    feats = {}
    up = model.model.layers[1].self_attn.q_proj
    h = up.register_forward_hook(lambda m, a, o: feats.setdefault("x", []).append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(x)
    h.remove()
    norms = torch.cat(feats["x"]).norm(dim=0)
    w_dense = dense.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(up.weight != 0, ~wanda_mask(w_dense, norms, 0.5))


def test_skip_leaves_modules_dense():
    model = ARCHS["llama-gqa"]()
    q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    _, report = sparsify(model, "magnitude", sparsity=0.5, skip=("self_attn",))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q)
    assert set(report["layers"][0]["modules"]) == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


# ----------------------------------------------------------------------------------------------------------------------
# Shrunk models, save and load
# ----------------------------------------------------------------------------------------------------------------------


def _shrunk():
    model = ARCHS["llama-gqa"]()
    graph = depgraph.trace(model)
    depgraph.shrink(model, depgraph.Plan.random(graph, 0.3, kinds=("attention", "mlp")))
    return model


@pytest.mark.parametrize("method", METHODS)
def test_shrunk_model_sparsifies_and_round_trips(method, tmp_path):
    model = _shrunk()
    _, report = sparsify(model, method, sparsity=0.5, calibration=ids(5, 4, 16))
    widths = {r["modules"]["mlp.down_proj"]["numel"] for r in report["layers"]}
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01)
    path = depgraph.save_pruned(model, tmp_path / "sparse", extra_files={"sparsify.json": json.dumps(report)})
    loaded = depgraph.load_pruned(path)
    assert _same_state(loaded, model.state_dict())
    x = ids(6, 2, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    assert json.loads((path / "sparsify.json").read_text())["method"] == method
    assert len(widths) >= 1


def test_nm_on_widths_not_divisible_is_an_error_before_anything_changes():
    model = _shrunk()
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    state = _state(model)
    if all(w % 8 == 0 for w in widths):
        pytest.skip(f"random plan left widths {widths} divisible by 8")
    with pytest.raises(SparsifyError, match="multiples of 8"):
        sparsify(model, "sparsegpt", nm=(4, 8), calibration=ids(0, 2, 8))
    assert _same_state(model, state)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: clear error, nothing modified, nothing written
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "wanda", "sparsity": 1.2}, r"\[0, 1\)"),
    ({"method": "wanda", "sparsity": -0.1}, r"\[0, 1\)"),
    ({"method": "wanda", "nm": (5, 4)}, "0 < N < M"),
    ({"method": "wanda", "nm": "2-4"}, "2:4"),
    ({"method": "obs", "sparsity": 0.5}, "unknown sparsify method 'obs'"),
    ({"method": "wanda", "sparsity": 0.5, "nm": (2, 4)}, "not both"),
    ({"method": "sparsegpt", "nm": (2, 4), "blocksize": 6}, "multiple of M"),
])
def test_bad_arguments_raise_before_anything_changes(kwargs, message):
    model = ARCHS["llama-gqa"]()
    state = _state(model)
    with pytest.raises(SparsifyError, match=message):
        sparsify(model, calibration=ids(0, 2, 8), **kwargs)
    assert _same_state(model, state)
    assert issubclass(SparsifyError, depgraph.DepgraphError) and issubclass(SparsifyError, ValueError)


def test_calibration_methods_need_calibration():
    model = ARCHS["llama-gqa"]()
    for method in ("wanda", "sparsegpt"):
        with pytest.raises(SparsifyError, match="calibration"):
            sparsify(model, method, sparsity=0.5)
    with pytest.raises(SparsifyError, match="token ids"):
        sparsify(model, "wanda", sparsity=0.5, calibration=torch.randn(2, 8))


def test_parse_nm():
    assert parse_nm("2:4") == (2, 4) and parse_nm((4, 8)) == (4, 8)
    for bad in ("5:4", "4:4", "0:4", "a:b", (1,)):
        with pytest.raises(SparsifyError):
            parse_nm(bad)


@pytest.fixture(scope="module")
def saved_dense(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense") / "model"
    return depgraph.save_pruned(ARCHS["llama-gqa"](), path)


@pytest.mark.parametrize("argv, message", [
    (["--sparsity", "1.2"], "[0, 1)"),
    (["--nm", "5:4"], "0 < N < M"),
    (["--method", "nope"], "invalid choice"),
    (["--sparsity", "0.5", "--nm", "2:4"], "not allowed with"),
])
def test_cli_bad_input_writes_nothing(saved_dense, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert cli.main(["sparsify", str(saved_dense), *argv, "-o", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore:.*no loadable tokenizer")
def test_cli_error_after_loading_writes_nothing(tmp_path, capsys):
    src = depgraph.save_pruned(_shrunk(), tmp_path / "shrunk")
    out = tmp_path / "out"
    capsys.readouterr()
    # the tiny models have no tokenizer: wanda cannot tokenize calibration text
    assert cli.main(["sparsify", str(src), "--method", "wanda", "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("depgraph: error: ") and "tokenizer" in err[0]
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:.*no loadable tokenizer")
def test_cli_magnitude_2_4_round_trip(saved_dense, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["sparsify", str(saved_dense), "--method", "magnitude", "--nm", "2:4", "--quiet",
                     "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    report = json.loads((out / "sparsify.json").read_text())
    assert report["pattern"] == "2:4" and report["sparsity"] == 0.5
    model = depgraph.load_pruned(out)
    for name, w in _linears(model):
        assert check_nm(w, 2, 4), name


def test_cli_help():
    assert cli.main(["sparsify", "--help"]) == 0


# ----------------------------------------------------------------------------------------------------------------------
# 2:4 on sparse tensor cores
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_semi_structured_needs_cuda():
    with pytest.raises(SparsifyError, match="CUDA"):
        to_semi_structured(ARCHS["llama-gqa"]())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_semi_structured_matches_masked_dense():
    import transformers as tf

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 sparse tensor cores need Ampere or newer")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    cfg.use_cache = False
    model = tf.LlamaForCausalLM(cfg).eval()
    sparsify(model, "magnitude", nm=(2, 4))
    model = model.half().cuda()
    x = torch.randint(0, 128, (1, 64), device="cuda")
    with torch.no_grad():
        dense = model(x).logits.float()
    result = to_semi_structured(model)
    assert result["converted"], result["skipped"]
    with torch.no_grad():
        sparse = model(x).logits.float()
    torch.testing.assert_close(sparse, dense, atol=5e-2, rtol=5e-2)
