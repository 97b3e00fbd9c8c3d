"""Shared checks of the literal-size tests: removal equals masking, and the reasons a parameter was blocked."""
from __future__ import annotations

import copy

import torch

import depgraph


def removal_is_masking(model, x, graph, units: dict) -> None:
    """Shrinking ``model`` by ``units`` ({group id: units}) computes what masking them does (fp32, 1e-5)."""
    plan = depgraph.Plan.from_units(graph, units)
    with torch.no_grad():
        masked = depgraph.mask(copy.deepcopy(model), plan)(x)
        shrunk = depgraph.shrink(copy.deepcopy(model), plan, verify=False)(x)
    torch.testing.assert_close(shrunk, masked, rtol=0, atol=1e-5)


def groups_of(graph, param: str) -> list:
    """The groups with a member in parameter ``param``."""
    return [g for g in graph.groups() if any(m.param == param for m in g.members)]


def blocked_reasons(graph, prefix: str) -> list:
    """The reasons of every blocked space with a parameter dim starting with ``prefix``."""
    return [r for b in graph.blocked if any(p.startswith(prefix) for p in b["params"]) for r in b["reasons"]]
