"""Segmentation networks, built by name from a JSON-able config.

Every network maps (B, in_channels, D, H, W) to logits (B, out_channels, D, H, W) and follows the
`Network` protocol, so that methods can add to or read from features without a network of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from semiseg.errors import InputError
from semiseg.networks.resnet_segmenter import ResNetSegmenter
from semiseg.networks.residual_unet import plain_unet, residual_unet
from semiseg.networks.unet import UNet
from semiseg.networks.uxnet import UXNet
from semiseg.networks.vnet import VNet

@runtime_checkable
class Network(Protocol):
    """What methods rely on in a network besides forward (images -> logits)."""

    downsamplings: int  # stride-2 steps of the encoder: patch sides must be multiples of 2 ** downsamplings
    encoder_widths: list[int]  # channels of each encoder level, finest first

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's features, finest level first."""
        ...

    def decode(self, features: list[torch.Tensor], return_embedding: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits from `encode`'s features; with `return_embedding`, also the last decoder features."""
        ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


NETWORKS: dict[str, Callable[..., nn.Module]] = {"resnet": ResNetSegmenter, "plain-unet": plain_unet, "residual-unet": residual_unet, "unet": UNet, "uxnet": UXNet, "vnet": VNet}


def register_network(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make a network buildable by name; `factory(in_channels=, out_channels=, **options)` must
    return a module following `Network` (a plugin package calls this when its method is loaded)."""
    NETWORKS[name] = factory


def build_network(name: str, in_channels: int, out_channels: int, **options: Any) -> nn.Module:
    """Build a registered network; options are the factory's keyword arguments (kept in checkpoints)."""
    if name not in NETWORKS:
        raise InputError(f"unknown network '{name}' (choose from: {', '.join(sorted(NETWORKS))})")
    try:
        return NETWORKS[name](in_channels=in_channels, out_channels=out_channels, **options)
    except TypeError as error:
        raise InputError(f"network '{name}': bad option ({error})") from None


# Networks that take a plan's per-axis pooling, and the options that give it to them.
_POOLING_OPTIONS = {"vnet": ("strides",), "resnet": ("strides",), "unet": ("strides",), "uxnet": ("strides",),
                    "residual-unet": ("strides", "kernel_sizes"),
                    "plain-unet": ("strides", "kernel_sizes")}
_TOPOLOGY_OPTIONS = {"strides", "kernel_sizes", "patch_size", "downsamplings"}


def pools_per_axis(name: str, options: dict[str, Any]) -> bool:
    """Whether network `name` with these options can take a plan's per-axis pooling (not when the
    options already fix its topology)."""
    return name in _POOLING_OPTIONS and not _TOPOLOGY_OPTIONS & set(options)


def pooling_options(name: str, strides, kernel_sizes) -> dict[str, Any]:
    """The network options giving `name` a plan's per-axis strides (and kernel sizes, where it takes them)."""
    values = {"strides": [list(s) for s in strides], "kernel_sizes": [list(k) for k in kernel_sizes]}
    return {key: values[key] for key in _POOLING_OPTIONS[name]}


def size_multiple(network: nn.Module) -> int:
    """Patch sides must be multiples of this (2 ** number of downsamplings)."""
    return 2 ** getattr(network, "downsamplings", 4)


def size_multiples(network: nn.Module) -> list[int]:
    """What each (z, y, x) side must be a multiple of: its pooling (with per-axis strides), else size_multiple."""
    return list(getattr(network, "reduction", [size_multiple(network)] * 3))
