"""target_of: a parameter target counted against all parameters or the non-embedding ones (tied and untied heads)."""
import json
import re

import pytest
import torch

import depgraph
from archs import ARCHS, ids
from depgraph.errors import PlanError
from depgraph.importance import score
from depgraph.plan import Budget, Plan, most_removable

TIED, UNTIED = "llama-gqa", "llama-mha"  # tie_word_embeddings True / False


def _big_vocab(tie: bool):
    """A tiny Llama whose embedding table is most of it (as Gemma 3 270M's 63%)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, use_cache=False)
    return LlamaForCausalLM(config).eval()


def _embedding_numel(model) -> int:
    tensors = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())}
    return sum(tensors.values())


def _step(graph, kinds, layers=None) -> int:
    """Parameters one uniform step removes (one unit of every selected group, round_to=1): the rounding step."""
    groups = [g for g in graph.groups(kinds) if layers is None or g.layer in layers]
    return Plan.from_units(graph, {g.id: [0] for g in groups}).params_removed()


@pytest.mark.parametrize("arch", [TIED, UNTIED])
def test_embedding_params_are_the_input_table_and_the_output_head(arch):
    model = ARCHS[arch]()
    graph = depgraph.trace(model)
    names = set(graph.embedding_params)
    want = {"model.embed_tokens.weight"} | ({"lm_head.weight"} if arch == UNTIED else set())
    assert names == want
    assert graph.num_embedding_params == _embedding_numel(model)


def test_position_tables_count_as_embeddings():
    model = ARCHS["gpt2"]()
    graph = depgraph.trace(model)
    assert set(graph.embedding_params) == {"transformer.wte.weight", "transformer.wpe.weight"}  # lm_head tied to wte


@pytest.mark.parametrize("arch", [TIED, UNTIED])
@pytest.mark.parametrize("target", [0.15, 0.3])
def test_non_embedding_target_removes_that_share_of_the_rest(arch, target):
    model = ARCHS[arch]()
    graph = depgraph.trace(model)
    emb = graph.num_embedding_params
    before = {n: p.clone() for n, p in model.named_parameters() if n in graph.embedding_params}
    _, report, plans = depgraph.prune(model, None, target=target, method="l2", kinds=("mlp",), layers=None,
                                      round_to=1, progress=False, target_of="non-embedding")
    rest = report["params_before"] - emb
    removed = report["params_before"] - report["params_after"]
    step = _step(graph, ("mlp",))
    assert abs(removed / rest - target) <= step / rest  # within one rounding step of the target
    assert report["non_embedding_removed_fraction"] == pytest.approx(removed / rest)
    assert report["removed_fraction"] == pytest.approx(removed / report["params_before"])
    assert report["removed_fraction"] < report["non_embedding_removed_fraction"]
    assert report["target_of"] == "non-embedding" and report["embedding"]["before"] == emb == \
        report["embedding"]["after"]
    for n, p in model.named_parameters():  # the embeddings are untouched
        if n in before:
            assert torch.equal(p, before[n])


@pytest.mark.parametrize("arch", [TIED, UNTIED])
def test_non_embedding_plan_is_the_all_plan_at_the_scaled_target(arch):
    """With no embedding column removed the two budgets differ by a constant: T of the rest is T*(N-E)/N of all."""
    model = ARCHS[arch]()
    graph = depgraph.trace(model)
    scores = score(model, graph, None, method="l2", kinds=("mlp",), progress=False)
    n, e = graph.num_params, graph.num_embedding_params
    ours = Plan.from_scores(graph, scores, 0.3, kinds=("mlp",), round_to=1, target_of="non-embedding")
    theirs = Plan.from_scores(graph, scores, 0.3 * (n - e) / n, kinds=("mlp",), round_to=1)
    assert ours.to_json() == theirs.to_json() and ours.entries
    assert Plan.from_scores(graph, scores, 0.3, kinds=("mlp",), round_to=1).params_removed() > ours.params_removed()


@pytest.mark.parametrize("arch", [TIED, UNTIED])
def test_all_is_the_default_and_unchanged(arch):
    a_model, b_model = ARCHS[arch](), ARCHS[arch]()
    _, a, pa = depgraph.prune(a_model, None, target=0.2, method="l2", round_to=1, progress=False)
    _, b, pb = depgraph.prune(b_model, None, target=0.2, method="l2", round_to=1, progress=False, target_of="all")
    assert pa[0].to_json() == pb[0].to_json() and a["target_of"] == b["target_of"] == "all"
    graph = depgraph.trace(ARCHS[arch]())
    step = _step(graph, ("mlp",), a["layers"])
    assert abs(a["removed_fraction"] - 0.2) <= step / a["params_before"]


def test_hidden_channels_removed_from_the_table_do_not_count():
    """Pruning the hidden stream removes embedding columns too: a non-embedding budget counts only the rest."""
    model = ARCHS[TIED]()
    graph = depgraph.trace(model)
    rest = graph.num_params - graph.num_embedding_params
    _, report, plans = depgraph.prune(model, None, target=0.1, method="l2", kinds=("hidden",), layers=None, round_to=1,
                                      progress=False, target_of="non-embedding")
    emb = report["embedding"]
    assert emb["after"] < emb["before"]
    gone = plans[0].params_removed(graph.embedding_params)
    assert gone == (rest - (report["params_after"] - emb["after"]))
    assert report["non_embedding_removed_fraction"] == pytest.approx(gone / rest)
    step = _step(graph, ("hidden",))  # one channel (its table column included)
    assert abs(gone / rest - 0.1) <= step / rest


def test_iterative_non_embedding_target():
    model = ARCHS[UNTIED]()
    _, report, plans = depgraph.prune(model, None, target=0.3, method="l2", kinds=("mlp",), layers=None, round_to=1,
                                      steps=3, progress=False, target_of="non-embedding")
    assert len(plans) == 3
    step = _step(depgraph.trace(ARCHS[UNTIED]()), ("mlp",))
    rest = report["params_before"] - report["embedding"]["before"]
    assert abs(report["non_embedding_removed_fraction"] - 0.3) <= 1.5 * step / rest


@pytest.mark.parametrize("tie", [True, False])
def test_refusal_gives_the_largest_reachable_fraction_in_the_same_units(tie):
    model = _big_vocab(tie)
    graph = depgraph.trace(model)
    n, e = graph.num_params, graph.num_embedding_params
    assert e > 0.6 * n
    most = most_removable(graph, ("mlp",), None, 8).params_removed()
    reach_all, reach_rest = most / n, most / (n - e)
    assert reach_all < 0.2 < 0.4 < reach_rest  # 0.2 of all is out of reach, 0.4 of the rest is not
    with pytest.raises(PlanError) as err:
        depgraph.prune(_big_vocab(tie), None, target=0.2, method="l2", kinds=("mlp",), layers=None, progress=False)
    text = str(err.value)
    assert f"at most {reach_all:.4f} ({100 * reach_all:.1f}%) of the parameters can be removed" in text
    assert "target_of='non-embedding'" in text and "\n" not in text  # the hint: the embeddings are most of it
    with pytest.raises(PlanError) as err:
        depgraph.prune(_big_vocab(tie), None, target=0.9, method="l2", kinds=("mlp",), layers=None, progress=False,
                       target_of="non-embedding")
    text = str(err.value)
    assert text.startswith("target 0.9 (of the non-embedding parameters) cannot be met: at most "
                           f"{reach_rest:.4f} ({100 * reach_rest:.1f}%) of the non-embedding parameters can be removed")
    _, report, _ = depgraph.prune(model, None, target=0.4, method="l2", kinds=("mlp",), layers=None, round_to=1,
                                  progress=False, target_of="non-embedding")
    assert report["non_embedding_removed_fraction"] == pytest.approx(0.4, abs=_step(graph, ("mlp",)) / (n - e))


@pytest.mark.parametrize("kwargs,message", [
    ({"target_of": "nonembedding"}, "target_of must be one of 'all', 'non-embedding', got 'nonembedding'"),
    ({"target_of": None}, "target_of must be one of"),
    ({"target_of": "non-embedding", "target": None, "ratios": {"mlp": 0.2}}, "target_of='non-embedding' says"),
    ({"target_of": "bogus", "stream": True}, "target_of must be one of"),  # before the checkpoint is read
])
def test_bad_target_of_is_refused_before_the_model_is_touched(kwargs, message, tmp_path):
    model = ARCHS[UNTIED]()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = {"target": 0.2, **kwargs}
    if kwargs.get("stream"):
        kwargs.update(output=tmp_path / "out", checkpoint=tmp_path / "none")
    with pytest.raises(PlanError, match=message):
        depgraph.prune(model, ids(2), method="l2", progress=False, **kwargs)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not (tmp_path / "out").exists()


def test_budget_counts():
    graph = depgraph.trace(ARCHS[UNTIED]())
    all_, rest = Budget.of(graph), Budget.of(graph, "non-embedding")
    assert all_.total == graph.num_params and not all_.skip
    assert rest.total == graph.num_params - graph.num_embedding_params
    assert rest.skip == frozenset({"model.embed_tokens.weight", "lm_head.weight"})


def test_cli_target_of(tmp_path, capsys):
    from depgraph.cli import main
    from test_evaluate import _tiny_model
    from tiny import tiny_tokenizer

    folder = tmp_path / "tiny"
    tok = tiny_tokenizer()
    _tiny_model(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "pruned"
    rc = main(["prune", str(folder), "--target", "0.2", "--target-of", "non-embedding", "--method", "magnitude",
               "--round-to", "1", "--layers", "all", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["target_of"] == "non-embedding"
    assert abs(report["non_embedding_removed_fraction"] - 0.2) < 0.02
    assert f"{100 * report['non_embedding_removed_fraction']:.1f}% of the non-embedding parameters" in printed
    card = (out / "README.md").read_text()
    assert "target 0.2 of the non-embedding parameters" in card
    html = (out / "report.html").read_text()
    assert "removed of non-embedding" in html and f"{report['non_embedding_removed_fraction']:.2%}" in html
    for argv, message in ((["--target-of", "rest"], "invalid choice: 'rest'"),
                          (["--ratios", "mlp=0.2", "--target-of", "non-embedding"], "--target-of applies to --target")):
        assert main(["prune", str(folder), "--method", "magnitude", "-o", str(tmp_path / "x"), *argv]) != 0
        err = capsys.readouterr().err
        assert re.search(re.escape(message), err), err
        assert not (tmp_path / "x").exists()
