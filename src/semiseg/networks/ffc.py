"""SSCL's spectral encoder: five Fast Fourier Convolution blocks with the VNet's downsampling.

Each block is the Fourier unit of FFC (Chi et al., NeurIPS 2020) as SSCL's Fig. 3(b) describes it:
3D FFT -> real and imaginary parts concatenated -> 1x1x1 convolution -> activation and batch norm
-> split -> inverse 3D FFT. Hand-written because neither MONAI nor dynamic-network-architectures
has a 3D Fourier unit.

Choices:
- FFT as in the FFC reference code: a real FFT (`rfftn`) with orthonormal scaling, the inverse given
  the input's sizes so odd sides come back exact; the 1x1x1 convolution has no bias (FFC's).
- Activation then batch norm, in the order SSCL's text gives (FFC itself uses norm then ReLU).
- The spectral path runs in float32 even under autocast: cuFFT in half precision needs power-of-two
  sides, and the spectrum's dynamic range is wide.
- A block is the Fourier unit alone (SSCL describes no local branch or residual around it); the
  spatial encoder it is added to is the local path.
"""

from __future__ import annotations

import torch
from torch import nn

from semiseg.networks.vnet import _resize

SPATIAL_DIMS = (-3, -2, -1)


class FourierUnit(nn.Module):
    """A global (whole-patch) convolution done as a 1x1x1 convolution on the spectrum."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(2 * in_channels, 2 * out_channels, 1, bias=False)
        self.activation = nn.ReLU(inplace=True)
        self.norm = nn.BatchNorm3d(2 * out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            spectrum = torch.fft.rfftn(x, dim=SPATIAL_DIMS, norm="ortho")
            mixed = self.norm(self.activation(self.conv(torch.cat((spectrum.real, spectrum.imag), 1))))
            real, imaginary = mixed.chunk(2, dim=1)
            return torch.fft.irfftn(torch.complex(real, imaginary), s=x.shape[-3:], dim=SPATIAL_DIMS, norm="ortho")


class SpectralEncoder(nn.Module):
    """One Fourier unit per level of `widths`, strided convolutions (the VNet's, `strides` as the
    spatial encoder's) between levels; returns the deepest features, shaped like the spatial encoder's last ones."""

    def __init__(self, in_channels: int, widths: list[int], strides: list[tuple[int, int, int]] | None = None):
        super().__init__()
        strides = strides or [(2, 2, 2)] * (len(widths) - 1)
        self.blocks = nn.ModuleList(FourierUnit(in_channels if level == 0 else width, width) for level, width in enumerate(widths))
        self.down = nn.ModuleList(_resize(widths[level], widths[level + 1], False, strides[level]) for level in range(len(widths) - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks[0](x)
        for down, block in zip(self.down, self.blocks[1:]):
            x = block(down(x))
        return x
