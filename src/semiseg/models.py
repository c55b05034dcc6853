"""A trained model: a method with its networks, the preprocessing plan and the checkpoint record."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from semiseg.checkpoint import load_weights, read_meta, resolve
from semiseg.errors import CheckpointError
from semiseg.methods import build_method
from semiseg.methods.base import Method, NetworkSpec
from semiseg.preprocessing import Plan


@dataclass
class Model:
    method: Method
    plan: Plan
    meta: dict[str, Any]
    path: str

    def predictors(self) -> list:
        return list(self.method.predictors().values())

    @property
    def overlap(self) -> float:
        """The sliding-window overlap the method's paper infers with."""
        return self.method.inference_overlap


def method_weights(method: Method) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value for name, net in method.networks.items() for key, value in net.state_dict().items()}


def method_from_meta(meta: dict[str, Any]) -> Method:
    config = meta["model"]
    return build_method(
        config["method"],
        int(config["in_channels"]),
        int(config["num_classes"]),
        NetworkSpec(config["network"]["name"], dict(config["network"]["options"])),
        dict(config["options"]),
    )


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> Model:
    """Rebuild the method from model.json and load its safetensors weights (no unpickling)."""
    meta = read_meta(path)
    try:
        method = method_from_meta(meta)
        plan = Plan.from_dict(meta["plan"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: incomplete checkpoint description ({error})") from None
    load_method_weights(method, load_weights(path, meta), str(path))
    method.to(device).eval()
    return Model(method, plan, meta, str(resolve(path)))


def load_method_weights(method: Method, weights: dict[str, torch.Tensor], where: str) -> None:
    for name, net in method.networks.items():
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        try:
            net.load_state_dict(state)
        except RuntimeError as error:
            raise CheckpointError(f"{where}: weights do not fit network '{name}' ({str(error).splitlines()[0]})") from None
