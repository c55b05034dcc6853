"""A trained model: a method with its networks, the preprocessing plan and the checkpoint record.

`ModelRecord` is the checkpoint's description (model.json): written once by the trainer, read
through `read_record` everywhere else. Its layout is the checkpoint format's version 1
(`semiseg.checkpoint.FORMAT_VERSION`); checkpoints written before the record existed have the
same layout and load unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from semiseg.checkpoint import load_weights, read_meta, resolve
from semiseg.datasets import Split
from semiseg.errors import CheckpointError
from semiseg.methods import build_method
from semiseg.methods.base import Method, NetworkSpec
from semiseg.preprocessing import Plan

# model.json keys the record reads into fields; any other key is kept as is in `extra`.
_KNOWN_KEYS = {"format", "format_version", "model", "class_names", "plan", "split", "data", "seed", "iteration", "iterations",
               "train_config", "validation", "versions", "weights_sha256"}


@dataclass
class ModelRecord:
    method: str
    method_options: dict[str, Any]
    network: str
    network_options: dict[str, Any]
    in_channels: int
    num_classes: int
    plan: Plan
    split: Split | None = None
    data: str | None = None
    seed: int | None = None
    iteration: int = 0
    iterations: int = 0
    train_config: dict[str, Any] | None = None  # the TrainConfig, as JSON (fields of older versions included)
    best_dice_mean: float | None = None
    validation_history: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)  # set by save_checkpoint
    weights_sha256: str | None = None  # set by save_checkpoint
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. a benchmark's checkpoint selection

    @property
    def class_names(self) -> dict[int, str]:
        return dict(self.plan.class_names)

    def case_role(self, case_id: str) -> str | None:
        """How this model met a case of its data: "labeled" or "unlabeled" (trained on), "validation"
        (held out), None (never)."""
        if self.split is None:
            return None
        roles = (("labeled", self.split.labeled), ("unlabeled", self.split.unlabeled), ("validation", self.split.validation))
        return next((role for role, ids in roles if case_id in ids), None)

    def to_dict(self) -> dict[str, Any]:
        """The model.json layout (save_checkpoint adds the format, versions and weights checksum)."""
        data: dict[str, Any] = {
            "model": {"method": self.method, "options": dict(self.method_options),
                      "network": {"name": self.network, "options": dict(self.network_options)},
                      "in_channels": self.in_channels, "num_classes": self.num_classes},
            "class_names": {str(k): v for k, v in self.class_names.items()},
            "plan": self.plan.to_dict(),
            "split": self.split.to_dict() if self.split is not None else None,
            "data": self.data,
            "seed": self.seed,
            "iteration": self.iteration,
            "iterations": self.iterations,
            "train_config": self.train_config,
            "validation": {"best_dice_mean": self.best_dice_mean, "history": list(self.validation_history)},
            **self.extra,
        }
        if self.versions:
            data["versions"] = dict(self.versions)
        if self.weights_sha256 is not None:
            data["weights_sha256"] = self.weights_sha256
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "checkpoint") -> ModelRecord:
        try:
            model = data["model"]
            split = data.get("split")
            validation = data.get("validation") or {}
            return cls(
                method=str(model["method"]), method_options=dict(model["options"]), network=str(model["network"]["name"]),
                network_options=dict(model["network"]["options"]), in_channels=int(model["in_channels"]),
                num_classes=int(model["num_classes"]), plan=Plan.from_dict(data["plan"]),
                split=Split(**split) if split else None, data=data.get("data"), seed=data.get("seed"),
                iteration=int(data.get("iteration", 0)), iterations=int(data.get("iterations", 0)),
                train_config=data.get("train_config"), best_dice_mean=validation.get("best_dice_mean"),
                validation_history=list(validation.get("history") or []), versions=dict(data.get("versions") or {}),
                weights_sha256=data.get("weights_sha256"), extra={k: v for k, v in data.items() if k not in _KNOWN_KEYS},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CheckpointError(f"{where}: incomplete checkpoint description ({error})") from None

    def build_method(self) -> Method:
        return build_method(self.method, self.in_channels, self.num_classes, NetworkSpec(self.network, dict(self.network_options)),
                            dict(self.method_options))


def read_record(path: str | os.PathLike) -> ModelRecord:
    """The record of a checkpoint folder (or of its model.json / model.safetensors)."""
    return ModelRecord.from_dict(read_meta(path), str(path))


@dataclass
class Model:
    method: Method
    plan: Plan
    record: ModelRecord
    path: str

    def predictors(self) -> list:
        return list(self.method.predictors().values())

    @property
    def overlap(self) -> float:
        """The sliding-window overlap the method's paper infers with."""
        return self.method.inference_overlap

    @property
    def window_scale(self) -> int:
        """How many training patches a sliding window may span per axis (`inference.sliding_window`)."""
        return LARGER_WINDOW_SCALE if self.method.larger_windows else 1


# Windows of up to 2 training patches per axis, with the same overlap in voxels: measured in
# benchmarks/results/inference.md (the same Dice, fewer voxels computed twice).
LARGER_WINDOW_SCALE = 2


def method_weights(method: Method) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value for name, net in method.networks.items() for key, value in net.state_dict().items()}


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> Model:
    """Rebuild the method from model.json and load its safetensors weights (no unpickling)."""
    record = read_record(path)
    method = record.build_method()
    load_method_weights(method, load_weights(path, record.weights_sha256), str(path))
    method.to(device).eval()
    return Model(method, record.plan, record, str(resolve(path)))


def load_method_weights(method: Method, weights: dict[str, torch.Tensor], where: str) -> None:
    for name, net in method.networks.items():
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        try:
            net.load_state_dict(state)
        except RuntimeError as error:
            raise CheckpointError(f"{where}: weights do not fit network '{name}' ({str(error).splitlines()[0]})") from None
