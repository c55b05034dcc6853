"""3D UX-Net (Lee et al., ICLR 2023): a ConvNeXt-style volumetric encoder and a CNN decoder.

Hand-written because neither MONAI nor dynamic-network-architectures has a UX-Net (or any 3D
ConvNeXt) encoder; the decoder's residual conv blocks are MONAI's UNETR blocks, as in the
authors' code. The layout follows the paper and its released code:

- encoder: a 7x7x7 stride-2 stem and three LayerNorm + 2x2x2 stride-2 downsamplings (four
  downsamplings in all), each followed by `depths[i]` UX blocks: a 7x7x7 depth-wise convolution,
  LayerNorm, the MLP as two point-wise convolutions grouped per channel (UX-Net's "depth-wise
  convolution scaling", 4x expansion, GELU) and a layer scale (1e-6), added residually;
- skips: a residual 3x3x3 block on the image (full resolution) and on each stage's normalised
  output, widening them to base, 2, 4, 8, 16 x base (UX-Net: 48 ... 768);
- decoder: transposed-convolution up-blocks joined to the skips by concatenation, a last residual
  block (the embedding) and a 1x1x1 head.

`base_filters` is the paper's feature size (48); 8 trains on a CPU. Instance normalisation in the
conv blocks, as in the paper's code. Inputs whose sides are not multiples of 16 (of each axis's
pooling, with per-axis `strides`) are zero-padded at the far end and the logits cropped back
(`forward` only: `encode`/`decode` take such multiples).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetOutBlock
from monai.networks.blocks.unetr_block import UnetrBasicBlock, UnetrUpBlock
from torch import nn

from semiseg.networks.vnet import checked_strides


def pad_to_multiple(x: torch.Tensor, multiples: Sequence[int]) -> torch.Tensor:
    """Zero-pad the far end of each spatial side of (B, C, D, H, W) up to a multiple of its (z, y, x) entry."""
    padding: list[int] = []
    for size, multiple in zip(reversed(x.shape[2:]), reversed(multiples)):
        padding += [0, -size % multiple]
    return F.pad(x, padding) if any(padding) else x


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, D, H, W) map (ConvNeXt's channels-first LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous: a channels-last result makes the next depth-wise convolution's CPU backward ~30x slower;
        # axis 4, not -1: torch's ONNX exporter writes a negative axis into an invalid Transpose
        return super().forward(x.movedim(1, 4)).movedim(4, 1).contiguous()


class UXBlock(nn.Module):
    def __init__(self, width: int, kernel_size: int = 7, layer_scale: float = 1e-6):
        super().__init__()
        self.depthwise = nn.Conv3d(width, width, kernel_size, padding=kernel_size // 2, groups=width)
        self.norm = ChannelLayerNorm(width, eps=1e-6)
        self.expand = nn.Conv3d(width, 4 * width, 1, groups=width)
        self.project = nn.Conv3d(4 * width, width, 1, groups=width)
        self.scale = nn.Parameter(torch.full((width, 1, 1, 1), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.project(F.gelu(self.expand(self.norm(self.depthwise(x)))))


class UXNet(nn.Module):
    """3D UX-Net; `encode` gives five features (full resolution to 1/16), `decode` the logits.
    `strides`: the (z, y, x) stride of the stem and of each downsampling (the plan's per-axis pooling;
    default 2 on every axis), undone by the up-blocks' transposed convolutions."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        base_filters: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        kernel_size: int = 7,
        strides: list[list[int]] | None = None,
    ):
        super().__init__()
        self.strides = checked_strides(strides)
        self.reduction = [math.prod(s[axis] for s in self.strides) for axis in range(3)]
        self.downsamplings = min(int(math.log2(r)) for r in self.reduction)
        widths = [base_filters * 2**level for level in range(5)]  # stages use the first four
        self.encoder_widths = widths
        self.embedding_width = base_filters
        stem = nn.Sequential(nn.Conv3d(in_channels, widths[0], 7, stride=self.strides[0], padding=3), ChannelLayerNorm(widths[0], eps=1e-6))
        self.downsample = nn.ModuleList([stem] + [
            nn.Sequential(ChannelLayerNorm(widths[i], eps=1e-6), nn.Conv3d(widths[i], widths[i + 1], self.strides[i + 1], stride=self.strides[i + 1]))
            for i in range(3)])
        self.stages = nn.ModuleList(nn.Sequential(*(UXBlock(widths[i], kernel_size) for _ in range(depths[i]))) for i in range(4))
        self.stage_norms = nn.ModuleList(ChannelLayerNorm(widths[i], eps=1e-6) for i in range(4))

        def basic(cin: int, cout: int) -> UnetrBasicBlock:
            return UnetrBasicBlock(3, cin, cout, kernel_size=3, stride=1, norm_name="instance", res_block=True)

        def up(cin: int, cout: int, stride: Sequence[int]) -> UnetrUpBlock:
            return UnetrUpBlock(3, cin, cout, kernel_size=3, upsample_kernel_size=stride, norm_name="instance", res_block=True)

        # skips[0] sees the image, skips[i] the output of stage i - 1 (widened from widths[i - 1] to widths[i])
        self.skips = nn.ModuleList([basic(in_channels, widths[0])] + [basic(widths[i], widths[i + 1]) for i in range(4)])
        self.up = nn.ModuleList(up(widths[level + 1], widths[level], self.strides[level]) for level in reversed(range(4)))
        self.last = basic(base_filters, base_filters)
        self.head = UnetOutBlock(3, base_filters, out_channels)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Skip features from shallow (full resolution, base_filters) to deep (1/16, 16 x base_filters)."""
        features = [self.skips[0](x)]
        hidden = x
        for level in range(4):
            hidden = self.stages[level](self.downsample[level](hidden))
            features.append(self.skips[level + 1](self.stage_norms[level](hidden)))
        return features

    def decode(self, features: list[torch.Tensor], return_embedding: bool = False):
        """Logits from encoder features; with `return_embedding`, also the last decoder feature map."""
        x = features[-1]
        for up, skip in zip(self.up, reversed(features[:-1])):
            x = up(x, skip)
        embedding = self.last(x)
        logits = self.head(embedding)
        return (logits, embedding) if return_embedding else logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        depth, height, width = x.shape[2:]
        return self.decode(self.encode(pad_to_multiple(x, self.reduction)))[..., :depth, :height, :width]
