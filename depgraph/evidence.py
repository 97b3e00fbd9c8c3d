"""The trace's one export: the graph to propagate over and what the proof recorders saw while it was traced.

Every int attribute of every module and every size a tensor reports are tagged (:mod:`depgraph.tags`) during that
export, and one watch (:mod:`depgraph.watch`) feeds the three recorders: the literal reads (:mod:`depgraph.reads`,
named afterwards for the modules whose literals need them), the filled tensors (:mod:`depgraph.fills`) and the
constant indices (:mod:`depgraph.indices`). Tagged ints behave as plain ints and leave the exported graph as plain
ints, so the graph is the plain export's. Should that export fail (a forward that breaks on an int subclass), the
graph comes from a plain export and each recorder, when asked, from an export of its own with only what it used
to tag: the same evidence, at the old cost.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import fills, indices, reads
from .capture import Capture, capture
from .watch import watched


@dataclass
class Evidence:
    """What the recorders saw, asked lazily: ``reads(paths)`` (a :class:`depgraph.reads.Reads` for those tagged
    modules), ``fills()`` (:meth:`depgraph.fills.Recorder.proved`), ``indices()`` (a
    :class:`depgraph.indices.Recorder`); each None when its export failed."""

    reads: Callable
    fills: Callable
    indices: Callable


def observe(model, example_inputs=None) -> tuple[Capture, Evidence]:
    """(the capture of ``model``, what the recorders saw), from one export when it succeeds tagged."""
    r, f, i = reads.Recorder(), fills.Recorder(), indices.Recorder()
    cap = watched(model, example_inputs, (r, f, i))
    if cap is not None:
        return cap, Evidence(r.reads, f.proved, lambda: i)
    cap = capture(model, example_inputs)  # a forward the tags break: the plain graph, each proof its own export
    return cap, Evidence(lambda paths: reads.tagged_reads(model, example_inputs, paths),
                         lambda: fills.proved_dims(model, example_inputs),
                         lambda: indices.index_data(model, example_inputs))
