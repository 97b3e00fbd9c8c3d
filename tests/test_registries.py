"""Scoring and sparsity methods register like op rules: one decorated function each; the CLI offers them."""
import importlib

import numpy as np
import pytest
import torch

import depgraph
from archs import ARCHS, ids
from depgraph import importance
from depgraph.cli import build_parser

sp = importlib.import_module("depgraph.sparsify")  # the module (depgraph.sparsify is the function)


def _choices(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return next(a for a in sub.choices[command]._actions if a.dest == "method").choices


@pytest.fixture
def registered():
    before_s, before_p = dict(importance.SCORERS), dict(sp.SPARSIFIERS)

    @importance.scorer("test-square-input", needs="input_norms", consumers_only=True)
    def _square(w, act, act_dim, **_):
        return w * w

    @sp.sparsifier("test-keep-first", stats="norms")
    def _keep_first(w, stats, opts):
        assert stats.count > 0 and opts.sparsity == 0.5
        out = w.float().clone()
        out[:, w.shape[1] // 2:] = 0
        return out, {"tokens": stats.count}

    yield
    importance.SCORERS.clear(), importance.SCORERS.update(before_s)
    sp.SPARSIFIERS.clear(), sp.SPARSIFIERS.update(before_p)


def test_builtin_methods_are_the_registry():
    assert importance.METHODS == importance.methods() == tuple(_choices("prune"))
    assert importance.NEEDS_CALIBRATION == ("taylor", "fisher", "taylor+fisher", "taylor-vector", "activation",
                                            "fluctuation", "obs")
    assert importance.SCORERS["obs"].needs == "gram" and importance.SCORERS["random"].needs is None
    assert sp.METHODS == ("magnitude", "wanda", "sparsegpt") == tuple(_choices("sparsify"))
    with pytest.raises(ValueError, match="unknown needs"):
        importance.scorer("x", needs="hessian-typo")


def test_a_registered_method_is_scored_offered_and_run(registered):
    assert "test-square-input" in _choices("prune") and importance.needs_calibration("test-square-input")
    model = ARCHS["llama-gqa"]()
    graph = depgraph.trace(model)
    s = depgraph.score(model, graph, ids(1, batch=2, length=8), method="test-square-input", progress=False)
    # only the consumer (down_proj, input dim) counts: the squared column norms of each neuron
    w = model.get_submodule("model.layers.0.mlp.down_proj").weight.detach().double()
    assert np.allclose(s["mlp.0"], (w * w).sum(0).numpy(), rtol=1e-5)
    assert "test-keep-first" in _choices("sparsify")
    with pytest.raises(sp.SparsifyError, match="needs calibration"):
        depgraph.sparsify(model, "test-keep-first", sparsity=0.5)
    _, report = depgraph.sparsify(model, "test-keep-first", sparsity=0.5, calibration=ids(2, batch=2, length=8))
    assert report["sparsity"] == 0.5 and report["layers"][0]["modules"]["mlp.down_proj"]["tokens"] == 16
    assert torch.all(model.get_submodule("model.layers.1.mlp.up_proj").weight[:, 24:] == 0)
