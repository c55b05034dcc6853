"""nnU-Net's 3D U-Nets (dynamic-network-architectures) behind the project's network protocol.

3D-CPS (Huang et al., FLARE 2022) doubles the U-Net that nnU-Net's heuristics configure: a
residual-block encoder and decoder in the paper's text ("residual-unet"), nnU-Net's plain U-Net in
the authors' released code ("plain-unet"). Both come from dynamic-network-architectures; this module
only chooses their topology the way nnU-Net does and exposes `encode` / `decode` plus the
deep-supervision outputs nnU-Net trains with.

Topology. Each stage doubles the features of the one above, from `base_filters` (nnU-Net: 32) up to
`max_filters` (nnU-Net 3D: 320). With `patch_size` given, the pooling per stage follows nnU-Net's
rule for that patch: halve every axis that stays at least 8 voxels (feature maps of at least 4), one
axis alone only if it stays at least 12; the paper's 112x160x128 patch gives its 6-stage network
(bottleneck 7x5x4). nnU-Net also refuses to pool an axis whose spacing is over twice the finest;
that part is left out because the project resamples every scan to one grid and the network does not
see spacings. Without `patch_size`, `downsamplings` stride-2 poolings on every axis (default 4,
patch sides multiples of 16, as for the project's other networks), or, for anisotropic data, the
plan's per-axis `strides` and `kernel_sizes` (nnU-Net's spacing rule, `semiseg.preprocessing.pooling_schedule`).

Choices where the paper is silent or differs from nnU-Net:
- residual-unet: two residual blocks per encoder stage, the first one strided ("each encoder contains
  two residual blocks, where the first residual block performs the downsampling task"), and, as the
  paper's "residual decoder blocks" / "the decoder has a similar structure to the encoder", two
  residual blocks per decoder stage (DNA's `ResidualUNet`); `residual_decoder=false` gives nnU-Net's
  `ResidualEncoderUNet` (plain conv decoder, two convs per stage). Blocks are conv-instnorm-ReLU as
  the paper says (nnU-Net uses LeakyReLU). DNA's stem convolution before the first stage is kept.
- The paper's Table 2 reports 30.79M parameters; nnU-Net's plain 6-stage U-Net for 14 classes has
  exactly 30,795,654, the residual design above about 57M: the reported numbers most likely come from
  the plain backbone (as in the authors' code), which `plain-unet` reproduces (LeakyReLU 0.01,
  instance norm, two convs per stage, nnU-Net v1's Generic_UNet layout).
- Initialisation is nnU-Net's "he" normal (the paper's Table 2), plus DNA's zero-init of the last
  norm of each residual block for the residual network.
"""

from __future__ import annotations

import math

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet, ResidualUNet
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
from dynamic_network_architectures.initialization.weight_init import InitWeights_He, init_last_bn_before_add_to_0
from torch import nn

from semiseg.errors import InputError

MIN_FEATURE_MAP = 4  # nnU-Net's smallest bottleneck side


def nnunet_strides(patch_size: list[int] | tuple[int, ...]) -> list[list[int]]:
    """nnU-Net's pooling per downsampling for a patch on an isotropic grid (one [z, y, x] per stage)."""
    size, strides = [int(s) for s in patch_size], []
    while True:
        axes = [a for a, s in enumerate(size) if s >= 2 * MIN_FEATURE_MAP]
        if len(axes) == 1 and size[axes[0]] < 3 * MIN_FEATURE_MAP:
            axes = []
        if not axes:
            return strides
        strides.append([2 if a in axes else 1 for a in range(len(size))])
        size = [math.ceil(s / 2) if a in axes else s for a, s in enumerate(size)]


def _strides(downsamplings: int | None, patch_size: list[int] | None, strides: list[list[int]] | None = None) -> list[list[int]]:
    if sum(option is not None for option in (downsamplings, patch_size, strides)) > 1:
        raise InputError("network options: give one of patch_size (nnU-Net's pooling rule), strides or downsamplings")
    if strides is not None:
        return [[int(v) for v in stage] for stage in strides]
    if patch_size is None:
        return [[2, 2, 2]] * (4 if downsamplings is None else int(downsamplings))
    if len(patch_size) != 3:
        raise InputError(f"network option patch_size {patch_size}: give three sides (z y x)")
    return nnunet_strides(patch_size)


class NnUNet(nn.Module):
    """A DNA U-Net as a project network: `encode`, `decode`, and `deep_supervision_logits`."""

    def __init__(self, network: PlainConvUNet | ResidualEncoderUNet | ResidualUNet, strides: list[list[int]]):
        super().__init__()
        # DNA's conv blocks register each layer twice (by name and in `all_modules`, which their
        # forward uses) and its decoder holds the encoder: keep one path to every tensor, since
        # safetensors refuses shared ones.
        for block in network.modules():
            if isinstance(block, ConvDropoutNormReLU):
                for alias in ("conv", "dropout", "norm", "nonlin"):
                    block._modules.pop(alias, None)
        self.encoder = network.encoder
        self.upsample = network.decoder.transpconvs
        self.decoder_stages = network.decoder.stages
        self.heads = network.decoder.seg_layers  # one per decoder stage, deepest first
        self.reduction = [math.prod(s[a] for s in strides) for a in range(3)]
        self.downsamplings = min(int(math.log2(r)) for r in self.reduction)
        self.encoder_widths = list(network.encoder.output_channels)
        self.embedding_width = self.encoder_widths[0]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage outputs from full resolution to the bottleneck."""
        if any(side % r for side, r in zip(x.shape[2:], self.reduction)):
            raise InputError(f"input {tuple(x.shape[2:])}: sides must be multiples of {self.reduction} for this network "
                             "(pass the patch_size network option as --patch-size too)")
        return self.encoder(x)

    def _decoder_maps(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        x, maps = features[-1], []
        for up, stage, skip in zip(self.upsample, self.decoder_stages, reversed(features[:-1])):
            x = stage(torch.cat((up(x), skip), 1))
            maps.append(x)
        return maps

    def decode(self, features: list[torch.Tensor], return_embedding: bool = False):
        x = self._decoder_maps(features)[-1]
        logits = self.heads[-1](x)
        return (logits, x) if return_embedding else logits

    def deep_supervision_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits at every decoder resolution, full resolution first (nnU-Net's order)."""
        maps = self._decoder_maps(self.encode(x))
        return [head(m) for head, m in zip(self.heads, maps)][::-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def _common(in_channels: int, out_channels: int, base_filters: int, max_filters: int, strides: list[list[int]],
            kernel_sizes: list[list[int]] | None) -> dict:
    stages = len(strides) + 1
    if kernel_sizes is not None and len(kernel_sizes) != stages:
        raise InputError(f"network option kernel_sizes: give one [z, y, x] per stage ({stages}), got {len(kernel_sizes)}")
    return dict(
        input_channels=in_channels, n_stages=stages, num_classes=out_channels, conv_op=nn.Conv3d,
        kernel_sizes=3 if kernel_sizes is None else [[int(v) for v in k] for k in kernel_sizes],
        features_per_stage=[min(base_filters * 2**i, max_filters) for i in range(stages)], strides=[[1, 1, 1], *strides],
        conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
    )


def residual_unet(
    in_channels: int = 1,
    out_channels: int = 2,
    base_filters: int = 32,
    max_filters: int = 320,
    downsamplings: int | None = None,
    patch_size: list[int] | None = None,
    strides: list[list[int]] | None = None,
    kernel_sizes: list[list[int]] | None = None,
    blocks_per_stage: int = 2,
    residual_decoder: bool = True,
) -> NnUNet:
    """The 3D-CPS paper's residual U-Net (see the module docstring for every choice)."""
    strides = _strides(downsamplings, patch_size, strides)
    cls = ResidualUNet if residual_decoder else ResidualEncoderUNet
    network = cls(**_common(in_channels, out_channels, base_filters, max_filters, strides, kernel_sizes), n_blocks_per_stage=blocks_per_stage,
                  n_conv_per_stage_decoder=blocks_per_stage, nonlin=nn.ReLU, nonlin_kwargs={"inplace": True})
    network.apply(InitWeights_He(1e-2))
    network.apply(init_last_bn_before_add_to_0)
    return NnUNet(network, strides)


def plain_unet(
    in_channels: int = 1,
    out_channels: int = 2,
    base_filters: int = 32,
    max_filters: int = 320,
    downsamplings: int | None = None,
    patch_size: list[int] | None = None,
    strides: list[list[int]] | None = None,
    kernel_sizes: list[list[int]] | None = None,
    convs_per_stage: int = 2,
) -> NnUNet:
    """nnU-Net's plain 3D U-Net, the backbone of the 3D-CPS authors' code."""
    strides = _strides(downsamplings, patch_size, strides)
    network = PlainConvUNet(**_common(in_channels, out_channels, base_filters, max_filters, strides, kernel_sizes), n_conv_per_stage=convs_per_stage,
                            n_conv_per_stage_decoder=convs_per_stage, nonlin=nn.LeakyReLU, nonlin_kwargs={"negative_slope": 1e-2, "inplace": True})
    network.apply(InitWeights_He(1e-2))
    return NnUNet(network, strides)
