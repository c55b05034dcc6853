"""Training configuration: every setting named once, with its default and its help.

`TrainConfig` is the single description of a training run. Everything else is derived from its
fields: the `semiseg train` arguments (`add_arguments`, `from_arguments`), the JSON the plugin
hands to its training process (`to_dict`, `from_dict`), and the equivalent command line
(`to_argv`). A preset (a paper's settings, say) is a named dict of field overrides, method
options included, applied with `with_overrides`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from semiseg.errors import InputError
from semiseg.presets import PRESET_NAMES

# A case given by itself: a case id of the dataset, an image path (unlabeled) or an [image, label]
# pair of paths (labeled).
CaseEntry = str | list[str] | tuple[str, str]


def _setting(default: Any = dataclasses.MISSING, help: str = "", flag: str | None = None, cli: bool = True,
             at_least: float | None = None, above: float | None = None, **argparse_options: Any):
    """A TrainConfig field with what the command line needs to offer it and check it."""
    metadata = {"help": help, "flag": flag, "cli": cli, "at_least": at_least, "above": above, "argparse": argparse_options}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    data: str = _setting(help="dataset folder")
    output: str = _setting(help="output folder for checkpoints and the log", flag="--out", metavar="OUT")
    method: str = _setting("cps", "training method (see `semiseg methods`); the default is the one the hippocampus benchmark recommends (`semiseg.methods.evidence.recommended_method`)")
    network: str = _setting("vnet", "network: vnet (the papers' VNet) or unet (MONAI BasicUNet)")
    network_options: dict[str, Any] = _setting({}, "network option, e.g. base_filters=8", flag="--network-option")
    method_options: dict[str, Any] = _setting({}, "method option (see `semiseg methods`)", flag="--option")
    labeled: str | list[CaseEntry] = _setting(
        "10%", "labeled subset: a count (8), a percentage of the non-validation labeled cases (10%%), or a file listing "
        "case ids; other scans train unlabeled. From Python also the cases themselves: ids, or [image, label] path pairs")
    validation: str | list[CaseEntry] = _setting(
        "0", "validation cases held out from the labeled ones: count, percentage or list file (from Python also a list of ids)")
    unlabeled: list[str] = _setting([], "extra folder of unlabeled scans (repeatable)", metavar="DIR")
    unlabeled_cases: list[CaseEntry] | None = _setting(
        None, "the unlabeled cases themselves (ids or image paths); None: every scan neither labeled nor validation", cli=False)
    # Hippocampus budget study (benchmarks/results/hippocampus_cpu.md, 3 seeds each): cps, the default method, gained at
    # every step, 1000 -> 3000 -> 6000, with 4 and with 16 labeled (6000 over 3000: +0.006, p = 0.03 and 0.006), and only
    # at 6000 beat supervised-only's best budget at 16 labeled (6000; 14000 scored lower): +0.009, p = 2e-5. No method
    # measurably lost from a longer budget.
    iterations: int = _setting(6000, "training iterations", at_least=1)
    batch_size: int = _setting(2, "labeled patches per iteration (as many unlabeled)", at_least=1)
    patch_size: tuple[int, int, int] | None = _setting(None, "patch size in voxels (default: from the data)", flag="--patch", at_least=1,
                                                       type=int, nargs=3, metavar=("Z", "Y", "X"))
    ignore_label: int | None = _setting(None, "label value of unannotated voxels (nnU-Net's ignore label, e.g. 255), left out of the "
                                        "loss and the metrics (default: the \"ignore\" value of dataset.json's labels, if any)",
                                        type=int, metavar="VALUE")
    optimizer: str = _setting("sgd", "optimizer (poly learning-rate decay)", choices=["sgd", "adamw"])
    # The papers use 0.01 over 6000 iterations; 0.05 converges in CPU-sized budgets (300 it: Dice 0.81 vs 0.00 on hippocampus).
    lr: float = _setting(0.05, "initial learning rate", above=0)
    lr_schedule: str = _setting("poly", "learning-rate decay: poly, step (/10 every 2500 iterations, UA-MT) or constant",
                                choices=["poly", "step", "constant"])
    weight_decay: float = _setting(1e-4, "weight decay", at_least=0)
    momentum: float = _setting(0.9, "SGD momentum", cli=False)
    nesterov: bool = _setting(True, "plain SGD momentum instead of Nesterov's (the UA-MT/SSL4MIS code's)", flag="--no-nesterov")
    augmentation: str = _setting("default", "default (flips, quarter turns, affine, foreground oversampling) or ua-mt "
                                 "(UA-MT's random crop + rotation/flip)", choices=["default", "ua-mt"])
    preset: str | None = _setting(None, "a method's published protocol (paper: its paper's optimizer, schedule, iterations, "
                                  "losses, augmentation, network options); flags given explicitly win", choices=list(PRESET_NAMES))
    validate_every: int = _setting(200, "iterations between validations and last-checkpoint saves", at_least=1)
    log_every: int = _setting(10, "iterations averaged into one log line", at_least=1)
    seed: int = _setting(0, "seed of the split, the initial weights and the patch draws")
    device: str = _setting("auto", "auto, cpu, cuda, cuda:N or mps")
    amp: bool = _setting(True, "disable mixed precision on CUDA (bf16 where supported, else fp16 with a gradient scaler)", flag="--no-amp")
    channels_last: bool = _setting(False, "channels_last_3d memory format (faster convolutions on tensor-core GPUs)")
    compile: bool = _setting(False, "torch.compile the networks (slow first step, faster after; its time is logged)")
    workers: int = _setting(2, "data-loading worker processes (0: load in the main process)", at_least=0)
    resume: bool = _setting(False, "continue the run in --out from its last checkpoint")
    overwrite: bool = _setting(False, "replace a run already in --out")
    initial_checkpoint: str | None = _setting(None, "start from these weights and this plan (fine-tuning)", cli=False)
    frozen_norm_statistics: bool = _setting(False, "normalise with the batch-norm statistics the weights came with, "
                                            "never re-estimated from the training patches (fine-tuning)", cli=False)

    # JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The config of `to_dict` (tuples come back from JSON lists); unknown keys are refused."""
        data = dict(data)
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise InputError(f"unknown training settings: {', '.join(unknown)}")
        if data.get("patch_size") is not None:
            data["patch_size"] = tuple(int(v) for v in data["patch_size"])
        return cls(**data)

    def with_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        """This config with some fields replaced; `method_options` and `network_options` are merged."""
        data = self.to_dict()
        for key in ("method_options", "network_options"):
            if key in overrides:
                overrides = {**overrides, key: {**data[key], **overrides[key]}}
        return TrainConfig.from_dict({**data, **overrides})

    # Command line -----------------------------------------------------------------------------
    def to_argv(self) -> list[str]:
        """The `semiseg train` arguments for this config: data and output, then every setting the
        command line can express that differs from its default (see `unexpressed`)."""
        argv: list[str] = []
        for spec in _cli_fields():
            value = getattr(self, spec.name)
            # --network always: without it the CLI trains on the method's paper network, not the default.
            if spec.name not in ("data", "output", "network") and value == default_of(spec.name):
                continue
            flag = _flag(spec)
            if isinstance(value, bool):
                argv.append(flag)  # a non-default bool: the flag itself (--no-amp for amp=False)
            elif isinstance(value, dict):
                for key, item in value.items():
                    argv += [flag, f"{key}={json.dumps(item)}"]
            elif isinstance(value, tuple):
                argv += [flag, *map(str, value)]
            elif isinstance(value, list):
                if spec.name == "unlabeled":
                    for folder in value:
                        argv += [flag, folder]
            else:
                argv += [flag, str(value)]
        return argv

    def unexpressed(self) -> list[str]:
        """The settings differing from their default that `to_argv` cannot give (Python/plugin only)."""
        names = [f.name for f in dataclasses.fields(self) if not f.metadata["cli"] and getattr(self, f.name) != default_of(f.name)]
        return names + [name for name in ("labeled", "validation") if not isinstance(getattr(self, name), str)]


def default_of(name: str) -> Any:
    """The default value of a TrainConfig field."""
    spec = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default


def _cli_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata["cli"]]


def _flag(spec: dataclasses.Field) -> str:
    return spec.metadata["flag"] or "--" + spec.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, names: list[str] | None = None, defaults: dict[str, Any] | None = None,
                  helps: dict[str, str] | None = None) -> None:
    """Add the command-line arguments of TrainConfig's fields (all, or `names`) to `parser`;
    `defaults` and `helps` replace a field's default and help (a benchmark's own)."""
    defaults, helps = defaults or {}, helps or {}
    for spec in _cli_fields():
        if names is not None and spec.name not in names:
            continue
        default = defaults.get(spec.name, default_of(spec.name))
        options: dict[str, Any] = {"dest": spec.name, "help": helps.get(spec.name, spec.metadata["help"]), **spec.metadata["argparse"]}
        if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            options["required"] = True
        elif isinstance(default, bool):
            options.update(action="store_false" if default else "store_true", default=default)
        elif isinstance(default, dict):
            options.update(type=key_value_option, action="append", default=[], metavar="KEY=VALUE")
        elif isinstance(default, list):
            options.update(action="append", default=[])
        else:
            options.setdefault("type", type(default) if isinstance(default, (int, float)) else str)
            options["default"] = default
            if default is not None:
                options["help"] += " (default: %(default)s)"
        parser.add_argument(_flag(spec), **options)


def resolve_settings(settings: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """TrainConfig fields (as `to_dict` gives them) completed for a run: the method's paper network
    unless `network` was given, then the fields of `settings["preset"]` that were not given."""
    from semiseg.methods import method_class
    from semiseg.presets import apply_preset, resolve_preset

    if "network" not in given:
        settings = {**settings, "network": method_class(settings["method"]).paper_network}
    if settings.get("preset"):
        settings = apply_preset(settings, resolve_preset(settings["method"], settings["preset"]), given)
    return settings


def check_arguments(args: argparse.Namespace) -> None:
    """Raise InputError, naming the flag, for the first parsed setting outside its range."""
    for spec in _cli_fields():
        value = getattr(args, spec.name, None)
        if value is None:
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        at_least, above = spec.metadata["at_least"], spec.metadata["above"]
        given = f"{_flag(spec)} {' '.join(map(str, values))}"
        if at_least is not None and min(values) < at_least:
            raise InputError(f"{given}: must be at least {at_least}")
        if above is not None and min(values) <= above:
            raise InputError(f"{given}: must be more than {above}")


def from_arguments(args: argparse.Namespace, **settings: Any) -> TrainConfig:
    """A TrainConfig from the arguments `add_arguments` added (others keep their defaults), and
    `settings` for the fields the command line does not hold."""
    values = {}
    for spec in _cli_fields():
        if hasattr(args, spec.name):
            value = getattr(args, spec.name)
            if isinstance(default_of(spec.name), dict):
                value = dict(value)
            values[spec.name] = tuple(value) if spec.name == "patch_size" and value else value
    return TrainConfig(**{**values, **settings})


# KEY=VALUE options --------------------------------------------------------------------------------

def parse_key_value(text: str) -> tuple[str, Any]:
    """KEY=VALUE, the value parsed as JSON when it is JSON (8 -> 8, true -> True, abc -> "abc")."""
    if "=" not in text:
        raise InputError(f"'{text}': expected KEY=VALUE, e.g. base_filters=8")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def key_value_option(text: str) -> tuple[str, Any]:
    """argparse type of --option/--network-option."""
    try:
        return parse_key_value(text)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_options(text: str) -> dict[str, Any]:
    """Options typed in one field: KEY=VALUE items separated by spaces or commas."""
    return dict(parse_key_value(item) for item in text.replace(",", " ").split())
