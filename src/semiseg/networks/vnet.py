"""The VNet behind the semi-supervised papers' published LA numbers (the UA-MT code's VNet).

Written here because MONAI's `VNet` is the original 5x5x5/ELU design, a different and much slower
network: this one is 3x3x3 conv-BN-ReLU stages, stride-2 convolutions down, transposed
convolutions up, and skips joined by addition.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from semiseg.errors import InputError


def _conv_stage(stages: int, in_channels: int, out_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index in range(stages):
        layers += [
            nn.Conv3d(in_channels if index == 0 else out_channels, out_channels, 3, padding=1),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def _resize(in_channels: int, out_channels: int, up: bool, stride: int | tuple[int, int, int] = 2) -> nn.Sequential:
    conv = nn.ConvTranspose3d if up else nn.Conv3d
    return nn.Sequential(conv(in_channels, out_channels, stride, stride=stride), nn.BatchNorm3d(out_channels), nn.ReLU(inplace=True))


def checked_strides(strides: list[list[int]] | None) -> list[tuple[int, int, int]]:
    """Four (z, y, x) downsampling strides of 1 or 2 (default: 2 on every axis)."""
    if strides is None:
        return [(2, 2, 2)] * 4
    if len(strides) != 4 or any(len(s) != 3 or not set(s) <= {1, 2} for s in strides):
        raise InputError(f"network option strides {strides}: give four [z, y, x] strides of 1 or 2")
    return [tuple(int(v) for v in s) for s in strides]  # type: ignore[misc]


def add_decoder(network: nn.Module, widths: list[int], out_channels: int, dropout: bool,
                strides: list[tuple[int, int, int]] | None = None) -> None:
    """Give network the VNet decoder (`up`, `decoder`, `dropout`, `head`, the names VNet.decode reads);
    `strides`: the encoder's (z, y, x) stride of each downsampling, undone in reverse (default 2)."""
    strides = strides or [(2, 2, 2)] * 4
    network.up = nn.ModuleList(_resize(widths[level + 1], widths[level], True, tuple(strides[level])) for level in reversed(range(4)))
    network.decoder = nn.ModuleList(
        _conv_stage(stages, widths[level], widths[level]) for level, stages in zip(reversed(range(4)), (3, 3, 2, 1))
    )
    network.dropout = nn.Dropout3d(0.5) if dropout else nn.Identity()
    network.head = nn.Conv3d(widths[0], out_channels, 1)


class VNet(nn.Module):
    """Five-level VNet; `encode` and `decode` are exposed so methods can work on features.

    `strides`: the (z, y, x) stride of each of the four downsamplings (the plan's per-axis pooling
    for anisotropic data, e.g. [[1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]); default 2 on every axis."""

    downsamplings = 4

    def __init__(self, in_channels: int = 1, out_channels: int = 2, base_filters: int = 16, dropout: bool = False,
                 strides: list[list[int]] | None = None):
        super().__init__()
        strides = checked_strides(strides)
        self.strides = strides
        self.reduction = [math.prod(s[axis] for s in strides) for axis in range(3)]
        self.downsamplings = min(int(math.log2(r)) for r in self.reduction)
        widths = [base_filters * 2**level for level in range(5)]
        encoder_stages = [1, 2, 3, 3, 3]
        self.encoder_widths = widths
        self.embedding_width = widths[0]
        self.encoder = nn.ModuleList(
            _conv_stage(stages, in_channels if level == 0 else widths[level], widths[level])
            for level, stages in enumerate(encoder_stages)
        )
        self.down = nn.ModuleList(_resize(widths[level], widths[level + 1], False, strides[level]) for level in range(4))
        add_decoder(self, widths, out_channels, dropout, strides)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features from shallow (full resolution) to deep (1/16)."""
        features = [self.encoder[0](x)]
        for level in range(4):
            features.append(self.encoder[level + 1](self.down[level](features[-1])))
        features[-1] = self.dropout(features[-1])
        return features

    def decode(self, features: list[torch.Tensor], return_embedding: bool = False):
        """Logits from encoder features; with `return_embedding`, also the last decoder feature map."""
        x = features[-1]
        for up, stage, skip in zip(self.up, self.decoder, reversed(features[:-1])):
            x = stage(up(x) + skip)
        logits = self.head(self.dropout(x))
        return (logits, x) if return_embedding else logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
