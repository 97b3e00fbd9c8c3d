"""Our coupled sets agree with torch-pruning's DependencyGraph (run under a timeout: it hangs on some
GQA shapes, so only MHA and a CNN are compared)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import depgraph
from archs import ARCHS, small_cnn

HERE = os.path.dirname(__file__)


def tp_sets(which):
    pytest.importorskip("torch_pruning")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "tp_groups.py"), which], capture_output=True,
                          text=True, timeout=300, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {k: {tuple(x) for x in v} for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def ours(group):
    return {(m.param, m.dim) for m in group.members if m.param.endswith((".weight", ".bias"))}


def test_llama_mha_agrees_with_torch_pruning():
    theirs = tp_sets("llama")
    graph = depgraph.trace(ARCHS["llama-mha"]())
    assert ours(graph.group("mlp.0")) == theirs["mlp"]
    hidden = ours(graph.group("hidden"))
    # torch-pruning lists the untied lm_head separately; we list every member of the residual stream
    assert hidden == theirs["hidden"]


def test_cnn_agrees_with_torch_pruning():
    theirs = tp_sets("cnn")
    graph = depgraph.trace(small_cnn(), (torch.randn(2, 3, 8, 8),))
    by_size = {g.num_units: ours(g) for g in graph.groups()}
    assert by_size[12] == theirs["inner"]
    assert by_size[8] == theirs["residual"]
