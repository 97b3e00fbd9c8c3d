"""RecoverConfig: one validated dataclass for recover()'s settings, filled by the CLI from its options by name."""
import dataclasses

import pytest

from depgraph.cli import build_parser
from recover.config import RecoverConfig
from recover.lora import recover

# options of `depgraph recover` that are not recovery settings (what to load, where to write, how to print)
NOT_SETTINGS = {"pruned", "data", "output", "dtype", "teacher", "quiet", "json", "func", "command", "debug"}


def _recover_args(*extra):
    return build_parser().parse_args(["recover", "M", "--data", "d.json", "-o", "out", *extra])


def test_invalid_settings_are_refused_when_the_config_is_made():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        RecoverConfig(rank=0)
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        RecoverConfig(batch_size=10, micro_batch_size=4)
    with pytest.raises(ValueError, match="early stopping needs a validation split"):
        RecoverConfig(early_stopping_patience=2)
    with pytest.raises(ValueError, match="distill_alpha"):
        RecoverConfig().updated(distill_alpha=1.5)


def test_unknown_setting_names_itself(tmp_path):
    with pytest.raises(TypeError, match="unknown recover setting.*ranq"):
        RecoverConfig().updated(ranq=4)
    with pytest.raises(TypeError, match="ranq"):  # before anything is loaded or written
        recover(None, None, [], tmp_path / "out", ranq=4)
    assert not (tmp_path / "out").exists()


def test_keyword_options_override_the_config():
    base = RecoverConfig(rank=4, lr=3e-4)
    c = base.updated(rank=16)
    assert (c.rank, c.lr, base.rank) == (16, 3e-4, 4)


def test_cli_fills_the_config_from_its_options():
    c = RecoverConfig.from_options(_recover_args())
    assert c == RecoverConfig()  # the CLI's defaults are the library's
    args = _recover_args("--rank", "16", "--early-stopping", "2", "--val-size", "3", "--bf16", "off", "--resume",
                         "--max-steps", "5", "--target-modules", "q_proj,v_proj", "--overwrite")
    c = RecoverConfig.from_options(args)
    assert (c.rank, c.early_stopping_patience, c.val_size, c.bf16, c.resume_from_checkpoint, c.max_steps,
            c.target_modules, c.overwrite) == (16, 2, 3, False, True, 5, "q_proj,v_proj", True)
    assert isinstance(c.val_size, int)
    assert RecoverConfig.from_options(_recover_args("--val-size", "0.1", "--bf16", "auto")).val_size == 0.1
    assert RecoverConfig.from_options(_recover_args("--bf16", "on")).bf16 is True


def test_every_cli_option_is_a_setting_or_named_as_not_one():
    dests = set(vars(_recover_args()))
    fields = {f.name for f in dataclasses.fields(RecoverConfig)}
    assert dests - NOT_SETTINGS <= fields, dests - NOT_SETTINGS - fields


def test_defaults_are_what_the_docs_say():
    """The README states recover()'s measured defaults; they are RecoverConfig's (and so the CLI's, above)."""
    import re
    from pathlib import Path

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    m = re.search(r"`recover`'s defaults \([^)]*\): LoRA rank (\d+), alpha (\d+), lr ([0-9.e-]+), LM loss "
                  r"\(no distillation\)", readme)
    assert m, "README lost the sentence stating recover()'s defaults"
    c = RecoverConfig()
    assert (int(m[1]), int(m[2]), float(m[3]), c.distill) == (c.rank, c.alpha, c.lr, False)
    assert c.decay_by_time and RecoverConfig.from_options(_recover_args()).lr == float(m[3])
    assert f"lr {m[3]}" in " ".join(recover.__doc__.split())
