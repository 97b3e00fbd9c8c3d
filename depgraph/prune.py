"""prune: trace, score, plan and shrink in one call, with a report of what was removed."""
from __future__ import annotations

import time

from .graph import trace
from .importance import score
from .plan import Plan
from .shrink import shrink


def prune(model, calibration=None, target: float = 0.2, method: str = "taylor", kinds=("attention", "mlp"),
          policy: str = "uniform", layers=None, round_to: int = 8, gqa: str = "heads", aggregate: str = "sum",
          normalize=None):
    """Shrink ``model`` in place by ``target`` (fraction of all parameters); returns (model, report).

    ``calibration``: token ids [N, L] (see :func:`depgraph.calibration.load_calibration`); needed by the
    gradient and activation methods.
    """
    times = {}
    t = time.perf_counter()
    graph = trace(model)
    times["trace_s"] = time.perf_counter() - t
    t = time.perf_counter()
    scores = score(model, graph, calibration, method=method, aggregate=aggregate, normalize=normalize, kinds=kinds)
    times["score_s"] = time.perf_counter() - t
    t = time.perf_counter()
    plan = Plan.from_scores(graph, scores, target, kinds=kinds, policy=policy, layers=layers, round_to=round_to,
                            gqa=gqa)
    times["plan_s"] = time.perf_counter() - t
    before = graph.num_params
    t = time.perf_counter()
    shrink(model, plan)
    times["shrink_s"] = time.perf_counter() - t
    after = sum(p.numel() for p in model.parameters())
    report = {
        "method": method, "target": target, "policy": policy, "params_before": before, "params_after": after,
        "removed_fraction": (before - after) / before, "times": times,
        "groups": [{"group": e.group, "kind": e.kind, "layer": e.layer, "units_before": e.num_units,
                    "units_after": e.units_after, "scores": [float(x) for x in scores[e.group]]}
                   for e in plan.entries],
        "plan": plan,
    }
    return model, report
