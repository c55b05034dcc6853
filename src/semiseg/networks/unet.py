"""MONAI's BasicUNet with its encoder and decoder exposed for methods that work on features."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import UpSample
from monai.networks.nets import BasicUNet
from torch import nn

from semiseg.networks.vnet import checked_strides


class UNet(BasicUNet):
    """3D U-Net (two convs per level, four poolings); `features` = five encoder widths + the last decoder width.
    `strides`: the (z, y, x) stride of each pooling (the plan's per-axis pooling; default 2 on every axis),
    undone by the matching transposed convolution."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (16, 32, 64, 128, 256, 32),
        dropout: float = 0.0,
        strides: list[list[int]] | None = None,
    ):
        super().__init__(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            features=tuple(features),
            norm=("batch", {"affine": True}),
            dropout=dropout,
        )
        self.encoder_widths = list(features[:5])
        self.embedding_width = features[5]
        self.strides = checked_strides(strides)
        self.reduction = [math.prod(s[axis] for s in self.strides) for axis in range(3)]
        self.downsamplings = min(int(math.log2(r)) for r in self.reduction)
        if strides is not None:
            # BasicUNet pools and upsamples by 2 on every axis; MONAI has no option for per-axis factors.
            downs, upcats = (self.down_1, self.down_2, self.down_3, self.down_4), (self.upcat_1, self.upcat_2, self.upcat_3, self.upcat_4)
            for down, upcat, stride in zip(downs, upcats, self.strides):
                down.max_pooling = nn.MaxPool3d(kernel_size=stride, stride=stride)
                deconv = upcat.upsample.deconv
                upcat.upsample = UpSample(3, deconv.in_channels, deconv.out_channels, scale_factor=stride, mode="deconv")

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [self.conv_0(x)]
        for down in (self.down_1, self.down_2, self.down_3, self.down_4):
            features.append(down(features[-1]))
        return features

    def decode(self, features: list[torch.Tensor], return_embedding: bool = False):
        x = features[-1]
        for upcat, skip in zip((self.upcat_4, self.upcat_3, self.upcat_2, self.upcat_1), reversed(features[:-1])):
            x = upcat(x, skip)
        logits = self.final_conv(x)
        return (logits, x) if return_embedding else logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
