"""`depgraph prune` and `depgraph eval` end to end on a tiny model folder."""
import json

import pytest
import torch

import depgraph
from depgraph.cli import main
from test_evaluate import TEXT, _tiny_model
from tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tok = tiny_tokenizer()
    model = _tiny_model(len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder.parent / "calib.txt").write_text(TEXT)
    return folder


def test_prune_end_to_end(tiny_folder, tmp_path, capsys):
    out = tmp_path / "pruned"
    calib = tiny_folder.parent / "calib.txt"
    rc = main([("prune"), str(tiny_folder), "--target", "0.1", "--method", "taylor", "--calib", str(calib),
               "--n-samples", "4", "--seq-len", "16", "--round-to", "1", "--reconstruct", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    model = depgraph.load_pruned(out)
    report = json.loads((out / "report.json").read_text())
    assert report["params_after"] == sum(p.numel() for p in model.parameters())
    assert 0.05 < report["removed_fraction"] < 0.15
    assert report["reconstruct"] and report["calibration"]["protocol"] == "bos"
    assert all(r["rel_error_after"] <= r["rel_error_before"] for r in report["reconstruction"])
    plan = depgraph.Plan.from_json((out / "plan.json").read_text())
    assert plan.params_removed() == report["params_before"] - report["params_after"]
    assert "wrote" in capsys.readouterr().out
    html = (out / "report.html").read_text()
    assert "<html" in html.lower() and "http://" not in html


@pytest.mark.parametrize("argv,reconstruct,damp,select", [
    ([], True, 1.0, "scores"),  # the measured default: activation scores read calibration, so the consumers are re-fitted
    (["--no-reconstruct"], False, None, "scores"),
    (["--damp", "3"], True, 3.0, "scores"),
    (["--method", "l2"], False, None, "scores"),  # a data-free method reads no calibration: nothing to fit on
    (["--select", "obs"], True, 1.0, "obs"),
])
def test_prune_reconstruct_default(tiny_folder, tmp_path, capsys, argv, reconstruct, damp, select):
    out = tmp_path / "pruned"
    calib = tiny_folder.parent / "calib.txt"
    rc = main(["prune", str(tiny_folder), "--target", "0.1", "--calib", str(calib), "--n-samples", "4",
               "--seq-len", "16", "--round-to", "1", "--no-report", *argv, "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["reconstruct"] is reconstruct and report["damp"] == damp and report["select"] == select
    assert (report["calibration"] is not None) is (reconstruct or "l2" not in argv)


@pytest.mark.parametrize("argv,message", [
    (["--target", "1.5"], "--target must be in [0, 1)"),
    (["--damp", "0"], "--damp must be a positive number"),
    (["--method", "nope"], "invalid choice"),
    (["--calib", "/does/not/exist.txt"], "does not exist"),
    (["--calib", "EMPTY"], "is empty"),
    (["--select", "obs", "--no-reconstruct"], "--select obs re-chooses units during the re-fit"),
])
def test_prune_bad_arguments_write_nothing(tiny_folder, tmp_path, capsys, argv, message):
    out = tmp_path / "pruned"
    if "EMPTY" in argv:
        empty = tmp_path / "empty.txt"
        empty.write_text("")
        argv = [a if a != "EMPTY" else str(empty) for a in argv]
    rc = main(["prune", str(tiny_folder), *argv, "-o", str(out)])
    assert rc != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()[-1]) < 300
    assert not out.exists()


def test_eval_json(tiny_folder, capsys):
    from recover.datasets import resolve_data_dir

    try:
        resolve_data_dir()
    except FileNotFoundError:
        pytest.skip("shared data folder not found")
    rc = main(["eval", str(tiny_folder), "--ppl", "wikitext2,ptb", "--window", "32", "--limit", "3", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["window"] == 32 and set(result["ppl"]) == {"wikitext2", "ptb"}
    assert all(v > 1 for v in result["ppl"].values())
    assert result["protocol"] == "bos" and result["ppl_source"]["ptb"]["bos"] is not None  # tiny tokenizer adds BOS
    rc = main(["eval", str(tiny_folder), "--ppl", "ptb", "--window", "32", "--limit", "3", "--protocol", "llm-pruner"])
    assert rc == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "protocol llm-pruner" in line and "BOS first" not in line
    assert main(["eval", str(tiny_folder)]) == 1
    assert "nothing to evaluate" in capsys.readouterr().err


@pytest.mark.parametrize("argv,dtype", [([], torch.float64), (["--gram-dtype", "float32"], torch.float32)])
def test_prune_gram_dtype_reaches_the_refit(tiny_folder, tmp_path, capsys, monkeypatch, argv, dtype):
    """``--gram-dtype`` applies to the in-memory prune too: every consumer's X^T X is accumulated in that dtype."""
    import depgraph.reconstruct as rec

    seen, block_stats = [], rec.block_stats

    def recording(*args, **kwargs):
        stats = block_stats(*args, **kwargs)
        seen.extend(st.gram.dtype for st in stats[0].values() if st.gram is not None)
        return stats
    monkeypatch.setattr(rec, "block_stats", recording)
    out = tmp_path / "pruned"
    rc = main(["prune", str(tiny_folder), "--target", "0.1", "--calib", str(tiny_folder.parent / "calib.txt"),
               "--n-samples", "4", "--seq-len", "16", "--round-to", "1", "--no-report", *argv, "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert seen and set(seen) == {dtype}
