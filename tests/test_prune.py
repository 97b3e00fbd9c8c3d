"""depgraph.prune end to end on a tiny model."""
import copy

import torch

import depgraph
from archs import ARCHS, ids


def test_prune_hits_target_and_keeps_working(tmp_path):
    model = ARCHS["llama-gqa"]()
    calib = torch.cat([ids(s, batch=2, length=16) for s in range(2)])
    dense = copy.deepcopy(model)
    pruned, report = depgraph.prune(model, calib, target=0.1, method="taylor", round_to=1)
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
