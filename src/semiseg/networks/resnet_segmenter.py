"""A ResNet-style 3D encoder-decoder: the second subnet of the dual-subnet papers (MCF, and the
dual-subnet contrastive method that follows it), a 3D ResNet-34 encoder under the VNet decoder.

As in MCF's `Resnet34`: a full-resolution stem convolution (7x7x7, `base_filters` channels, BN,
ReLU), then four residual stages of 3, 4, 6 and 3 basic blocks (conv-BN-ReLU-conv-BN plus a
shortcut, a strided 1x1x1 conv + BN where the shape changes), each halving the resolution and
doubling the width, so the five feature widths equal the VNet's; decoded by the UA-MT VNet decoder
(transposed convolutions up, skips added, 3-3-2-1 conv stages). The blocks are MONAI's
`UnetResBlock` with batch norm and ReLU, which is that basic block (dynamic-network-architectures'
`ResidualEncoder` would fit too, but its layers are registered under two names each, which the
safetensors checkpoints refuse). Weights keep the default initialisation, as the project's VNet
does (MCF uses Kaiming-normal). `blocks` sets the blocks per stage (tests use fewer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, UnetResBlock
from torch import nn

from semiseg.networks.vnet import VNet, add_decoder, checked_strides


def _residual_stage(in_channels: int, out_channels: int, blocks: int, stride: tuple[int, int, int]) -> nn.Sequential:
    return nn.Sequential(*(
        UnetResBlock(3, in_channels if index == 0 else out_channels, out_channels, 3, stride if index == 0 else 1,
                     norm_name="batch", act_name=("relu", {"inplace": True}))
        for index in range(blocks)
    ))


class ResNetSegmenter(nn.Module):
    """3D ResNet-34 encoder + VNet decoder; `encode`/`decode` as every network here; `strides` as the VNet's."""

    downsamplings = 4

    def __init__(self, in_channels: int = 1, out_channels: int = 2, base_filters: int = 16, dropout: bool = False,
                 blocks: Sequence[int] = (3, 4, 6, 3), strides: list[list[int]] | None = None):
        super().__init__()
        self.strides = checked_strides(strides)
        widths = [base_filters * 2**level for level in range(5)]
        self.encoder_widths = widths
        self.embedding_width = widths[0]
        self.stem = Convolution(3, in_channels, widths[0], kernel_size=7, act=("relu", {"inplace": True}), norm="batch", bias=False)
        self.residual_stages = nn.ModuleList(
            _residual_stage(widths[level], widths[level + 1], count, self.strides[level]) for level, count in enumerate(blocks)
        )
        add_decoder(self, widths, out_channels, dropout, self.strides)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features from shallow (full resolution, the stem) to deep (1/16)."""
        features = [self.stem(x)]
        for stage in self.residual_stages:
            features.append(stage(features[-1]))
        return features

    # The VNet's decoder, reused as is: it reads only `up`, `decoder`, `dropout` and `head`.
    decode = VNet.decode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
