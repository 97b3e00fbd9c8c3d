"""A reshape that keeps a prunable dim whole but sizes it by a number (``u.view(-1, 64)`` over MLP neurons): the
neurons stay exact only when that number follows the pruning: read off that dim (``u.view(-1, u.size(-1))``), or an
attribute of the op's module that the shrinker rewrites from a parameter dim of that very space (``Conv1D.nf``).
An attribute nothing rewrites (``self.inter``) or a bare literal blocks the neurons, naming the op and the module."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import depgraph
from masking import blocked_reasons, groups_of, removal_is_masking

OPS = {  # op -> how it reshapes [b*t... , n] keeping the last dim n whole
    "view": lambda u, n: u.view(-1, n),
    "reshape": lambda u, n: u.reshape(-1, n),
    "unflatten": lambda u, n: u.flatten(0, 1).unflatten(-1, (1, n)),
}


class Block(nn.Module):
    def __init__(self, size: str, op: str = "view"):
        super().__init__()
        self.size, self.op, self.inter = size, op, 64
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        b, t, _ = x.shape
        u = torch.relu(self.up(x))
        n = u.size(-1) if self.size == "read" else self.inter if self.size == "attribute" else 64
        return x + self.down(OPS[self.op](u, n)).view(b, t, -1)


def _model_and_input(block):
    torch.manual_seed(0)
    return nn.Sequential(block(), block()).eval(), torch.randn(2, 5, 32)


@pytest.mark.parametrize("op", sorted(OPS))
def test_a_kept_dim_sized_off_itself_stays_exact(op):
    model, x = _model_and_input(lambda: Block("read", op))
    graph = depgraph.trace(model, (x,))
    neurons = groups_of(graph, "0.up.weight")
    assert len(neurons) == 1 and neurons[0].exact and neurons[0].num_units == 64
    removal_is_masking(model, x, graph, {neurons[0].id: [0, 5, 9, 63]})


def test_a_flatten_keeping_the_dim_whole_stays_exact():
    """``flatten`` names no size at all: the kept dim follows the tensor."""
    class Flat(Block):
        def forward(self, x):
            return x + self.down(torch.relu(self.up(x)).flatten(0, 1)).view(x.shape)

    model, x = _model_and_input(lambda: Flat("read"))
    graph = depgraph.trace(model, (x,))
    neurons = groups_of(graph, "0.up.weight")
    assert len(neurons) == 1 and neurons[0].exact
    removal_is_masking(model, x, graph, {neurons[0].id: [1, 2, 40]})


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("size", ["fixed", "attribute"])
def test_a_kept_dim_sized_by_a_number_nothing_rewrites_blocks_the_neurons(size, op):
    model, x = _model_and_input(lambda: Block(size, op))
    graph = depgraph.trace(model, (x,))
    assert not groups_of(graph, "0.up.weight")
    reasons = blocked_reasons(graph, "0.up.weight")
    assert any("literal size 64 in aten." in r and " at 0 " in r for r in reasons), reasons
    if size == "attribute":
        assert any("(= 0.inter)" in r and "not an attribute shrink rewrites" in r for r in reasons), reasons
    # what the graph still calls exact removes as masking does (the hidden space, fed by x)
    for g in graph.groups():
        if g.exact:
            removal_is_masking(model, x, graph, {g.id: [0, 3]})


def test_the_shrunk_model_of_a_fixed_kept_dim_would_not_even_run():
    """Why the neurons must be blocked: pruning them anyway (as the old graph allowed) breaks the view."""
    model, x = _model_and_input(lambda: Block("fixed"))
    graph = depgraph.trace(_model_and_input(lambda: Block("read"))[0], (x,))
    plan = depgraph.Plan.from_units(graph, {groups_of(graph, "0.up.weight")[0].id: [0, 1]})
    with pytest.raises(RuntimeError):
        depgraph.shrink(copy.deepcopy(model), plan, verify=False)(x)


class MLP(nn.Module):
    """GPT-2's MLP: ``Conv1D`` views its output by ``size_out = x.size()[:-1] + (self.nf,)``."""

    def __init__(self, first=Conv1D):
        super().__init__()
        self.c_fc, self.c_proj = first(64, 32), Conv1D(32, 64)

    def forward(self, x):
        return x + self.c_proj(torch.relu(self.c_fc(x)))


def test_a_kept_dim_sized_by_an_attribute_the_fixer_rewrites_is_exact():
    model, x = _model_and_input(MLP)
    graph = depgraph.trace(model, (x,))
    neurons = groups_of(graph, "0.c_fc.weight")
    assert len(neurons) == 1 and neurons[0].exact and neurons[0].num_units == 64
    removal_is_masking(model, x, graph, {neurons[0].id: [0, 7, 33]})
    plan = depgraph.Plan.from_units(graph, {neurons[0].id: [0, 7, 33]})
    shrunk = depgraph.shrink(copy.deepcopy(model), plan, verify=False)
    assert shrunk[0].c_fc.nf == 61 and shrunk[0].c_proj.nx == 61


class WrongDim(Conv1D):
    """A Conv1D sizing its output by ``nx`` (its input width, equal to ``nf`` here): rewritten by the fixer, but
    from the input dim, so it does not follow the output neurons."""

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nx,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


def test_an_attribute_the_fixer_reads_off_another_dim_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(MLP(lambda nf, nx: WrongDim(32, 32)), MLP()).eval()
    model[0].c_proj = Conv1D(32, 32)
    x = torch.randn(2, 5, 32)
    graph = depgraph.trace(model, (x,))
    assert not [g for g in groups_of(graph, "0.c_fc.weight") if g.exact]
    reasons = blocked_reasons(graph, "0.c_fc.weight")
    assert any("literal size 32 in aten.view at 0.c_fc (= 0.c_fc.nf, 0.c_fc.nx)" in r for r in reasons), reasons


def test_multi_query_repeat_kv_keeps_its_heads():
    """GPTBigCode's multi-query ``repeat_kv``: ``reshape(b, 1 * n_rep, t, d)`` keeps the query heads whole, sized
    by the one kv head read off the tensor times ``num_key_value_groups``, which the shrinker rewrites."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    cfg = GPTBigCodeConfig(n_embd=64, n_head=4, n_layer=2, n_inner=128, vocab_size=128, multi_query=True,
                           use_cache=False)
    torch.manual_seed(0)
    model = GPTBigCodeForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 8))
    graph = depgraph.trace(model, (ids,))
    heads = [g for g in graph.groups() if g.kind == "attention"]
    assert len(heads) == 2 and all(g.exact for g in heads)
    plan = depgraph.Plan.from_units(graph, {heads[0].id: [1], heads[1].id: [0, 3]})
    with torch.no_grad():
        masked = depgraph.mask(copy.deepcopy(model), plan)(ids).logits
        shrunk = depgraph.shrink(copy.deepcopy(model), plan, verify=False)(ids).logits
    torch.testing.assert_close(shrunk, masked, rtol=0, atol=1e-5)


def test_a_width_attribute_of_an_expert_block_follows_the_residual():
    """GraniteMoE's expert block views the residual by ``self.input_size``: shrink rewrites it (the residual group's
    ``width_modules``), so the residual stays prunable and the shrunk model runs with the new width."""
    from transformers import GraniteMoeConfig, GraniteMoeForCausalLM

    cfg = GraniteMoeConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=128,
                           use_cache=False)
    torch.manual_seed(0)
    model = GraniteMoeForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 8))
    graph = depgraph.trace(model, (ids,))
    (hidden,) = graph.groups("hidden")
    assert "model.layers.0.block_sparse_moe" in hidden.width_modules
    shrunk = depgraph.shrink(copy.deepcopy(model), depgraph.Plan.from_units(graph, {hidden.id: list(range(3, 11))}))
    assert shrunk.model.layers[0].block_sparse_moe.input_size == 56
    with torch.no_grad():
        assert shrunk(ids).logits.shape == (2, 8, 128)


class WidthView(nn.Module):
    """A plain block viewing the residual by its own ``hidden_size``: nothing rewrites it there."""

    def __init__(self):
        super().__init__()
        self.hidden_size, self.proj = 32, nn.Linear(32, 32)

    def forward(self, x):
        return x + self.proj(x.view(-1, self.hidden_size)).view(x.shape)


def test_a_width_attribute_outside_expert_blocks_blocks_the_residual():
    model, x = _model_and_input(WidthView)
    graph = depgraph.trace(model, (x,))
    assert not groups_of(graph, "0.proj.weight") or not any(g.exact for g in groups_of(graph, "0.proj.weight")
                                                             if any(m.dim == 1 for m in g.members))
    reasons = blocked_reasons(graph, "0.proj.weight[1]")
    assert any("literal size 32 in aten.view at 0 (= 0.hidden_size)" in r for r in reasons), reasons
