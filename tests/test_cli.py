"""The depgraph command: help and the one-line error path."""

from __future__ import annotations

import subprocess

import pytest

from depgraph import cli
from depgraph.cli import trace as cli_trace

COMMANDS = ("trace", "prune", "eval", "recover", "viz", "report", "sparsify")


def test_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_trace_help(capsys):
    assert cli.main(["trace", "--help"]) == 0
    out = capsys.readouterr().out
    assert "MODEL" in out and "--json" in out


def test_no_command_prints_usage(capsys):
    assert cli.main([]) == 2
    assert "usage: depgraph" in capsys.readouterr().err


def test_unknown_option_is_a_usage_error(capsys):
    assert cli.main(["trace", "--no-such-option"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_missing_model_folder_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert cli.main(["trace", str(missing)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("depgraph: error: ") and "no-such-model" in lines[0]


def test_depgraph_errors_are_reported(monkeypatch, capsys):
    from depgraph.errors import DepgraphError

    def boom(args):
        raise DepgraphError("bad plan:\n  group 3 is out of range")

    monkeypatch.setattr(cli_trace, "run", boom)
    assert cli.main(["trace"]) == 1
    assert capsys.readouterr().err == "depgraph: error: bad plan: group 3 is out of range\n"
    with pytest.raises(DepgraphError):
        cli.main(["--debug", "trace"])


def test_console_script_entry_point(tmp_path):
    """The installed ``depgraph`` script (pyproject's [project.scripts]), run on this checkout's code."""
    from test_cli_safety import SCRIPT, env

    if SCRIPT is None:
        pytest.skip("the depgraph console script is not installed")
    result = subprocess.run([SCRIPT, "trace", str(tmp_path / "nope")], capture_output=True, text=True, timeout=300,
                            env=env())
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"depgraph: error: no such model folder or file: " \
                                                     f"'{tmp_path / 'nope'}'"
