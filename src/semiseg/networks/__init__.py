"""Segmentation networks, built by name from a JSON-able config.

Every network maps (B, in_channels, D, H, W) to logits (B, out_channels, D, H, W) and exposes
`encode(x) -> list of features` and `decode(features, return_embedding=False)` so that methods can
add to or read from features without a network of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from semiseg.errors import InputError
from semiseg.networks.resnet_segmenter import ResNetSegmenter
from semiseg.networks.residual_unet import plain_unet, residual_unet
from semiseg.networks.unet import UNet
from semiseg.networks.uxnet import UXNet
from semiseg.networks.vnet import VNet

NETWORKS: dict[str, Callable[..., nn.Module]] = {"resnet": ResNetSegmenter, "plain-unet": plain_unet, "residual-unet": residual_unet, "unet": UNet, "uxnet": UXNet, "vnet": VNet}


def register_network(name: str, factory: Callable[..., nn.Module]) -> None:
    NETWORKS[name] = factory


def build_network(name: str, in_channels: int, out_channels: int, **options: Any) -> nn.Module:
    """Build a registered network; options are the factory's keyword arguments (kept in checkpoints)."""
    if name not in NETWORKS:
        raise InputError(f"unknown network '{name}' (choose from: {', '.join(sorted(NETWORKS))})")
    try:
        return NETWORKS[name](in_channels=in_channels, out_channels=out_channels, **options)
    except TypeError as error:
        raise InputError(f"network '{name}': bad option ({error})") from None


def size_multiple(network: nn.Module) -> int:
    """Patch sides must be multiples of this (2 ** number of downsamplings)."""
    return 2 ** getattr(network, "downsamplings", 4)
