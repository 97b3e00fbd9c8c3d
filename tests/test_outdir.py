"""Output folders (depgraph.outdir) and save_pruned through them: nothing lost, nothing half-done."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import depgraph
from archs import ARCHS, ids
from depgraph import OutputError
from depgraph.outdir import MARKER, check_output, clean_stale, output_folder


def listing(root: Path) -> dict:
    """{relative path: bytes} of every file below ``root`` (folders as None): a before/after snapshot."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def logits(model):
    with torch.no_grad():
        return model(ids()).logits


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def two_models():
    a = ARCHS["llama-mha"]()
    b = copy.deepcopy(a)
    graph = depgraph.trace(b)
    depgraph.shrink(b, depgraph.Plan.from_units(graph, {"mlp.0": [0, 1, 2]}))
    return a, b


def test_foreign_non_empty_folder_is_refused_unless_overwrite(two_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my thesis")
    before = listing(tmp_path)
    with pytest.raises(OutputError, match=f"{out}.*non-empty folder that depgraph did not write.*--overwrite"):
        depgraph.save_pruned(two_models[0], out)
    assert listing(tmp_path) == before
    depgraph.save_pruned(two_models[0], out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / MARKER).is_file()
    depgraph.save_pruned(two_models[1], out)  # a depgraph output folder is replaced without overwrite
    assert torch.equal(logits(depgraph.load_pruned(out)), logits(two_models[1]))


def test_output_is_never_the_input_model(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    before = listing(tmp_path)
    for out, what in ((model_dir, "is the input model"), (model_dir / "sub", "is the input model"),
                      (tmp_path, "holds the input model")):
        with pytest.raises(OutputError, match=what):
            check_output(out, overwrite=True, sources=[model_dir])
    gguf = model_dir / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(OutputError, match="is the input model"):
        check_output(gguf, overwrite=True, sources=[gguf])
    assert listing(tmp_path) == {**before, "model/m.gguf": b"GGUF"}


def test_existing_file_is_refused(two_models, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    with pytest.raises(OutputError, match="is an existing file"):
        depgraph.save_pruned(two_models[0], out, overwrite=True)
    assert out.read_text() == "a file"
    with pytest.raises(OutputError, match="is a file"):
        check_output(out / "below")


def test_unwritable_parent_is_refused_before_writing(tmp_path):
    if os.access("/proc/sys", os.W_OK):
        pytest.skip("/proc/sys is writable here")
    with pytest.raises(OutputError, match="/proc/sys is not writable"):
        check_output("/proc/sys/depgraph-test/out")


def test_interrupted_replace_keeps_the_previous_model(two_models, tmp_path):
    """Two different models: the second save fails half-way, OUT still holds the first, complete."""
    a, b = two_models
    out = tmp_path / "m"
    depgraph.save_pruned(a, out)

    class DiskFull:
        def save_pretrained(self, path):
            (Path(path) / "tokenizer.json").write_text("{half")
            raise OSError("disk full")

    before = listing(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        depgraph.save_pruned(b, out, tokenizer=DiskFull())
    assert listing(tmp_path) == before  # no temporary left, OUT untouched
    assert torch.equal(logits(depgraph.load_pruned(out)), logits(a))
    depgraph.save_pruned(b, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert torch.equal(logits(depgraph.load_pruned(out)), logits(b))


def test_stale_temporaries_of_dead_processes_are_cleaned(two_models, tmp_path):
    pid = dead_pid()
    stale = tmp_path / f".m.depgraph-tmp-{pid}-0a1b2c3d"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / f".m.depgraph-tmp-{os.getpid()}-0a1b2c3d"  # a save in progress: left alone
    live.mkdir()
    other = tmp_path / f".n.depgraph-tmp-{pid}-0a1b2c3d"  # another OUT's temporary: left alone
    other.mkdir()
    depgraph.save_pruned(two_models[0], tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", live.name, other.name])


def test_replace_killed_between_renames_is_undone(two_models, tmp_path):
    """A kill after OUT was moved aside and before the new one took its place: the next write puts OUT back."""
    out = tmp_path / "m"
    depgraph.save_pruned(two_models[0], out)
    aside = tmp_path / f".m.depgraph-old-{dead_pid()}-0a1b2c3d"
    os.rename(out, aside)
    assert clean_stale(out) == [aside]
    assert torch.equal(logits(depgraph.load_pruned(out)), logits(two_models[0]))


def test_usual_permissions(two_models, tmp_path):
    old = os.umask(0o022)
    try:
        out = depgraph.save_pruned(two_models[0], tmp_path / "m")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


def test_output_folder_removes_its_temporary_on_error(tmp_path):
    with pytest.raises(KeyError):
        with output_folder(tmp_path / "run") as tmp:
            (tmp / "a.json").write_text("{}")
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []
