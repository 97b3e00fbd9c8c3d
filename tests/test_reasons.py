"""Block and inexact reasons are data on the graph (op, module path, kind) as well as text."""
import copy
import pickle

import depgraph
from archs import ARCHS
from depgraph.layout import Reason


def test_inexact_and_blocked_reasons_carry_op_and_module():
    graph = depgraph.trace(ARCHS["llama-gqa"]())
    inexact = [r for g in graph.groups() for r in g.inexact_reasons]
    norms = [r for r in inexact if isinstance(r, Reason) and r.module.endswith("input_layernorm")]
    assert norms, inexact[:5]
    r = norms[0]
    assert r.kind == "inexact" and r.op and r == f"{r.message} ({r.op} at {r.module})"
    blocked = [r for b in graph.blocked for r in b["reasons"] if isinstance(r, Reason) and r.op]
    assert blocked and all(r.kind == "blocked" for r in blocked)


def test_reason_is_its_text_and_survives_copies():
    r = Reason("contracted between two activations", "matmul", "model.layers.0.self_attn")
    assert r == "contracted between two activations (matmul at model.layers.0.self_attn)"
    assert str(Reason("created", "view", "")) == "created (view at <root>)" and Reason("plain") == "plain"
    for c in (copy.deepcopy(r), pickle.loads(pickle.dumps(r))):
        assert (c, c.op, c.module, c.kind) == (r, "matmul", "model.layers.0.self_attn", "blocked")


def test_viz_reads_the_reduction_from_the_reasons():
    from viz.draw import draw

    graph = depgraph.trace(ARCHS["llama-gqa"]())
    assert "inexact: mean reduces over it" in draw(graph, layer=1).source  # the RMSNorm's op, from Reason.op
    for g in graph.groups():  # the same texts without the data: viz no longer parses them
        g.inexact_reasons = [str(r) for r in g.inexact_reasons]
    assert "inexact: mean reduces over it" not in draw(graph, layer=1).source
