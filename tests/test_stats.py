"""depgraph.stats: the linear-like layers and the one calibration-statistics collector."""
import torch

import depgraph
from archs import ARCHS, ids
from depgraph.stats import Collector, InputStats, collect, consumers, linear_layers


def _inputs(model, path, calib):
    """Every input row of module ``path`` over ``calib``, one forward per row: [tokens, in] float64."""
    acc = []
    h = model.get_submodule(path).register_forward_hook(lambda m, a, o: acc.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for row in calib:
            model(row.unsqueeze(0))
    h.remove()
    return torch.cat(acc).double()


def test_linear_layers_know_conv1d_is_transposed():
    model = ARCHS["gpt2"]()
    views = linear_layers(model)
    fc = views["transformer.h.0.mlp.c_fc"]  # Conv1D: weight [in=48, out=64]
    assert fc.in_dim == 0 and (fc.in_features, fc.out_features) == (48, 64)
    assert fc.weight().shape == (64, 48) and fc.weight().data_ptr() == fc.module.weight.data_ptr()
    x = torch.randn(3, 48)
    assert torch.allclose(fc.module(x), x @ fc.weight().t() + fc.module.bias, atol=1e-6)
    head = views["lm_head"]  # nn.Linear [out, in]
    assert head.in_dim == 1 and (head.in_features, head.out_features) == (48, 96)
    # the graph's consumers: the layers that read a prunable space along their input dim
    graph = depgraph.trace(model)
    cons = consumers(model, graph)
    assert "transformer.h.0.mlp.c_proj" in cons and "transformer.h.1.attn.c_proj" in cons
    assert all(v.in_dim == 0 for path, (_, v) in cons.items() if path.startswith("transformer.h"))


def test_collect_matches_direct_moments_and_gram():
    model = ARCHS["gpt2"]()
    calib = ids(1, batch=5, length=10)
    path = "transformer.h.1.mlp.c_proj"
    x = _inputs(model, path, calib)
    for batch_size in (1, 2):
        s = collect(model, [path], calib, gram=True, batch_size=batch_size)[path]
        assert s.count == x.shape[0] == 50
        assert torch.allclose(s.sum, x.sum(0), atol=1e-9) and torch.allclose(s.sumsq, (x * x).sum(0), atol=1e-9)
        assert torch.allclose(s.gram, x.t() @ x, atol=1e-8)
        assert torch.allclose(s.mean, x.mean(0), atol=1e-12)
        assert torch.allclose(s.var, x.var(0, unbiased=False), atol=1e-9)
        assert torch.allclose(s.hessian(), 2 * x.t() @ x / 50, atol=1e-8)
    assert collect(model, [path], calib)[path].gram is None


def test_collector_keys_share_statistics():
    """Two modules under one key (a tied weight used twice) accumulate together; float32 when asked."""
    lin = torch.nn.Linear(4, 3)
    other = torch.nn.Linear(4, 2)
    a, b = torch.randn(5, 4), torch.randn(7, 4)
    with Collector([("w", lin), ("w", other)], dtype=torch.float32) as col:
        lin(a)
        other(b)
    s = col.stats["w"]
    assert s.count == 12 and s.sum.dtype == torch.float32
    assert torch.allclose(s.sumsq, (torch.cat([a, b]) ** 2).sum(0), atol=1e-5)
    lin(a)  # hooks are gone after the block
    assert col.stats["w"].count == 12
    z = InputStats.zeros(4)
    try:
        z.hessian()
    except ValueError as e:
        assert "gram=True" in str(e)
    else:
        raise AssertionError("no error")
