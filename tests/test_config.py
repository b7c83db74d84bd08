"""Config: flags derived from dataclass fields, preset precedence, round trip through JSON."""

import dataclasses
import json
import re

import pytest

from chatsmith import config
from chatsmith.common import UserError


def test_precedence_default_preset_flag():
    default = config.parse(config.PretrainStage, ["--preset", "cpu"])
    smoke = config.parse(config.PretrainStage, ["--preset", "smoke"])
    flagged = config.parse(config.PretrainStage, ["--preset", "smoke", "--depth", "3", "--steps", "7"])
    assert default.model.depth == config.preset_cpu()["model"]["depth"]
    assert smoke.model.depth == config.preset_smoke()["model"]["depth"]
    assert (flagged.model.depth, flagged.train.steps) == (3, 7)
    # fields no preset or flag touches keep the dataclass default
    assert flagged.optim == config.OptimConfig()


def test_run_name_defaults_to_preset_and_flags_types():
    cfg = config.parse(config.SpeedrunStage, ["--preset", "smoke", "--sources", "local:a", "local:b",
                                              "--compile", "--model-vocab-size", "99", "--val-fraction", "0.5"])
    assert cfg.run.run == "smoke"
    assert cfg.data.sources == ("local:a", "local:b")
    assert cfg.train.compile is True
    assert cfg.model.vocab_size == 99 and cfg.tokenizer.vocab_size == config.preset_smoke()["tokenizer"]["vocab_size"]
    assert cfg.data.val_fraction == 0.5


def test_every_field_has_help_and_a_flag():
    parser = config.build_parser(config.SpeedrunStage, "x")
    text = parser.format_help()
    for section in dataclasses.fields(config.SpeedrunStage):
        for f in dataclasses.fields(section.default):
            assert f.metadata.get("help"), f"{section.name}.{f.name} has no help"
    assert "--vocab-size" in text and "--model-vocab-size" in text and "--no-compile" in text


def test_unknown_preset_and_bad_flag():
    with pytest.raises(UserError, match="unknown preset"):
        config.parse(config.PretrainStage, ["--preset", "nope"])
    with pytest.raises(UserError, match="argument --depth: invalid int value: 'four'"):
        config.parse(config.PretrainStage, ["--depth", "four"])
    with pytest.raises(UserError, match="unrecognized arguments: --no-such-flag"):
        config.parse(config.PretrainStage, ["--no-such-flag"])


@pytest.mark.parametrize("argv,message", [
    (["--ckpt-every", "0"], "--ckpt-every must be at least 1, not 0"),  # was a ZeroDivisionError in the loop
    (["--device-batch", "0"], "--device-batch must be at least 1, not 0"),  # was a ZeroDivisionError too
    (["--matrix-lr", "nan"], "--matrix-lr must be a finite number, not nan"),
    (["--warmdown-frac", "1.5"], "--warmdown-frac must be at most 1.0, not 1.5"),
    (["--adam-betas", "0.9"], "--adam-betas takes 2 values, not 1"),
    (["--seed", "-1"], "--seed must be at least 0, not -1"),
])
def test_ranges_are_checked_where_flags_are_parsed(argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        config.parse(config.PretrainStage, argv)


def test_save_and_reload(tmp_path):
    cfg = config.parse(config.SpeedrunStage, ["--preset", "smoke", "--depth", "5"])
    config.save(cfg, tmp_path / "config.json", "speedrun")
    other = config.make(config.TokenizerStage)
    config.save(other, tmp_path / "config.json", "tokenizer")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["speedrun"]["model"]["depth"] == 5
    assert config.from_dict(config.SpeedrunStage, saved["speedrun"]) == cfg
    assert config.from_dict(config.TokenizerStage, saved["tokenizer"]) == other


def test_configs_are_frozen():
    cfg = config.make(config.PretrainStage)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3
