"""Perplexity (BOS and LLM-Pruner protocols) and lm-eval zero-shot, offline, with a tiny random LLaMA."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from recover.datasets import DataNotFoundError, resolve_data_dir  # noqa: E402
from recover.evaluate import _TEMPLATES, choice_loglikelihoods, perplexity, task_configs, zero_shot  # noqa: E402

from tiny import SENTENCES, tiny_tokenizer  # noqa: E402

TEXT = SENTENCES * 6



def _tiny_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return _tiny_model(len(tok))


def _shared_or_skip() -> Path:
    try:
        return resolve_data_dir()
    except DataNotFoundError as e:
        pytest.skip(f"shared data dir missing ({e})")


# ----------------------------------------------------------------------------- perplexity


def _ppl_by_hand(model, tok, text, window, limit=None):
    ids = tok(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // window
    if limit is not None:
        n = min(n, limit)
    losses = []
    with torch.no_grad():
        for i in range(n):
            w = ids[i * window : (i + 1) * window][None]
            losses.append(model(input_ids=w, labels=w).loss.item())  # mean over window-1 predictions
    return math.exp(sum(losses) / len(losses)), n, ids.numel()


@pytest.mark.parametrize("window,batch_size", [(16, 3), (32, 8), (7, 1)])
def test_perplexity_matches_model_loss(model, tok, window, batch_size):
    r = perplexity(model, tok, text=TEXT, window=window, batch_size=batch_size, progress=False,
                   protocol="llm-pruner")
    ref, n, n_tok = _ppl_by_hand(model, tok, TEXT, window)
    assert r["ppl"] == pytest.approx(ref, rel=1e-5)
    assert r["windows"] == n == n_tok // window
    assert r["tokens"] == n_tok
    assert r["window"] == window
    assert r["predicted_tokens"] == n * (window - 1)


def test_perplexity_batched_equals_unbatched(model, tok):
    """Batching windows (and the in-place ignore_index label of each window's last position) changes nothing."""
    one = perplexity(model, tok, text=TEXT, window=12, batch_size=1, progress=False)
    for bs in (4, 64):
        many = perplexity(model, tok, text=TEXT, window=12, batch_size=bs, progress=False)
        assert many["ppl"] == pytest.approx(one["ppl"], rel=1e-5)
        assert many["predicted_tokens"] == one["predicted_tokens"] == one["windows"] * 11


def test_perplexity_window_semantics_and_limit(model, tok):
    n_tok = len(tok(TEXT).input_ids)
    window = 10
    lp = {"protocol": "llm-pruner", "progress": False}
    full = perplexity(model, tok, text=TEXT, window=window, **lp)
    assert full["windows"] == full["windows_available"] == n_tok // window
    lim = perplexity(model, tok, text=TEXT, window=window, limit=3, **lp)
    assert lim["windows"] == 3 and lim["windows_available"] == n_tok // window
    assert lim["ppl"] == pytest.approx(_ppl_by_hand(model, tok, TEXT, window, limit=3)[0], rel=1e-5)
    # limit larger than available -> all windows
    assert perplexity(model, tok, text=TEXT, window=window, limit=10**6, **lp)["windows"] == n_tok // window
    with pytest.raises(ValueError, match="no full window"):
        perplexity(model, tok, text="the fox", window=64, progress=False)


def test_perplexity_datasets_follow_llm_pruner_layout(model, tok, tmp_path):
    rows = ["", " = Title = \n", "", " The fox jumps over the lazy dog . \n"] * 5
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "test_rows.json").write_text(json.dumps(rows))
    (tmp_path / "ptb").mkdir()
    ptb_lines = [" the fox runs ", " the dog sleeps in the sun "] * 8
    (tmp_path / "ptb" / "ptb.valid.txt").write_text("\n".join(ptb_lines) + "\n")

    r = perplexity(model, tok, "wikitext2", window=8, data_dir=tmp_path, progress=False, protocol="llm-pruner")
    ref, n, n_tok = _ppl_by_hand(model, tok, "\n\n".join(rows), 8)
    assert (r["tokens"], r["windows"]) == (n_tok, n)
    assert r["ppl"] == pytest.approx(ref, rel=1e-5)
    assert r["source"].endswith("test_rows.json") and r["dataset"] == "wikitext2"

    r = perplexity(model, tok, "ptb", window=8, data_dir=tmp_path, progress=False, protocol="llm-pruner")
    ref, n, n_tok = _ppl_by_hand(model, tok, "\n\n".join(s.strip() for s in ptb_lines), 8)
    assert (r["tokens"], r["windows"], r["split"]) == (n_tok, n, "validation")
    assert r["ppl"] == pytest.approx(ref, rel=1e-5)

    with pytest.raises(DataNotFoundError, match="ptb.test.txt"):
        perplexity(model, tok, "ptb-test", window=8, data_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown perplexity dataset"):
        perplexity(model, tok, "c4", window=8, data_dir=tmp_path, progress=False)


@pytest.mark.parametrize("window,batch_size", [(16, 3), (9, 8)])
def test_perplexity_bos_protocol_starts_every_window_with_bos(model, tok, window, batch_size):
    """Default protocol: each window is BOS + window-1 text tokens (the tiny tokenizer adds a BOS)."""
    body = tok(TEXT, add_special_tokens=False).input_ids
    n = len(body) // (window - 1)
    losses = []
    with torch.no_grad():
        for i in range(n):
            w = torch.tensor([[tok.bos_token_id] + body[i * (window - 1):(i + 1) * (window - 1)]])
            losses.append(model(input_ids=w, labels=w).loss.item())
    r = perplexity(model, tok, text=TEXT, window=window, batch_size=batch_size, progress=False)
    assert (r["protocol"], r["bos"], r["windows"]) == ("bos", tok.bos_token_id, n)
    assert r["predicted_tokens"] == n * (window - 1)
    assert r["ppl"] == pytest.approx(math.exp(sum(losses) / n), rel=1e-5)
    bare = perplexity(model, tok, text=TEXT, window=window, progress=False, protocol="llm-pruner")
    assert bare["ppl"] != pytest.approx(r["ppl"], rel=1e-6)
    with pytest.raises(ValueError, match="unknown window protocol"):
        perplexity(model, tok, text=TEXT, window=window, progress=False, protocol="lm-pruner")


def test_perplexity_protocols_agree_when_the_tokenizer_adds_no_bos(model):
    from tokenizers import processors

    no_bos = tiny_tokenizer()
    no_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    assert no_bos("a fox").input_ids[0] != no_bos.bos_token_id
    a = perplexity(model, no_bos, text=TEXT, window=16, progress=False)
    b = perplexity(model, no_bos, text=TEXT, window=16, progress=False, protocol="llm-pruner")
    assert a["bos"] is None and a["ppl"] == b["ppl"] and a["windows"] == b["windows"]


def test_perplexity_restores_training_mode(model, tok):
    model.train()
    try:
        perplexity(model, tok, text=TEXT, window=16, limit=1, progress=False)
        assert model.training
    finally:
        model.eval()


# ----------------------------------------------------------------------------- zero-shot


def test_templates_mirror_installed_lm_eval():
    """Our hard-coded HF-field templates equal the installed lm-eval task YAMLs (drift check)."""
    import yaml

    from recover.evaluate import _lm_eval_tasks_dir

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("!function", lambda loader, node: ("!function", loader.construct_scalar(node)))
    root = _lm_eval_tasks_dir()
    for (task, fmt), tpl in _TEMPLATES.items():
        if "upstream" not in tpl:
            continue
        rel, overrides = tpl["upstream"]
        cfg = yaml.load((root / rel).read_text(), Loader=_Loader)
        for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "process_docs"):
            ours = tpl.get(key)
            theirs = cfg.get(key)
            if isinstance(ours, tuple):
                assert isinstance(theirs, tuple) and theirs[1].endswith(ours[1]), (task, key, theirs)
                assert (root / ours[0]).exists()
            elif key in overrides:
                assert theirs == overrides[key], (task, key, theirs)
            else:
                assert ours == theirs, (task, key, ours, theirs)
        assert sorted(m["metric"] for m in cfg["metric_list"]) == sorted(tpl["metrics"]), task


def _check_against_hand(model, tok, samples):
    assert samples
    for s in samples:
        contexts = {c for c, _ in s["requests"]}
        assert len(contexts) == 1
        (ctx,) = contexts
        ours = choice_loglikelihoods(model, tok, ctx, [c for _, c in s["requests"]])
        assert ours == pytest.approx(s["loglikelihoods"], abs=1e-3)
        assert max(range(len(ours)), key=ours.__getitem__) == s["pred"]
        assert s["acc"] == float(s["pred"] == s["target"])


def test_zero_shot_piqa_matches_hand_loglikelihoods(model, tok):
    root = _shared_or_skip()
    if not (root / "zeroshot/hf/piqa/plain_text/validation").exists():
        pytest.skip(f"no local PIQA copy under {root}")
    import datasets

    docs = datasets.load_from_disk(str(root / "zeroshot/hf/piqa/plain_text/validation")).select(range(5))
    r = zero_shot(model, tok, tasks=["piqa"], limit=5, batch_size=4, return_samples=True)
    assert r["split"] == {"piqa": "validation"} and r["limit"] == 5 and r["num_fewshot"] == 0
    assert r["lm_eval_version"].startswith("0.4")
    t = r["tasks"]["piqa"]
    assert t["n"] == 5 and 0.0 <= t["acc"] <= 1.0 and t["acc_norm"] is not None
    samples = sorted(r["samples"]["piqa"], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(5))
    for s, doc in zip(samples, docs):
        # lm-eval's own piqa prompt, rendered from the original HF fields
        assert s["requests"] == [
            (f"Question: {doc['goal']}\nAnswer:", " " + doc["sol1"]),
            (f"Question: {doc['goal']}\nAnswer:", " " + doc["sol2"]),
        ]
        assert s["target"] == doc["label"]
    _check_against_hand(model, tok, samples)
    assert t["acc"] == pytest.approx(sum(s["acc"] for s in samples) / 5)


def test_zero_shot_jsonl_test_split_on_private_copy(model, tok, tmp_path):
    """ARC via the {query, choices, gold} jsonl layout (test split), on a synthetic data dir."""
    d = tmp_path / "zeroshot" / "jsonl"
    d.mkdir(parents=True)
    rows = [
        {"query": "Question: What does the fox do?", "choices": ["jumps", "sleeps", "swims"], "gold": 0},
        {"query": "Question: Where does the dog sleep?", "choices": ["in the sun", "in water"], "gold": 0},
        {"query": "Question: Who is lazy?", "choices": ["the fox", "the dog", "the sun", "nobody"], "gold": 1},
    ]
    (d / "arc_easy.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    r = zero_shot(model, tok, tasks=["arc_easy"], data_dir=tmp_path, return_samples=True, batch_size=2)
    assert r["split"] == {"arc_easy": "test"} and r["data"]["arc_easy"].endswith("arc_easy.jsonl")
    samples = sorted(r["samples"]["arc_easy"], key=lambda s: s["doc_id"])
    assert [s["requests"][0][0] for s in samples] == [x["query"] + "\nAnswer:" for x in rows]
    assert [len(s["requests"]) for s in samples] == [3, 2, 4]
    _check_against_hand(model, tok, samples)
    assert r["tasks"]["arc_easy"]["n"] == 3


def test_task_configs_writes_distinct_names(tmp_path):
    root = _shared_or_skip()
    info = task_configs(out_dir=tmp_path, data_dir=root)
    assert set(info) == {"boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"}
    for task, i in info.items():
        assert i["name"] == f"depgraph_{task}" and Path(i["yaml"]).exists() and Path(i["data_file"]).exists()
    assert {t: i["split"] for t, i in info.items() if i["split"] == "test"} == {
        "arc_easy": "test", "arc_challenge": "test", "openbookqa": "test"}
    with pytest.raises(ValueError, match="unsupported task"):
        task_configs(["lambada"], out_dir=tmp_path, data_dir=root)
    with pytest.raises(ValueError, match="no local 'test' split"):
        task_configs(["piqa"], out_dir=tmp_path, data_dir=root, splits={"piqa": "test"})
