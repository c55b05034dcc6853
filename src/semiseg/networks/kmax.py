"""The kMaX decoder (Yu et al., "k-means Mask Transformer", ECCV 2022) for 3D volumes, as DK-UXNet
uses it: N learnable cluster centres (object queries) refined by k-means cross-attention on
backbone features at several scales, then one soft mask and one class distribution per cluster.

Hand-written: neither MONAI nor dynamic-network-architectures has a mask-transformer decoder.

Each layer updates the centres C (N x dim) from the voxel features P of one scale:
  1. k-means cross-attention, A = argmax_N(C P^T) (each voxel belongs to exactly one cluster),
     C_hat = A^T V (the sum of the values of a cluster's voxels); C <- LN(C + W LN(C_hat));
  2. self-attention among the centres; C <- LN(C + MHSA(C));
  3. feed-forward network; C <- LN(C + FFN(C)).
After the last layer: mask logits R = <normalised pixel embedding, mask embedding of each centre>,
masks M = softmax over clusters of R, class logits = MLP(C); the segmentation is
p(k | x) = sum_n M_n(x) softmax(class_n)_k (`aggregate_classes`).

Choices where kMaX-DeepLab differs or is silent for this use:
- Gradient through the argmax: kMaX-DeepLab (and the DK-UXNet code) detach the hard assignment and
  train the assignment heads with an auxiliary mask loss on every layer's prediction. Here the
  forward pass uses the hard one-hot A exactly, and the backward pass uses the softmax over
  clusters (straight-through estimator), so the assignment heads learn from the final loss alone,
  with no per-layer prediction heads or losses.
- Normalisation: LayerNorm on the centres and on voxel tokens (kMaX: BatchNorm over query and pixel
  channels), because 3D batches hold 2-8 volumes; the summed update is LayerNorm-ed, which removes
  its dependence on the cluster's voxel count as kMaX's BatchNorm does.
- Pixel projections are token-wise linear layers (kMaX: 1x1 conv + BN); the final pixel head is a
  linear map of the backbone's embedding followed by L2 normalisation (kMaX: depth-wise 5x5 conv +
  two 1x1 convs + L2 normalisation + BN on the logits); the logit scale is learnt through the mask
  embedding's norm.
- The sums over voxels of the k-means update run in float32 under autocast (fp16 overflows there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def kmeans_cross_attention(centers: torch.Tensor, pixel_keys: torch.Tensor, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster-wise argmax attention: centers (B, N, C), pixel_keys (B, V, C), pixel_values (B, V, Cv)
    -> (update (B, N, Cv) = A^T values, assignment A (B, V, N), one-hot in the forward pass)."""
    with torch.autocast(centers.device.type, enabled=False):
        logits = pixel_keys.float() @ centers.float().transpose(1, 2)  # (B, V, N) = (C P^T)^T
        hard = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
        soft = logits.softmax(-1)
        assignment = hard + (soft - soft.detach())  # exactly `hard` forward, softmax gradient backward
        return assignment.transpose(1, 2) @ pixel_values.float(), assignment


def aggregate_classes(masks: torch.Tensor, class_logits: torch.Tensor) -> torch.Tensor:
    """Log of p(k | x) = sum_n M_n(x) softmax(class_logits_n)_k: masks M (B, N, *spatial) (softmax over
    clusters of the mask logits), class logits (B, N, K) -> (B, K, *spatial); its softmax is p itself.
    Call it in float32: the log of probabilities near 0 needs the range."""
    probabilities = torch.einsum("bn...,bnk->bk...", masks, class_logits.softmax(-1))
    return probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()


class KMeansLayer(nn.Module):
    """One kMaX layer: k-means cross-attention to one scale's voxels, self-attention, FFN."""

    def __init__(self, pixel_width: int, dim: int, heads: int, ffn_dim: int):
        super().__init__()
        self.pixels = nn.Sequential(nn.Linear(pixel_width, dim), nn.LayerNorm(dim), nn.GELU())
        self.pixel_values = nn.Linear(dim, dim)
        self.center_keys = nn.Linear(dim, dim)
        self.update_norm = nn.LayerNorm(dim)
        self.update = nn.Linear(dim, dim)
        self.norm_update = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_attention = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        self.norm_ffn = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        pixels = self.pixels(features.flatten(2).transpose(1, 2))  # (B, V, dim)
        update, _ = kmeans_cross_attention(self.center_keys(centers), F.normalize(pixels, dim=-1), self.pixel_values(pixels))
        centers = self.norm_update(centers + self.update(self.update_norm(update)))
        centers = self.norm_attention(centers + self.attention(centers, centers, centers, need_weights=False)[0])
        return self.norm_ffn(centers + self.ffn(centers))


class KMaXDecoder(nn.Module):
    """Cluster centres refined over `scale_widths` (the channel counts of the feature maps passed to
    `forward`, in that order), `layers_per_scale` layers each, then masks and cluster classes."""

    def __init__(
        self,
        scale_widths: Sequence[int],
        embedding_width: int,
        num_classes: int,
        queries: int = 128,
        dim: int = 256,
        layers_per_scale: int = 2,
        heads: int = 8,
        ffn_dim: int = 2048,
    ):
        super().__init__()
        self.centers = nn.Parameter(nn.init.trunc_normal_(torch.empty(queries, dim), std=1.0))
        self.layers = nn.ModuleList(KMeansLayer(width, dim, heads, ffn_dim) for width in scale_widths for _ in range(layers_per_scale))
        self.layers_per_scale = layers_per_scale
        self.pixel_head = nn.Linear(embedding_width, dim)
        self.mask_embedding = nn.Linear(dim, dim)
        self.classifier = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, num_classes))

    def forward(self, scales: Sequence[torch.Tensor], embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature maps (one per scale width) and the full-resolution pixel embedding ->
        (mask logits (B, N, D, H, W), class logits (B, N, K))."""
        centers = self.centers.expand(embedding.shape[0], -1, -1)
        for index, layer in enumerate(self.layers):
            centers = layer(scales[index // self.layers_per_scale], centers)
        return self._mask_logits(embedding, self.mask_embedding(centers)), self.classifier(centers)

    def _mask_logits(self, embedding: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        """<p(x), k_n> / |p(x)| with p = W e + b the pixel head, computed in the embedding's E
        channels: the dim-channel full-resolution map p is never built (E << dim; same result)."""
        with torch.autocast(embedding.device.type, enabled=False):  # |p|^2 by expansion cancels: keep float32
            weight, bias, kernels = self.pixel_head.weight.float(), self.pixel_head.bias.float(), kernels.float()
            pixels = embedding.float().flatten(2)  # (B, E, V)
            dots = (kernels @ weight) @ pixels + (kernels @ bias)[..., None]  # (B, N, V)
            squared_norms = (pixels * ((weight.T @ weight) @ pixels)).sum(1) + 2 * (bias @ weight) @ pixels + bias @ bias
            mask_logits = dots / squared_norms.clamp_min(1e-24).sqrt()[:, None]  # F.normalize's eps, squared
            return mask_logits.reshape(*kernels.shape[:2], *embedding.shape[2:])
