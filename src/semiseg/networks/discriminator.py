"""Voxel-wise feature discriminator (Lee, Park, Shin & Chung, voxel-wise adversarial semi-supervised
learning, Fig. 3a), and the multi-resolution voxel features it and the voxel-wise feature layer read.

Multi-resolution context: encoder features from several depths are brought to one width by 1x1x1
convolutions, upsampled (trilinear) to the input resolution, added, and passed through one more
1x1x1 convolution; features of single voxels are then taken from that map. The 1x1x1 convolutions
are per-voxel linear maps and trilinear upsampling is a per-channel weighted average (weights
summing to one), so they commute: the features at sampled voxels are computed exactly by
interpolating each level at those voxels only and applying the convolutions there as linear
layers. Same values, without a full-resolution map per level (gigabytes at the papers' patch
sizes). The fusion convolution is 1x1x1 for the same reason (the paper gives no kernel size).
Hand-written: no library offers voxel-sampled multi-level fusion or a class-conditional
discriminator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def sample_at_voxels(feature: torch.Tensor, points: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Values of a (B, C, d, h, w) map, upsampled trilinearly (align_corners=False) to `size`, at
    (N, 4) integer voxels (batch, z, y, x) of that size: (N, C)."""
    # float32 throughout: bfloat16 coordinates would be off by up to 0.2 voxel across a 100-voxel side.
    scale = torch.tensor(list(size), dtype=torch.float32, device=feature.device)
    centres = (2.0 * points[:, 1:].float() + 1.0) / scale - 1.0  # voxel centres in [-1, 1]
    grid = centres.flip(-1).view(1, 1, 1, -1, 3).expand(feature.shape[0], -1, -1, -1, -1)  # grid_sample wants (x, y, z)
    values = F.grid_sample(feature.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[:, :, 0, 0]
    return values[points[:, 0], :, torch.arange(len(points), device=points.device)]


class MultiResolutionVoxelFeatures(nn.Module):
    """Fused multi-level features at sampled voxels: per-level 1x1x1 conv to `width`, upsample, add,
    1x1x1 conv + ReLU."""

    def __init__(self, widths: Sequence[int], width: int = 64):
        super().__init__()
        self.levels = nn.ModuleList(nn.Linear(w, width) for w in widths)
        self.fuse = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True))

    def forward(self, features: Sequence[torch.Tensor], points: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        summed = sum(level(sample_at_voxels(f, points, size)) for level, f in zip(self.levels, features))
        return self.fuse(summed)


class VoxelDiscriminator(nn.Module):
    """Real (labeled) vs fake (unlabeled) logit of each sampled voxel feature, from the prediction
    head of its class: fused multi-resolution features -> two MLP layers -> per-class heads."""

    def __init__(self, widths: Sequence[int], num_classes: int, width: int = 64):
        super().__init__()
        self.features = MultiResolutionVoxelFeatures(widths, width)
        # LeakyReLU as in the GAN discriminators of Kurach et al., whose training setup the paper follows.
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.LeakyReLU(0.2), nn.Linear(width, width), nn.LeakyReLU(0.2))
        self.heads = nn.Linear(width, num_classes)  # output c is class c's own head (its own weights)

    def forward(self, features: Sequence[torch.Tensor], points: torch.Tensor, classes: torch.Tensor,
                size: Sequence[int]) -> torch.Tensor:
        logits = self.heads(self.mlp(self.features(features, points, size)))
        return logits.gather(1, classes[:, None])[:, 0]
