"""MONAI's BasicUNet with its encoder and decoder exposed for methods that work on features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import BasicUNet


class UNet(BasicUNet):
    """3D U-Net (two convs per level, four poolings); `features` = five encoder widths + the last decoder width."""

    downsamplings = 4

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (16, 32, 64, 128, 256, 32),
        dropout: float = 0.0,
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
