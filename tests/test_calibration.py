"""Calibration data: shapes, seeded determinism, every source type, and clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from depgraph.calibration import (
    CalibrationError,
    SelfSampling,
    load_calibration,
    load_calibration_set,
    render_alpaca,
    shared_data_dir,
)

from tiny import SENTENCES, tiny_tokenizer

TEXT = SENTENCES * 20

ALPACA = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
    {"instruction": "Describe the fox.", "input": "quick, brown", "output": "The fox is quick and brown."},
] * 10



@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


def _is_window_of(row: torch.Tensor, ids: list[int]) -> bool:
    r = row.tolist()
    return any(ids[i : i + len(r)] == r for i in range(len(ids) - len(r) + 1))


# ----------------------------------------------------------------------------- sources


def test_text_file_shape_determinism_and_windows(tok, tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text(TEXT)
    bare = {"protocol": "llm-pruner"}
    a = load_calibration(str(f), tok, n_samples=6, seq_len=16, seed=3, **bare)
    assert a.shape == (6, 16) and a.dtype == torch.long
    assert torch.equal(a, load_calibration(f, tok, n_samples=6, seq_len=16, seed=3, **bare))
    assert not torch.equal(a, load_calibration(f, tok, n_samples=6, seq_len=16, seed=4, **bare))
    ids = tok(TEXT, add_special_tokens=False).input_ids
    assert all(_is_window_of(row, ids) for row in a)
    assert tok.bos_token_id not in a  # windows come from the text, no special tokens injected
    cs = load_calibration_set(f, tok, n_samples=6, seq_len=16, seed=3, **bare)
    assert cs.kind == "text" and cs.origin == str(f) and cs.total_tokens == len(ids)
    assert all(0 <= s <= len(ids) - 16 for s in cs.starts)
    # the global RNG is not touched
    torch.manual_seed(123)
    x = torch.rand(3)
    torch.manual_seed(123)
    load_calibration(f, tok, n_samples=2, seq_len=8)
    assert torch.equal(torch.rand(3), x)


def test_exact_length_text_gives_single_offset(tok, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("the quick brown fox")
    ids = tok("the quick brown fox", add_special_tokens=False).input_ids
    out = load_calibration(f, tok, n_samples=3, seq_len=len(ids), protocol="llm-pruner")
    assert out.tolist() == [ids] * 3
    out = load_calibration(f, tok, n_samples=3, seq_len=len(ids) + 1)
    assert out.tolist() == [[tok.bos_token_id] + ids] * 3


def test_bos_protocol_starts_every_window_with_bos(tok, tmp_path):
    """Default: the tiny tokenizer adds a BOS, so every window is BOS + seq_len-1 text tokens."""
    f = tmp_path / "corpus.txt"
    f.write_text(TEXT)
    cs = load_calibration_set(f, tok, n_samples=6, seq_len=16, seed=3)
    assert cs.protocol == "bos" and cs.input_ids.shape == (6, 16)
    assert (cs.input_ids[:, 0] == tok.bos_token_id).all()
    ids = tok(TEXT, add_special_tokens=False).input_ids
    assert all(_is_window_of(row[1:], ids) for row in cs.input_ids)
    assert tok.bos_token_id not in cs.input_ids[:, 1:]
    with pytest.raises(CalibrationError, match="unknown window protocol 'bare'"):
        load_calibration(f, tok, protocol="bare")


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_alpaca_json_and_jsonl(tok, tmp_path, suffix):
    f = tmp_path / f"alpaca{suffix}"
    if suffix == ".json":
        f.write_text(json.dumps(ALPACA))
    else:
        f.write_text("\n".join(json.dumps(r) for r in ALPACA) + "\n")
    out = load_calibration(f, tok, n_samples=4, seq_len=32, seed=1, protocol="llm-pruner")
    assert out.shape == (4, 32) and out.dtype == torch.long
    assert torch.equal(out, load_calibration(f, tok, n_samples=4, seq_len=32, seed=1, protocol="llm-pruner"))
    full = "\n\n".join(render_alpaca(r) for r in ALPACA)
    ids = tok(full, add_special_tokens=False).input_ids
    assert all(_is_window_of(row, ids) for row in out)
    assert load_calibration_set(f, tok, n_samples=1, seq_len=8).kind == "alpaca"


def test_render_alpaca_templates():
    with_input = render_alpaca({"instruction": "Add.", "input": "2 and 3", "output": "5"})
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n5" in with_input
    no_input = render_alpaca({"instruction": "Name a colour.", "output": "Blue"})
    assert "### Input" not in no_input and no_input.endswith("### Response:\nBlue")


def test_self_generated(tok, model):
    a = load_calibration("self", tok, n_samples=3, seq_len=12, seed=0, model=model)
    assert a.shape == (3, 12) and a.dtype == torch.long
    assert (a[:, 0] == tok.bos_token_id).all()
    assert int(a.max()) < len(tok) and int(a.min()) >= 0
    assert torch.equal(a, load_calibration("generated", tok, n_samples=3, seq_len=12, seed=0, model=model))
    assert not torch.equal(a, load_calibration("self", tok, n_samples=3, seq_len=12, seed=1, model=model))
    model.train()
    try:
        load_calibration("self", tok, n_samples=1, seq_len=4, model=model)
        assert model.training
    finally:
        model.eval()


def test_self_generated_matches_sampling_without_cache(tok, model):
    """The KV-cached batch sampler draws the same tokens as recomputing the whole prefix with the schedule:
    temperature falling linearly from 2 to 0.8 over the first 16 text tokens, special tokens never sampled."""
    seq = load_calibration("self", tok, n_samples=2, seq_len=24, seed=5, model=model)
    g = torch.Generator().manual_seed(5)
    special = sorted(set(tok.all_special_ids))
    allowed = torch.tensor([i for i in range(len(tok)) if i not in special])
    first = allowed[torch.randint(0, len(allowed), (2,), generator=g)].view(2, 1)
    ref = torch.cat([torch.full((2, 1), tok.bos_token_id), first], 1)
    with torch.no_grad():
        while ref.shape[1] < 24:
            position = ref.shape[1] - 1  # text position of the token drawn now (BOS not counted)
            t = 2.0 + position / 16 * (0.8 - 2.0) if position < 16 else 0.8
            logits = model(input_ids=ref).logits[:, -1, : len(tok)].float()
            logits[:, special] = -float("inf")
            ref = torch.cat([ref, torch.multinomial(torch.softmax(logits / t, -1), 1, generator=g)], 1)
    assert torch.equal(seq, ref)


def test_self_sampling_schedule_and_errors():
    s = SelfSampling()
    temps = [s.temperature_at(i) for i in range(40)]
    assert temps[0] == 2.0 and temps[16:] == [0.8] * 24
    assert all(a > b for a, b in zip(temps[:16], temps[1:17]))  # strictly cooler each step of the warm-up
    assert SelfSampling(temperature=1.0, warmup=0).temperature_at(0) == 1.0  # no schedule: the plain temperature
    with pytest.raises(CalibrationError, match="temperatures must be > 0"):
        SelfSampling(temperature=0.0)


def test_self_never_samples_special_tokens(tok):
    """A model that puts nearly all its mass on special tokens still yields text tokens only (past BOS), unless
    ``ban_special=False``: then the chat markers show up (so the ban is what keeps them out)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = LlamaForCausalLM(cfg).eval()
    special = sorted(set(tok.all_special_ids))
    with torch.no_grad():
        m.lm_head.weight.mul_(0.01)
        m.lm_head.weight[special] = m.model.norm.weight.detach() * 10.0  # aligned with every normed hidden state
    ids = load_calibration("self", tok, n_samples=4, seq_len=16, seed=0, model=m)
    assert not torch.isin(ids[:, 1:], torch.tensor(special)).any()
    loose = load_calibration("self", tok, n_samples=4, seq_len=16, seed=0, model=m,
                             sampling=SelfSampling(ban_special=False))
    assert torch.isin(loose[:, 2:], torch.tensor(special)).any()


@pytest.mark.parametrize("name", ["alpaca", "ptb", "wikitext2"])
def test_builtin_sources(tok, name):
    try:
        root = shared_data_dir()
    except CalibrationError as e:
        pytest.skip(f"shared data dir missing ({e})")
    cs = load_calibration_set(name, tok, n_samples=5, seq_len=32, seed=0)
    assert cs.input_ids.shape == (5, 32)
    assert Path(cs.origin).is_relative_to(root)
    assert "test" not in Path(cs.origin).name or name == "ptb"  # wikitext2: valid split, never the test set
    assert torch.equal(cs.input_ids, load_calibration(name, tok, n_samples=5, seq_len=32, seed=0))


# ----------------------------------------------------------------------------- errors


def test_missing_file(tok, tmp_path):
    f = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match=r"nope\.txt does not exist"):
        load_calibration(str(f), tok)
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration(tmp_path / "nope.jsonl", tok)


def test_empty_files(tok, tmp_path):
    for name in ("empty.txt", "empty.json", "empty.jsonl"):
        f = tmp_path / name
        f.write_text("  \n")
        with pytest.raises(ValueError, match=rf"{name} is empty"):
            load_calibration(f, tok)


def test_too_few_tokens(tok, tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("the fox")
    with pytest.raises(ValueError, match=r"tiny\.txt has too few tokens for one window: \d+ tokens < seq_len=64"):
        load_calibration(f, tok, seq_len=64)


def test_missing_alpaca_fields(tok, tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps([{"instruction": "x", "output": "y"}, {"instruction": "only"}]))
    with pytest.raises(ValueError, match=r"bad\.json, record 1: missing Alpaca field\(s\) output"):
        load_calibration(f, tok)
    g = tmp_path / "bad.jsonl"
    g.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, record 0: missing Alpaca field\(s\) instruction, output"):
        load_calibration(g, tok)


def test_malformed_json(tok, tmp_path):
    f = tmp_path / "broken.jsonl"
    f.write_text(json.dumps(ALPACA[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 2: invalid JSON"):
        load_calibration(f, tok)
    g = tmp_path / "broken.json"
    g.write_text('[{"instruction": ')
    with pytest.raises(ValueError, match=r"broken\.json: invalid JSON"):
        load_calibration(g, tok)
    h = tmp_path / "scalar.json"
    h.write_text("42")
    with pytest.raises(ValueError, match=r"scalar\.json: expected a JSON list"):
        load_calibration(h, tok)
    k = tmp_path / "none.json"
    k.write_text("[]")
    with pytest.raises(ValueError, match=r"none\.json holds no records"):
        load_calibration(k, tok)


def test_self_needs_model_and_bad_sizes(tok, tmp_path):
    with pytest.raises(ValueError, match="needs the model"):
        load_calibration("self", tok)
    f = tmp_path / "corpus.txt"
    f.write_text(TEXT)
    with pytest.raises(ValueError, match="must be >= 1"):
        load_calibration(f, tok, n_samples=0)


def test_hf_name_offline_fails_fast_and_clearly(tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"'no-such/dataset'.*Hugging Face dataset.*offline"):
        load_calibration("no-such/dataset", tok)
    with pytest.raises(ValueError, match=r"'bookcorpus'.*offline"):
        load_calibration("bookcorpus", tok)


def test_missing_builtin_data_dir(tok, monkeypatch, tmp_path):
    monkeypatch.setenv("DEPGRAPH_DATA", str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="shared data directory not found"):
        load_calibration("alpaca", tok)
    monkeypatch.setenv("DEPGRAPH_DATA", str(tmp_path))
    with pytest.raises(ValueError, match=r"built-in calibration source 'ptb'.*ptb\.test\.txt does not exist"):
        load_calibration("ptb", tok)


def test_one_is_a_path_test_for_calibration_and_recovery(tmp_path):
    """calibration and recover.data decide "is this a local path" with the same function."""
    import recover.data as rdata
    from depgraph.calibration import looks_like_path

    assert rdata.looks_like_path is looks_like_path
    for s in ("./x", "~/x", "/abs/x", "notes.md", "wiki.test.tokens", "a.jsonl", "b.txt"):
        assert looks_like_path(s), s
    for s in ("yahma/alpaca-cleaned", "wikitext2", "alpaca"):
        assert not looks_like_path(s), s
    (tmp_path / "plain").write_text("x")
    assert looks_like_path(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="no such data file"):  # not tried as a hub dataset
        rdata.load_examples(str(tmp_path / "missing.md"))
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration(str(tmp_path / "missing.md"), None)
