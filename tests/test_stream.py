"""Streamed pruning (depgraph.stream): a sharded tiny Llama pruned block by block gives the in-memory result."""
from __future__ import annotations

import json

import pytest
import torch

import depgraph
from depgraph.errors import LoadError, PlanError
from depgraph.io import load_pruned
from depgraph.stream import StreamSettings, prune_streamed


def _tiny(tie: bool, layers: int = 4, vocab: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def _sharded(tmp_path, tie: bool = False):
    """A tiny random Llama saved as several safetensors shards (with an index), fp32."""
    folder = tmp_path / "src"
    _tiny(tie).save_pretrained(folder, max_shard_size="100KB")
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


@pytest.fixture()
def sharded(tmp_path):
    return _sharded(tmp_path)


def _in_memory(folder, calib, dtype="auto", **kw):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return depgraph.prune(model, calib, progress=False, **kw)


def _assert_same(folder_a, folder_b):
    a, b = load_pruned(folder_a), load_pruned(folder_b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k  # bit-identical
    ca, cb = (json.loads((f / "config.json").read_text()) for f in (folder_a, folder_b))
    assert ca == cb
    ids = torch.randint(0, 128, (2, 10))
    assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("tie,method,kw", [
    (False, "activation", {"kinds": ("attention", "mlp"), "round_to": 1}),
    (True, "activation", {"kinds": ("mlp",)}),
    (True, "fluctuation", {"kinds": ("mlp",), "policy": "global", "layers": None}),
    (False, "magnitude", {"kinds": ("attention", "mlp"), "gqa": "kv", "round_to": 8}),
    (False, "activation", {"kinds": ("attention", "mlp"), "round_to": 1, "reconstruct": True}),
    (True, "magnitude", {"kinds": ("mlp",), "policy": "adaptive", "layers": None, "reconstruct": True}),
    (False, "activation", {"kinds": ("mlp",), "round_to": 1, "target_of": "non-embedding"}),
])
def test_streamed_equals_in_memory(tmp_path, tie, method, kw):
    sharded = _sharded(tmp_path, tie)
    calib = torch.randint(0, 128, (3, 12))
    model, report, plans = _in_memory(sharded, calib, method=method, target=0.2, **kw)
    depgraph.save_pruned(model, tmp_path / "mem")
    settings = StreamSettings(method=method, target=0.2, progress=False, log=str(tmp_path / "log.jsonl"), **kw)
    meta, sreport, splans = prune_streamed(str(sharded), calib, tmp_path / "out", settings)
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in lines] == ["score"] * 4 + ["write"] * 4 and lines[-1]["peak_rss_gb"] > 0
    assert splans[0].entries, "the plan removes something"
    assert splans[0].to_json() == plans[0].to_json()
    assert (tmp_path / "out" / "plan.json").read_text() == splans[0].to_json(indent=1)
    _assert_same(tmp_path / "mem", tmp_path / "out")
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    assert sreport["params_after"] == report["params_after"]
    assert sreport["non_embedding_removed_fraction"] == report["non_embedding_removed_fraction"]
    assert sreport["target_of"] == report["target_of"] == kw.get("target_of", "all")
    assert [g["scores"] for g in sreport["groups"]] == [g["scores"] for g in report["groups"]]
    s = json.loads((tmp_path / "out" / "report.json").read_text())["stream"]
    assert len(s["blocks"]) == 4 and s["peak_rss_gb"] > 0
    assert all(b["score_s"] >= 0 and b["write_s"] >= 0 for b in s["blocks"])
    assert any(b["verify_max_abs"] is not None for b in s["blocks"])


def test_streamed_from_a_meta_model_keeps_bf16(tmp_path):
    """A bf16 checkpoint stays bf16 (output shards included); the model may be given on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    _tiny(False).to(torch.bfloat16).save_pretrained(tmp_path / "src", max_shard_size="100KB")
    calib = torch.randint(0, 128, (2, 8))
    with init_empty_weights(include_buffers=False):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "src"), dtype=torch.bfloat16)
    _, report, _ = depgraph.prune(meta, calib, stream=True, checkpoint=tmp_path / "src", output=tmp_path / "out",
                                  progress=False, layers=None, round_to=1)
    out = load_pruned(tmp_path / "out")
    assert {p.dtype for p in out.parameters()} == {torch.bfloat16}
    assert out.model.layers[0].mlp.down_proj.in_features < 96
    assert report["stream"]["dtype"] == "torch.bfloat16"
    model, _, _ = _in_memory(tmp_path / "src", calib, layers=None, round_to=1)
    assert model.dtype == torch.bfloat16
    for k, v in model.state_dict().items():
        assert torch.equal(v, out.state_dict()[k]), k
    assert report["stream"]["gram_dtype"] == "torch.float32"  # a bf16 checkpoint's re-fit sums in float32
    # the block math in fp32 (fast on CPUs): the in-memory prune of the fp32 upcast (its Gram in float64), written
    # back in bf16
    settings = StreamSettings(layers=None, round_to=1, progress=False, compute_dtype=torch.float32,
                              gram_dtype=torch.float64)
    _, report32, plans32 = prune_streamed(tmp_path / "src", calib, tmp_path / "out32", settings)
    assert report32["stream"]["compute_dtype"] == "torch.float32"
    assert report32["stream"]["gram_dtype"] == "torch.float64"
    model32, _, plans = _in_memory(tmp_path / "src", calib, layers=None, round_to=1, dtype=torch.float32)
    assert plans32[0].to_json() == plans[0].to_json()
    out32 = load_pruned(tmp_path / "out32")
    for k, v in model32.state_dict().items():
        assert out32.state_dict()[k].dtype == torch.bfloat16 and torch.equal(v.bfloat16(), out32.state_dict()[k]), k


def test_refusals_leave_nothing_behind(sharded, tmp_path):
    calib = torch.randint(0, 128, (2, 8))
    out = tmp_path / "out"
    meta, _, _ = depgraph.prune(str(sharded), calib, stream=True, output=out, progress=False)  # depgraph.prune
    assert meta.model.layers[1].mlp.down_proj.in_features < 96
    import shutil
    shutil.rmtree(out)
    with pytest.raises(PlanError, match="needs gradients.*whole model"):
        depgraph.prune(str(sharded), calib, method="taylor", stream=True, output=out)
    with pytest.raises(PlanError, match="spans more than one decoder block"):
        depgraph.prune(str(sharded), calib, kinds=("hidden",), stream=True, output=out)
    with pytest.raises(PlanError, match="compensation"):
        depgraph.prune(str(sharded), calib, compensate=True, stream=True, output=out)
    with pytest.raises(PlanError, match="needs output"):
        depgraph.prune(str(sharded), calib, stream=True)
    with pytest.raises(PlanError, match="needs calibration"):
        depgraph.prune(str(sharded), None, stream=True, output=out)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((sharded / "config.json").read_text())
    with pytest.raises(LoadError, match="safetensors"):
        depgraph.prune(str(tmp_path / "bin"), calib, stream=True, output=out)
    assert not out.exists()


def test_failed_verification_writes_nothing(sharded, tmp_path, monkeypatch):
    """A shrink that computes something else than the mask is caught on the probe; the old output stays."""
    import depgraph.stream as stream

    real = stream.shrink

    def wrong(model, plan):
        real(model, plan)
        name = next(iter(plan.shapes))
        model.get_parameter(name).data.mul_(1.5)
        return model

    monkeypatch.setattr(stream, "shrink", wrong)
    from depgraph.outdir import MARKER

    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text("{}")  # an earlier depgraph output (a foreign folder is refused before any work)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PlanError, match="verification failed"):
        depgraph.prune(str(sharded), torch.randint(0, 128, (2, 8)), stream=True, output=out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "keep.txt"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_stream(tmp_path, capsys):
    from depgraph.cli import main

    from tiny import tiny_tokenizer

    sharded = tmp_path / "src"
    _tiny(True, layers=3, vocab=320).save_pretrained(sharded, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(sharded)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert main(["prune", str(sharded), "--stream", "-o", str(tmp_path / "x")]) == 1
    assert "--calib self samples text from the whole model" in capsys.readouterr().err
    assert main(["prune", str(sharded), "--stream", "--method", "taylor", "--calib", str(text),
                 "-o", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "needs gradients" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    # 3 layers, 'auto' prunes layer 1 only: at most 14.9% is reachable, so the default 0.2 is refused (issue 12)
    assert main(["prune", str(sharded), "--stream", "--calib", str(text), "--n-samples", "2", "--seq-len", "8",
                 "--no-report", "-o", str(tmp_path / "out")]) == 1
    assert "target 0.2 cannot be met" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["prune", str(sharded), "--stream", "--calib", str(text), "--n-samples", "2", "--seq-len", "8",
                 "--target", "0.1", "--no-report", "-o", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["removed_fraction"] > 0 and report["stream"]["calibration_rows"] == 2
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert load_pruned(tmp_path / "out").num_parameters() == report["params_after"]
