"""The training configuration: one dataclass whose fields give the CLI arguments, the plugin's JSON
and the equivalent command line, all agreeing."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex

import pytest

from semiseg.cli import build_parser, main
from semiseg.config import TrainConfig, add_arguments, default_of, from_arguments, parse_key_value, parse_options
from semiseg.errors import InputError
from semiseg.napari.training_process import cli_command


def _parse_train(argv: list[str]) -> TrainConfig:
    return from_arguments(build_parser().parse_args(["train", *argv]))


def test_every_default_is_the_cli_default():
    config = _parse_train(["--data", "d", "--out", "o"])
    assert config == TrainConfig(data="d", output="o")
    assert config.labeled == "10%" == default_of("labeled")


def test_a_config_survives_the_command_line_and_json():
    config = TrainConfig(data="data dir", output="runs/x", method="cps", network="unet", network_options={"base_filters": 8},
                         method_options={"weight": 0.5, "name": "a b", "flag": True}, labeled="25%", validation="3",
                         unlabeled=["more/a", "more/b"], iterations=7, batch_size=3, patch_size=(16, 32, 48), optimizer="adamw",
                         lr=0.001, weight_decay=0.0, validate_every=5, log_every=1, seed=4, device="cpu", amp=False,
                         channels_last=True, compile=True, workers=0, resume=True)
    argv = config.to_argv()
    assert _parse_train(argv) == config
    assert config.unexpressed() == []
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert shlex.split(cli_command(config)) == ["semiseg", "train", *argv]


def test_settings_the_command_line_cannot_give_are_named():
    config = TrainConfig(data="d", output="o", labeled=["case_1", ["image.nii.gz", "label.nii.gz"]], initial_checkpoint="runs/a/best")
    assert sorted(config.unexpressed()) == ["initial_checkpoint", "labeled"]
    assert "--labeled" not in config.to_argv()
    assert cli_command(config).endswith("the plugin only")
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(InputError, match="extra_labeled"):
        TrainConfig.from_dict({**config.to_dict(), "extra_labeled": []})


def test_overrides_replace_fields_and_merge_options():
    base = TrainConfig(data="d", output="o", method_options={"a": 1, "b": 2})
    preset = {"lr": 0.01, "iterations": 6000, "method_options": {"b": 3}}
    config = base.with_overrides(preset)
    assert (config.lr, config.iterations, config.method_options) == (0.01, 6000, {"a": 1, "b": 3})
    assert base.method_options == {"a": 1, "b": 2}


def test_a_benchmark_takes_a_subset_with_its_own_defaults():
    parser = argparse.ArgumentParser()
    add_arguments(parser, ["iterations", "lr", "amp"], defaults={"iterations": 6000, "lr": 0.01})
    args = parser.parse_args(["--no-amp"])
    assert (args.iterations, args.lr, args.amp) == (6000, 0.01, False)
    assert not hasattr(args, "method")


def test_key_value_options():
    assert parse_key_value("base_filters=8") == ("base_filters", 8)
    assert parse_key_value("name=a=b") == ("name", "a=b")
    assert parse_options("a=1, b=true c=x") == {"a": 1, "b": True, "c": "x"}
    with pytest.raises(InputError, match="expected KEY=VALUE"):
        parse_options("base_filters")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d", "--out", "o", "--option", "nokey"])


def test_every_field_has_help():
    assert all(field.metadata["help"] for field in dataclasses.fields(TrainConfig))


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "d", "--out", "o", "--iterations", "0"], "--iterations 0: must be at least 1"),
    (["train", "--data", "d", "--out", "o", "--lr", "0"], "--lr 0.0: must be more than 0"),
    (["train", "--data", "d", "--out", "o", "--patch", "16", "0", "16"], "--patch 16 0 16: must be at least 1"),
    (["benchmark", "la", "--data", "d", "--out", "o", "--workers", "-1"], "--workers -1: must be at least 0"),
])
def test_a_setting_out_of_range_is_one_error_naming_its_flag(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"semiseg: error: {message}"
    assert not (tmp_path / "o").exists()


def test_the_equivalent_command_names_the_network_since_the_cli_defaults_to_the_papers():
    config = TrainConfig(data="d", output="o", method="dk-uxnet", network="vnet")
    argv = config.to_argv()
    assert argv[argv.index("--network") + 1] == "vnet"
