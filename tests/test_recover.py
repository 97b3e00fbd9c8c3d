"""LoRA recovery (recover.data, recover.lora, `depgraph recover`) on tiny pruned, non-uniform models, offline."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("peft")

import depgraph  # noqa: E402
from recover.data import (  # noqa: E402
    IGNORE_INDEX,
    DataCollator,
    build_datasets,
    generate_prompt,
    load_examples,
    split_examples,
    tokenize_example,
)
from recover.lora import distill_kl, recover, resolve_target_modules  # noqa: E402
from tiny import tiny_tokenizer  # noqa: E402

EXAMPLES = [
    {"instruction": "Give the opposite of the word.", "input": "hot", "output": "cold"},
    {"instruction": "Name a fruit.", "input": "", "output": "An apple is a fruit."},
    {"instruction": "How do you keep a dog cool?", "output": "Give it water and shade."},
    {"instruction": "Repeat the sentence.", "input": "The quick brown fox.", "output": "The quick brown fox."},
    {"instruction": "Say yes or no: is the sun hot?", "output": "Yes"},
    {"instruction": "Complete: the lazy", "output": "dog sleeps in the sun."},
    {"instruction": "What runs?", "input": "The fox runs while the dog sleeps.", "output": "The fox."},
    {"instruction": "Name an animal.", "output": "A dog."},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _pruned(vocab: int, seed: int = 0):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=512, use_cache=False)
    m = tf.LlamaForCausalLM(cfg).eval()
    g = depgraph.trace(m)
    # non-uniform: layer i loses 8*(i+1) MLP channels; layer 0 also loses one query head per kv group
    removals = {}
    for grp in g.groups(("attention", "mlp")):
        i = int(grp.id.rsplit(".", 1)[1])
        if grp.kind == "mlp":
            removals[grp.id] = list(range(seed, seed + 8 * (i + 1)))
        elif i == 0:
            kv, rep = grp.gqa
            removals[grp.id] = [k * rep for k in range(kv)]
    depgraph.shrink(m, depgraph.Plan.from_units(g, removals))
    return m


def _widths(m):
    return [(l.mlp.gate_proj.out_features, l.self_attn.q_proj.out_features) for l in m.model.layers]


FAST = dict(rank=4, alpha=8, dropout=0.0, batch_size=2, micro_batch_size=2, cutoff_len=256, lr=3e-3,
            warmup_steps=0, logging_steps=1, progress=False, seed=0)


# ----------------------------------------------------------------------------------------------------------- data


def test_prompt_template_is_llm_pruners():
    p = generate_prompt("Do X.", "some input")
    assert p.startswith("Below is an instruction that describes a task, paired with an input")
    assert p.endswith("### Instruction:\nDo X.\n\n### Input:\nsome input\n\n### Response:\n")
    assert generate_prompt("Do X.").endswith("### Instruction:\nDo X.\n\n### Response:\n")
    assert generate_prompt("Do X.", "", "done").endswith("### Response:\ndone")


def test_prompt_tokens_are_masked(tok):
    ex = EXAMPLES[0]
    item = tokenize_example(ex, tok, cutoff_len=256)
    n_user = len(tok(generate_prompt(ex["instruction"], ex["input"]))["input_ids"])
    assert item["labels"][:n_user] == [IGNORE_INDEX] * n_user
    assert item["labels"][n_user:] == item["input_ids"][n_user:]
    assert item["input_ids"][-1] == tok.eos_token_id and item["labels"][-1] == tok.eos_token_id
    assert len(item["labels"]) > n_user
    # cutoff: truncated, no EOS appended at the cutoff
    short = tokenize_example(ex, tok, cutoff_len=10)
    assert len(short["input_ids"]) == 10 and all(t == IGNORE_INDEX for t in short["labels"])
    # train_on_inputs keeps every label; plain text examples are not masked
    assert tokenize_example(ex, tok, 256, train_on_inputs=True)["labels"] == item["input_ids"]
    txt = tokenize_example({"text": "the fox runs"}, tok, 64)
    assert txt["labels"] == txt["input_ids"]


def test_collator_pads_labels_with_ignore(tok):
    a, b = (tokenize_example(e, tok, 256) for e in EXAMPLES[:2])
    batch = DataCollator.for_tokenizer(tok)([a, b])
    n = batch["input_ids"].shape[1]
    assert n % 8 == 0 and n >= max(len(a["input_ids"]), len(b["input_ids"]))
    short = min((a, b), key=lambda x: len(x["input_ids"]))
    i = 0 if short is a else 1
    k = len(short["input_ids"])
    assert (batch["labels"][i, k:] == IGNORE_INDEX).all() and (batch["attention_mask"][i, k:] == 0).all()


def test_load_sources_and_split(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(e) for e in EXAMPLES) + "\n")
    assert load_examples(p) == load_examples(EXAMPLES)
    q = tmp_path / "d.json"
    q.write_text(json.dumps(EXAMPLES))
    assert len(load_examples(str(q), limit=3)) == 3
    train, val = split_examples(load_examples(q), 2, seed=42)
    assert len(train) == 6 and len(val) == 2 and not any(v in train for v in val)
    assert split_examples(load_examples(q), 2, seed=42) == (train, val)  # deterministic
    assert len(split_examples(EXAMPLES, 0.25)[1]) == 2


def test_text_file_source_trains_on_every_token(tmp_path, tok):
    p = tmp_path / "notes.txt"
    p.write_text("The quick brown fox.\nIt jumps.\n\n  \nA lazy dog sleeps in the sun.\n\nGive it water.\n")
    rows = load_examples(p)
    assert rows == [{"text": "The quick brown fox.\nIt jumps."}, {"text": "A lazy dog sleeps in the sun."},
                    {"text": "Give it water."}]
    lines = tmp_path / "lines.txt"
    lines.write_text("one line\nanother line\n\n")  # a trailing blank line is not a paragraph break
    assert [r["text"] for r in load_examples(lines)] == ["one line", "another line"]
    train, _ = build_datasets(p, tok, cutoff_len=64)
    for ex in (train[i] for i in range(len(train))):
        assert ex["labels"] == ex["input_ids"] and IGNORE_INDEX not in ex["labels"]


def test_self_generated_source(tok):
    from archs import ARCHS

    model = ARCHS["llama-gqa"]()
    with pytest.raises(ValueError, match="data source 'self' samples text from a model"):
        load_examples("self", limit=2, tokenizer=tok)
    small = dict(limit=3, model=model, tokenizer=tok, seq_len=12)
    rows = load_examples("self", seed=1, **small)
    assert len(rows) == 3 and all(set(r) == {"text"} and r["text"] for r in rows)
    assert load_examples("self", seed=1, **small) == rows  # seeded
    assert load_examples("self", seed=2, **small) != rows


def test_self_distillation_needs_no_data(tok, tmp_path, monkeypatch):
    """recover(data="self", distill=True) samples its training text from the teacher, then distils."""
    import recover.data as data_mod

    used = []
    real = data_mod._generated_examples
    monkeypatch.setattr(data_mod, "_generated_examples", lambda model, *a, **k: used.append(model) or real(model, *a, **k))
    teacher = _pruned(len(tok))
    m = _pruned(len(tok), seed=8)
    _, summary = recover(m, tok, "self", tmp_path / "s", max_steps=2, limit=4, distill=True, teacher=teacher,
                         save=False, **{**FAST, "cutoff_len": 16})
    assert used == [teacher]
    assert summary["distill"] and summary["steps"] == 2 and summary["train_examples"] == 4


def test_in_domain_source_reads_only_the_validation_split(tok, monkeypatch):
    """``"wikitext2"`` trains on consecutive windows of the WikiText-2 validation file; the test split, which
    evaluation scores, is never opened."""
    from pathlib import Path

    import builtins

    from recover.data import in_domain_text
    from recover.datasets import ppl_text

    opened = []
    real_open, real_read = builtins.open, Path.read_text
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (opened.append(str(self)), real_read(self, *a, **k))[1])
    rows = load_examples("wikitext2", tokenizer=tok, seq_len=24, limit=40)
    assert opened and all(Path(f).name == "wiki.valid.tokens" for f in opened), opened
    monkeypatch.undo()
    text, _ = in_domain_text("wikitext2")
    assert "<unk>" not in text and "@-@" in text  # laid out like the raw test text
    assert len(rows) == 40 and all(len(r["input_ids"]) == 24 and r["input_ids"][0] == tok.bos_token_id
                                   for r in rows)
    body = [t for r in rows for t in r["input_ids"][1:]]  # consecutive windows: BOS + 23 text tokens each
    start = tok.decode(body)
    assert start in text and start not in ppl_text("wikitext2").text
    train, _ = build_datasets("wikitext2", tok, cutoff_len=24, limit=3)
    assert [x["labels"] for x in train] == [x["input_ids"] for x in train] == [r["input_ids"] for r in rows[:3]]


def test_shared_alpaca_subset(tok):
    from recover.datasets import DataNotFoundError

    try:
        rows = load_examples("alpaca", limit=20)
    except DataNotFoundError as e:
        pytest.skip(str(e))
    assert len(rows) == 20 and all({"instruction", "input", "output"} <= set(r) for r in rows)
    train, val = build_datasets("alpaca", tok, cutoff_len=256, val_size=4, limit=20)
    assert len(train) == 16 and len(val) == 4


def test_mixed_sources_join_each_part(tok, tmp_path):
    """``"alpaca+wikitext2"``: each part's examples in turn, ``limit`` per part; an empty part is refused, and a real
    file whose name holds a ``+`` is read as that file."""
    from recover.datasets import DataNotFoundError

    try:
        mixed = load_examples("alpaca+wikitext2", tokenizer=tok, seq_len=24, limit=5)
        parts = load_examples("alpaca", limit=5) + load_examples("wikitext2", tokenizer=tok, seq_len=24, limit=5)
    except DataNotFoundError as e:
        pytest.skip(str(e))
    assert mixed == parts and len(mixed) == 10
    assert all("instruction" in r for r in mixed[:5]) and all("input_ids" in r for r in mixed[5:])
    with pytest.raises(ValueError, match="empty part"):
        load_examples("alpaca+", tokenizer=tok)
    plus = tmp_path / "a+b.json"
    plus.write_text(json.dumps(EXAMPLES))
    assert load_examples(str(plus)) == load_examples(EXAMPLES)


def test_bad_data_errors(tmp_path, tok):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([EXAMPLES[0], {"instruction": "no output here"}]))
    with pytest.raises(ValueError, match=r"example 1 is missing field\(s\) 'output'"):
        load_examples(bad)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="empty"):
        load_examples(empty)
    (tmp_path / "blank.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_examples(tmp_path / "blank.jsonl")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_examples(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_examples(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="val_size"):
        split_examples(EXAMPLES, 8)


# ----------------------------------------------------------------------------------------------------------- LoRA


def test_target_module_errors(tok):
    m = _pruned(len(tok))
    assert set(resolve_target_modules(m, None)) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"}
    assert resolve_target_modules(m, "q_proj, v_proj") == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="'qkv_proj' matches no module"):
        resolve_target_modules(m, ["q_proj", "qkv_proj"])
    with pytest.raises(ValueError, match="not nn.Linear"):
        resolve_target_modules(m, ["input_layernorm"])
    with pytest.raises(ValueError, match="'nope' matches no module"):
        recover(m, tok, EXAMPLES, "unused", target_modules=["nope"], max_steps=1, **FAST)


def test_bad_recover_arguments(tok, tmp_path):
    m = _pruned(len(tok))
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        recover(m, tok, EXAMPLES, tmp_path, max_steps=1, **{**FAST, "batch_size": 3})
    with pytest.raises(ValueError, match="needs a teacher"):
        recover(m, tok, EXAMPLES, tmp_path, max_steps=1, distill=True, **FAST)
    with pytest.raises(ValueError, match="empty"):
        recover(m, tok, [], tmp_path, max_steps=1, **FAST)
    with pytest.raises(ValueError, match="validation split"):
        recover(m, tok, EXAMPLES, tmp_path, max_steps=1, early_stopping_patience=2, **FAST)


def test_lora_lowers_loss_merges_and_round_trips(tok, tmp_path):
    from peft import PeftModel

    m = _pruned(len(tok))
    widths = _widths(m)
    assert len(set(widths)) > 1, "the test model must be non-uniform"
    base = copy.deepcopy(m)
    train, _ = build_datasets(EXAMPLES, tok, cutoff_len=256)
    batch = DataCollator.for_tokenizer(tok)([train[i] for i in range(len(train))])
    with torch.no_grad():
        before = m(**batch).loss.item()
    merged, summary = recover(m, tok, EXAMPLES, tmp_path / "out", max_steps=12, val_size=2, save_steps=6,
                              **FAST)
    with torch.no_grad():
        after = merged(**batch).loss.item()
    assert after < before - 0.1, (before, after)
    assert summary["steps"] == 12 and summary["tokens_per_second"] > 0 and summary["train_tokens"] > 0
    assert summary["final_eval_loss"] is not None and len(summary["eval_losses"]) == 2
    assert _widths(merged) == widths and not any("lora" in n for n, _ in merged.named_parameters())

    # merged logits == LoRA logits (adapter re-applied on an untouched copy of the pruned model)
    lora = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()
    assert any(p.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_B" in n)
    ids = batch["input_ids"][:2]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, lora(ids).logits, rtol=1e-4, atol=1e-4)

    # saved folder round-trips through load_pruned (and the generic loader)
    loaded = depgraph.load_pruned(tmp_path / "out" / "model")
    assert _widths(loaded) == widths
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, merged(ids).logits)
    from depgraph.models import load_model

    m2, tok2 = load_model(tmp_path / "out" / "model")
    assert tok2 is not None and _widths(m2) == widths
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 12


def test_resume_matches_uninterrupted_run(tok, tmp_path):
    from safetensors.torch import load_file

    kw = dict(FAST, lr_scheduler_type="constant", save_steps=3, save=True)
    data = EXAMPLES * 2  # 8 steps per epoch: the interruption falls mid-epoch
    recover(_pruned(len(tok)), tok, data, tmp_path / "full", max_steps=6, **kw)
    recover(_pruned(len(tok)), tok, data, tmp_path / "cut", max_steps=3, **kw)  # "interrupted" at step 3
    _, s = recover(_pruned(len(tok)), tok, data, tmp_path / "cut", max_steps=6, resume_from_checkpoint=True, **kw)
    assert s["steps"] == 6 and s["resumed_from"]
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_distillation_lowers_kl(tok, tmp_path):
    import transformers as tf

    def dense():
        torch.manual_seed(0)
        m = tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, tie_word_embeddings=True, use_cache=False, max_position_embeddings=512)).eval()
        with torch.no_grad():
            m.model.norm.weight.mul_(8.0)  # peaked distributions: pruning moves them, distillation pulls back
        return m

    teacher = dense()
    m = dense()
    depgraph.shrink(m, depgraph.Plan.random(depgraph.trace(m), 0.3, kinds=("attention", "mlp")))
    train, _ = build_datasets(EXAMPLES, tok, cutoff_len=256)
    batch = DataCollator.for_tokenizer(tok)([train[i] for i in range(len(train))])

    def kl(model):
        with torch.no_grad():
            return distill_kl(model(**batch).logits, teacher(**batch).logits, batch["labels"]).item()

    before = kl(m)
    merged, summary = recover(m, tok, EXAMPLES, tmp_path / "d", max_steps=10, distill=True, teacher=teacher,
                              distill_alpha=1.0, save=False, **{**FAST, "lr": 1e-2})
    assert summary["distill"] and summary["steps"] == 10
    assert kl(merged) < 0.5 * before, (before, kl(merged))
    assert not any(p.requires_grad for p in teacher.parameters())


def test_distill_kl_is_zero_for_identical_logits():
    x = torch.randn(2, 5, 11)
    labels = torch.tensor([[IGNORE_INDEX] * 2 + [1, 2, 3]] * 2)
    assert distill_kl(x, x, labels).abs().item() < 1e-6
    assert distill_kl(x, torch.randn(2, 5, 11), labels).item() > 0
    with pytest.raises(ValueError, match="vocabulary"):
        distill_kl(x, torch.randn(2, 5, 12), labels)


def test_trainer_kd_term_vanishes_when_the_student_is_the_teacher(tok, tmp_path):
    """The Trainer's loss with a teacher equal to the student: KL weight 1 gives 0, weight w gives (1 - w) * LM."""
    from transformers import TrainingArguments

    from recover.lora import DistillTrainer

    student = _pruned(len(tok))
    train, _ = build_datasets(EXAMPLES, tok, cutoff_len=256)
    batch = DataCollator.for_tokenizer(tok)([train[i] for i in range(4)])
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    lm = DistillTrainer(model=student, args=args).compute_loss(student, dict(batch)).item()
    for w in (1.0, 0.5):
        t = DistillTrainer(model=student, args=args, teacher=copy.deepcopy(student), distill_alpha=w)
        assert t.compute_loss(student, dict(batch)).item() == pytest.approx((1 - w) * lm, abs=1e-5)
    peaked = copy.deepcopy(student)
    with torch.no_grad():
        peaked.model.norm.weight.mul_(8.0)
    other = DistillTrainer(model=student, args=args, teacher=peaked, distill_alpha=1.0)
    assert other.compute_loss(student, dict(batch)).item() > 0.1  # a different teacher: a real KL term


def test_time_budget_decays_the_rate_to_zero_when_it_is_spent(tok, tmp_path, monkeypatch):
    """With a time budget the linear decay follows the clock: half the budget spent, half the rate; all spent, 0."""
    from transformers import TrainingArguments

    import recover.lora as rl

    clock = [1000.0]
    monkeypatch.setattr(rl.time, "time", lambda: clock[0])
    student = _pruned(len(tok))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, learning_rate=1e-2,
                             warmup_steps=2)
    t = rl.DistillTrainer(model=student, args=args, time_budget_s=60.0)
    t.create_optimizer()
    sched = t.create_scheduler(num_training_steps=10**6)  # the planned steps play no part
    lr = lambda: sched.get_last_lr()[0]  # noqa: E731
    assert lr() == 0.0  # warm-up starts at 0
    t.optimizer.step()  # no gradients: nothing moves; keeps torch's step-order check quiet
    sched.step()
    assert lr() == pytest.approx(0.5e-2)  # warm-up step 1 of 2, no time spent
    clock[0] += 30.0
    sched.step()
    assert lr() == pytest.approx(0.5e-2)  # warm-up done, half the budget spent
    clock[0] += 45.0
    sched.step()
    assert lr() == 0.0
    monkeypatch.undo()
    _, summary = recover(_pruned(len(tok)), tok, EXAMPLES, tmp_path / "r", max_minutes=5.0, max_steps=None,
                         epochs=1.0, save=False, **FAST)
    assert summary["lr_decay"] == "time"
    _, summary = recover(_pruned(len(tok)), tok, EXAMPLES, tmp_path / "s", max_minutes=5.0, epochs=1.0,
                         decay_by_time=False, save=False, **FAST)
    assert summary["lr_decay"] == "linear"


# ----------------------------------------------------------------------------------------------------------- CLI


def test_cli_recover(tok, tmp_path, capsys):
    from depgraph.cli import main

    src = tmp_path / "pruned"
    depgraph.save_pruned(_pruned(len(tok)), src, tokenizer=tok)
    data = tmp_path / "d.json"
    data.write_text(json.dumps(EXAMPLES))
    out = tmp_path / "rec"
    rc = main(["recover", str(src), "--data", str(data), "--max-steps", "2", "--batch-size", "2",
               "--micro-batch-size", "2", "--cutoff-len", "256", "--rank", "4", "--json", "-o", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2
    assert _widths(depgraph.load_pruned(out / "model")) == _widths(depgraph.load_pruned(src))
    from depgraph.models import load_model

    run_model, run_tok = load_model(out)  # OUT itself is a MODEL argument: the run folder names its model
    assert _widths(run_model) == _widths(depgraph.load_pruned(src)) and run_tok is not None
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert main(["recover", str(src), "--data", str(data), "--max-steps", "1", "-o", str(foreign)]) == 1
    assert "non-empty folder that depgraph did not write" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]
    # bad target module and missing data: one-line errors, exit status 1
    assert main(["recover", str(src), "--data", str(data), "--target-modules", "nope", "-o", str(out)]) == 1
    assert "'nope' matches no module" in capsys.readouterr().err
    assert main(["recover", str(src), "--data", str(tmp_path / "none.json"), "-o", str(out)]) == 1
    assert main(["recover", str(src), "--data", str(data), "--distill", "-o", str(out)]) == 1
    assert "--teacher" in capsys.readouterr().err


def test_cli_recover_train_on_inputs_reaches_the_config():
    """``--train-on-inputs`` (labels and KL positions on the prompt too) is a RecoverConfig field by name."""
    from depgraph.cli import build_parser
    from recover.config import RecoverConfig

    base = ["recover", "p", "--data", "alpaca+wikitext2", "-o", "o"]
    on = RecoverConfig.from_options(build_parser().parse_args(base + ["--train-on-inputs"]))
    off = RecoverConfig.from_options(build_parser().parse_args(base))
    assert on.train_on_inputs and not off.train_on_inputs
