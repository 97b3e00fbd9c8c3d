"""The CLI under careless input, through the installed console script ``depgraph`` (PYTHONPATH = this checkout):
each refusal is exit status 1 (2 for argparse usage errors) with one line naming the problem, and no file outside
the test's temporary folder changes (a checksum listing of the folder before and after)."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_INSTALLED = Path(sysconfig.get_path("scripts")) / "depgraph"  # the real script, not a pyenv shim
SCRIPT = str(_INSTALLED) if _INSTALLED.is_file() else shutil.which("depgraph")
pytestmark = pytest.mark.skipif(SCRIPT is None, reason="the depgraph console script is not installed")


def env():
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def depgraph(*argv, timeout=300):
    return subprocess.run([SCRIPT, *map(str, argv)], capture_output=True, text=True, env=env(), timeout=timeout)


def checksums(root: Path) -> dict:
    """{relative path: sha256} of every file below ``root`` (folders as 'dir')."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def last_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def refused(result, message, status=1):
    """Exit ``status`` and the last stderr line is ``depgraph...: error: ...message...`` (one line)."""
    assert result.returncode == status, (result.returncode, result.stderr[-2000:])
    line = last_line(result)
    assert message in line and "error:" in line, result.stderr[-2000:]
    if status == 1:
        assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama folder with a tokenizer and a calibration text file."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny import SENTENCES, tiny_tokenizer

    root = tmp_path_factory.mktemp("cli")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256)).eval()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "calib.txt").write_text(SENTENCES * 6)
    return root


def test_console_script_runs_this_checkout(tmp_path):
    result = depgraph("trace", tmp_path / "nope")
    refused(result, "no such model folder or file")
    assert Path(SCRIPT).name == "depgraph"
    help_ = depgraph("--help")
    assert help_.returncode == 0 and "prune" in help_.stdout


@pytest.mark.parametrize("command,case,message", [
    ("prune", "out_is_model", "is the input model"),
    ("prune", "out_inside_model", "is the input model"),
    ("prune", "out_is_a_file", "is an existing file"),
    ("prune", "out_is_foreign", "non-empty folder that depgraph did not write"),
    ("sparsify", "out_is_model", "is the input model"),
    ("sparsify", "out_is_foreign", "non-empty folder that depgraph did not write"),
])
def test_output_that_would_lose_data_is_refused(tiny, tmp_path, case, message, command):
    work = tmp_path / "work"
    shutil.copytree(tiny, work)
    out = {"out_is_model": work / "model", "out_inside_model": work / "model" / "pruned",
           "out_is_a_file": work / "calib.txt", "out_is_foreign": work / "mine"}[case]
    if case == "out_is_foreign":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    before = checksums(tmp_path)
    extra = ["--method", "magnitude"] if command == "sparsify" else ["--method", "l2"]
    result = depgraph(command, work / "model", *extra, "-o", out)
    refused(result, message)
    assert checksums(tmp_path) == before


def test_overwrite_replaces_a_foreign_folder_only_when_complete(tiny, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = depgraph("prune", tiny / "model", "--method", "l2", "--target", "0.1", "--round-to", "1",
                      "--no-report", "--overwrite", "-o", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (out / "old.txt").exists() and (out / "plan.json").is_file() and (out / "report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_unwritable_output_is_refused_before_loading_anything(tmp_path):
    if os.access("/proc/sys", os.W_OK):
        pytest.skip("/proc/sys is writable here")
    # the model does not exist: the output is checked first, so that is what the error names
    result = depgraph("prune", tmp_path / "no-model", "-o", "/proc/sys/depgraph/out")
    refused(result, "/proc/sys is not writable")


@pytest.mark.parametrize("argv,message,status", [
    (["--target", "0.9"], "target 0.9 cannot be met: at most", 1),
    (["--target", "0.2", "--ratios", "mlp=0.3"], "--ratios and --target", 1),
    (["--round-to", "0"], "--round-to must be a positive integer", 1),
    (["--round-to", "-8"], "--round-to must be a positive integer", 1),
    (["--layers", "5:2"], "empty layer range 5:2", 2),
    (["--layers", "40:50"], "are not in the model (its layers: 0..3)", 1),
    (["--layers", "0", "--kinds", "hidden"], "nothing to prune", 1),
])
def test_prune_options_are_refused(tiny, tmp_path, argv, message, status):
    before = checksums(tiny.parent)
    result = depgraph("prune", tiny / "model", "--method", "l2", *argv, "-o", tmp_path / "out")
    refused(result, message, status)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    assert checksums(tiny.parent) == before


@pytest.mark.parametrize("argv,message", [
    (["--ppl", "wikitext2", "--window", "100000"], "--window 100000 is longer than the model's context (256"),
    (["--tasks", "piqa", "--limit", "0"], "--limit must be a positive integer"),
    (["--ppl", "wikitext2", "--limit", "-3"], "--limit must be a positive integer"),
])
def test_eval_options_are_refused(tiny, argv, message):
    before = checksums(tiny.parent)
    refused(depgraph("eval", tiny / "model", *argv), message)
    assert checksums(tiny.parent) == before


def test_report_of_a_file_says_so(tiny, tmp_path):
    before = checksums(tiny.parent)
    refused(depgraph("report", tiny / "calib.txt"), "is a file, not a run folder")
    assert checksums(tiny.parent) == before


@pytest.mark.parametrize("case,message", [
    ("only_config", "no weights"),
    ("garbage_config", "config.json: not valid JSON"),
    ("truncated", "model.safetensors: cannot read safetensors weights"),
])
def test_broken_model_folders_are_one_line(tiny, tmp_path, case, message):
    folder = tmp_path / "m"
    shutil.copytree(tiny / "model", folder)
    weights = folder / "model.safetensors"
    if case == "only_config":
        for p in folder.iterdir():
            if p.name != "config.json":
                p.unlink()
    elif case == "garbage_config":
        (folder / "config.json").write_text("{not json")
    else:
        weights.write_bytes(weights.read_bytes()[:2000])
    before = checksums(tmp_path)
    refused(depgraph("trace", folder), message)
    assert checksums(tmp_path) == before


def test_killed_prune_leaves_no_half_written_output(tiny, tmp_path):
    """SIGKILL `depgraph prune` while its temporary folder exists: OUT is absent (or complete), and the next run
    removes the dead run's temporary and leaves only OUT."""
    out = tmp_path / "out"
    for attempt in range(3):
        proc = subprocess.Popen([SCRIPT, "prune", str(tiny / "model"), "--method", "l2", "--target", "0.1",
                                 "--round-to", "1", "-o", str(out)], env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        temp = None
        while proc.poll() is None and temp is None:
            temp = next((p for p in tmp_path.iterdir() if p.name.startswith(".out.depgraph-tmp-")), None)
            time.sleep(0.002)
        if temp is not None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        shutil.rmtree(out, ignore_errors=True)  # finished before we saw the temporary: try again
    else:
        pytest.fail("never caught the run while its temporary folder existed")
    assert temp.name.split("-")[-2] == str(proc.pid)  # the owner's pid is in the name
    assert not out.exists() or {"plan.json", "report.json", "config.json"} <= {p.name for p in out.iterdir()}
    result = depgraph("prune", tiny / "model", "--method", "l2", "--target", "0.1", "--round-to", "1",
                      "--no-report", "-o", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    import depgraph as dg

    assert dg.load_pruned(out) is not None


def test_python_m_entry_point_matches_the_script(tmp_path):
    result = subprocess.run([sys.executable, "-m", "depgraph.cli", "trace", str(tmp_path / "nope")],
                            capture_output=True, text=True, env=env(), timeout=300)
    assert result.returncode == 1 and last_line(result) == last_line(depgraph("trace", tmp_path / "nope"))
