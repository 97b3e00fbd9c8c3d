"""PruneReport: prune() returns a typed report; report.json is written once, by it, and read back by it."""
import json

import pytest

import depgraph
from archs import ARCHS
from depgraph.prune_report import PruneReport


def test_prune_returns_a_typed_report_that_round_trips():
    _, report, _ = depgraph.prune(ARCHS["llama-gqa"](), None, target=0.1, method="l2", round_to=1, progress=False)
    assert isinstance(report, PruneReport)
    assert report.params_after == report["params_after"] < report.params_before
    assert report.method == "l2" and report.target == 0.1 and report.layers == sorted(report.layers)
    assert "model" not in report and report.get("model") is None  # optional parts appear once set
    with pytest.raises(KeyError):
        report["model"]
    back = PruneReport.from_json(report.to_json())
    assert back == report and back.to_json() == report.to_json()
    keys = list(json.loads(report.to_json()))
    assert keys[:4] == ["method", "target", "target_of", "policy"] and keys[-3:] == ["times", "groups", "widths"]


def test_optional_parts_and_unknown_keys_are_kept_in_order():
    r = PruneReport(method="l1")
    r["calibration"] = None  # set, even to None: written
    r["model"] = "tiny"
    r["note"] = {"by": "hand"}  # not a field: kept in extra
    d = json.loads(r.to_json())
    assert d["calibration"] is None and d["model"] == "tiny" and d["note"] == {"by": "hand"}
    assert list(d)[-3:] == ["model", "calibration", "note"]
    assert PruneReport.from_json(r.to_json()).to_dict() == r.to_dict()
    with pytest.raises(ValueError, match="JSON object"):
        PruneReport.from_dict([1, 2])


def test_cli_writes_report_json_once_and_it_reads_back(tmp_path, monkeypatch):
    from depgraph.cli import main
    from tiny import tiny_tokenizer

    model = ARCHS["llama-gqa"]()
    model.save_pretrained(tmp_path / "src")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    writes = []
    real = PruneReport.to_json

    def counting(self, *a, **k):
        writes.append(1)
        return real(self, *a, **k)
    monkeypatch.setattr(PruneReport, "to_json", counting)
    out = tmp_path / "out"
    assert main(["prune", str(tmp_path / "src"), "--method", "l2", "--target", "0.05", "--round-to", "1",
                 "--no-report", "-o", str(out)]) == 0
    assert len(writes) == 1
    rep = PruneReport.from_json(out)
    assert rep.model == str(tmp_path / "src") and rep.calibration is None and "save_s" in rep.times
    assert rep.params_after == depgraph.load_pruned(out).num_parameters()
    assert "l2" in (out / "README.md").read_text()  # the model card read the same report


def test_viz_and_the_model_card_read_report_json_through_the_report(tmp_path):
    from depgraph.card import report_of
    from viz.report import load_run

    r = PruneReport(method="activation", target=0.2, params_before=10, params_after=8)
    r["note"] = "kept"
    (tmp_path / "report.json").write_text(r.to_json())
    assert load_run(tmp_path)["report"] == r.to_dict()
    assert report_of({"report.json": r.to_json()}) == r.to_dict()
    (tmp_path / "report.json").write_text("[1, 2]")  # valid JSON, not a report: a note, not a crash
    run = load_run(tmp_path)
    assert run["report"] is None and any("report.json" in n and "JSON object" in n for n in run["notes"])
    assert report_of({"report.json": "[1, 2]"}) == {}
