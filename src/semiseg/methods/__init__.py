"""Training methods, registered by name; each is one short module on the shared trainer."""

from __future__ import annotations

from typing import Any

from semiseg.errors import InputError
from semiseg.methods.base import Method, NetworkSpec
from semiseg.methods.bcp import BidirectionalCopyPaste
from semiseg.methods.cps import CrossPseudoSupervision
from semiseg.methods.dk_uxnet import DKUXNet
from semiseg.methods.dual_subnet import DualSubnetContrastive
from semiseg.methods.mean_teacher import MeanTeacher
from semiseg.methods.supervised import Supervised
from semiseg.methods.sscl import SSCL
from semiseg.methods.three_d_cps import ThreeDCrossPseudoSupervision
from semiseg.methods.voxel_adversarial import VoxelAdversarial

METHODS: dict[str, type[Method]] = {m.name: m for m in (Supervised, MeanTeacher, CrossPseudoSupervision, DKUXNet, SSCL, ThreeDCrossPseudoSupervision, DualSubnetContrastive, VoxelAdversarial, BidirectionalCopyPaste)}


def register_method(method: type[Method]) -> type[Method]:
    METHODS[method.name] = method
    return method


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise InputError(f"unknown method '{name}' (choose from: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def build_method(name: str, in_channels: int, num_classes: int, network: NetworkSpec, options: dict[str, Any] | None = None) -> Method:
    return method_class(name)(in_channels, num_classes, network, options)
