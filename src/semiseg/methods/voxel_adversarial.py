"""Voxel-wise adversarial semi-supervised learning (Lee, Park, Shin & Chung). No code was released;
the paper is the specification.

A Mean Teacher VNet (EMA teacher) trained with L = alpha L_adv + beta L_feature + gamma(t) L_c + L_dice:
- L_adv (Sec. III-A, Eq. 2): a voxel-wise feature discriminator (networks/discriminator.py) reads
  encoder features from several depths, fused at full resolution, at sampled voxels; one head per
  class, chosen by the ground truth on labeled patches and by the teacher's pseudo-label
  argmax(p) where max(p) > t = 0.7 on unlabeled ones (Eq. 1). Labeled voxels are real, unlabeled
  fake. The discriminator has its own Adam optimizer (lr 2e-4, betas 0.5/0.999, following Kurach
  et al.) and learns on detached features; the segmentation encoder is the generator, trained to
  make unlabeled voxels look real with the discriminator's parameters frozen for that term, so
  the one backward pass of the summed losses keeps the two apart.
- L_feature (Sec. III-B, Eq. 3): BYOL on voxels of the labeled patches. Multi-resolution features
  are upsampled to the voxels (not the masks downsampled), class-specific voxels are sampled by the
  ground truth; the student's feature layer + projection + prediction and the teacher's (EMA)
  feature layer + projection give p(z_s) and z_t; the loss is the MSE of their l2-normalised
  vectors. All hidden widths 64.
- L_c (Eq. 5): MSE between student and teacher softmax on the unlabeled patches, with the Gaussian
  warm-up gamma(t) = 0.001 exp(-5 (1 - t/t_max)^2) as printed: that is a proper ramp-up (from
  0.001 e^-5 to 0.001 at the end; base.sigmoid_rampup with length 1).
- L_dice on the labeled patches.

Choices where the paper is silent, and deviations:
- L_dice is the project's Dice + cross-entropy (`supervised_loss`), as in every method here, so
  runs compare on the same supervised term (the paper's Eq. 4 is Dice only; the UA-MT and SASSNet
  code it builds on also add cross-entropy).
- Mean Teacher details as this project's `mean-teacher` (UA-MT's code): EMA decay 0.99 with warm
  start, teacher input noise N(0, 0.1) clipped to +-0.2, L_c on the unlabeled patches. One
  teacher pass over labeled + unlabeled patches gives the BYOL targets and the pseudo-labels too.
- Feature levels: the first four encoder levels (full resolution to 1/8), the paper's
  E(x^1)..E(x^4); the discriminator's width is 64 like the feature layer's.
- Sampling: `voxels_per_class` = 256 random voxels of each class present (fewer if the class has
  fewer), for both the discriminator and L_feature, so classes weigh equally.
- BYOL pairs: each sampled student voxel is paired with a teacher voxel of the same class drawn
  from the same sample (a within-class shuffle): the loss relates voxels of one class, "feature
  relations from the same class"; not symmetrised (the teacher sees the same patches).
- Adversarial losses are binary cross-entropy on logits: the discriminator's is Eq. 2's; the
  generator's is the non-saturating form -log D(f_u) on unlabeled voxels (Goodfellow et al.,
  Kurach et al.) rather than minimising log(1 - D(f_u)), which gives no gradient once D wins.
- The discriminator's learning rate is constant and it has no weight decay (GAN practice, Kurach
  et al.); the paper's /10 every 2500 iterations is stated for the segmentation SGD, which here
  follows the run's (poly) schedule. Discriminator layers: LeakyReLU(0.2), no normalisation.
- The BYOL projection and prediction MLPs are BYOL's Linear-BN-ReLU-Linear, all widths 64.
- Predictors: student and teacher, as the project's `mean-teacher` (the paper infers with "the
  VNet" alone; the pair gives a disagreement map at no training cost).
`--preset paper` (semiseg.presets) sets Sec. IV-B literally: Dice alone on the labeled patches
(Eq. 4, UA-MT's squared-denominator Dice), SGD (momentum 0.9, weight decay 1e-4, no Nesterov),
lr 0.01 divided by 10 every 2500 iterations for 6000 iterations, the student alone at inference
("only the VNet"), fp32; from the UA-MT code it builds on, the VNet with Dropout3d(0.5) and the
crop + rotation/flip augmentation.
Ablation (Table IV): `use_adversarial`, `use_feature`, `use_consistency` switch each term off;
switched-off parts are not built (no discriminator, no feature layers) and not logged.
Ignore label: supported (the supervised loss leaves ignored voxels out, and the discriminator's
and BYOL's real voxels are drawn per class, never from ignored voxels).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semiseg.methods.base import Batch, OptimizerSpec, StepInfo, ema_update, sigmoid_rampup
from semiseg.methods.mean_teacher import MeanTeacher
from semiseg.networks.discriminator import MultiResolutionVoxelFeatures, VoxelDiscriminator


def _byol_mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True), nn.Linear(width, width))


class VoxelProjector(nn.Module):
    """The voxel-wise feature layer (Fig. 3b): multi-resolution features at sampled voxels, then BYOL's projection."""

    def __init__(self, widths: list[int], width: int):
        super().__init__()
        self.features = MultiResolutionVoxelFeatures(widths, width)
        self.projection = _byol_mlp(width)

    def forward(self, features: list[torch.Tensor], points: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return self.projection(self.features(features, points, size))


class VoxelAdversarial(MeanTeacher):
    name = "voxel-adversarial"
    summary = ("Mean Teacher + voxel-wise feature discriminator (labeled real, unlabeled fake, per class) "
               "+ BYOL voxel representation learning.")
    handles_ignore_label = True
    defaults = {
        # gamma(t) is the paper's per-iteration ramp: the UA-MT code's epoch ramp does not apply.
        **{key: value for key, value in MeanTeacher.defaults.items() if key != "rampup_epochs"},
        "consistency": 0.001,  # gamma's scale (paper)
        "rampup": 1.0,  # gamma(t) = 0.001 exp(-5 (1 - t/t_max)^2): the warm-up spans the run
        "alpha": 0.01,  # L_adv weight (paper)
        "beta": 0.1,  # L_feature weight (paper, left atrium; 100 on their multi-organ data)
        "pseudo_threshold": 0.7,  # t in Eq. 1 (paper)
        "feature_width": 64,  # hidden widths of the feature layer and discriminator (paper: 64)
        "feature_levels": [0, 1, 2, 3],
        "voxels_per_class": 256,
        "discriminator_lr": 2e-4,  # paper
        "discriminator_betas": [0.5, 0.999],  # paper
        "use_adversarial": True,
        "use_feature": True,
        "use_consistency": True,
    }

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        widths = [self.networks["student"].encoder_widths[level] for level in self.options["feature_levels"]]
        width = self.options["feature_width"]
        if self.options["use_adversarial"]:
            self.networks["discriminator"] = VoxelDiscriminator(widths, self.num_classes, width)
        if self.options["use_feature"]:
            self.networks["projector"] = VoxelProjector(widths, width)
            self.networks["predictor"] = _byol_mlp(width)
            self.networks["projector_teacher"] = copy.deepcopy(self.networks["projector"]).requires_grad_(False)

    def frozen_networks(self) -> set[str]:
        return {"teacher", "projector_teacher"} & set(self.networks)

    def optimizers(self) -> dict[str, OptimizerSpec]:
        main = [n for n in self.networks if n not in self.frozen_networks() and n != "discriminator"]
        specs = {"main": OptimizerSpec(networks=main)}
        if "discriminator" in self.networks:
            specs["discriminator"] = OptimizerSpec(
                networks=["discriminator"], kind="adam", lr=self.options["discriminator_lr"], weight_decay=0.0,
                betas=tuple(self.options["discriminator_betas"]), schedule="constant",
            )
        return specs

    def consistency_weight(self, progress: float) -> float:
        """gamma(t) = 0.001 exp(-5 (1 - t/t_max)^2) with the defaults."""
        return self.options["consistency"] * sigmoid_rampup(progress, self.options["rampup"])

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: StepInfo) -> dict[str, torch.Tensor]:
        assert unlabeled is not None
        n_labeled = labeled["image"].shape[0]
        images = torch.cat([labeled["image"], unlabeled["image"]])
        size = images.shape[2:]
        student = self.networks["student"]
        features = student.encode(images)
        logits = student.decode(features)
        noise = (torch.randn_like(images) * self.options["noise"]).clamp(-2 * self.options["noise"], 2 * self.options["noise"])
        with torch.no_grad():
            teacher_features = self.networks["teacher"].encode(images + noise)
            teacher_probs = torch.softmax(self.networks["teacher"].decode(teacher_features).float(), dim=1)

        losses = {"supervised": self.supervised_loss(logits[:n_labeled], labeled["label"])}
        if self.options["use_consistency"]:
            student_probs = torch.softmax(logits[n_labeled:].float(), dim=1)
            losses["consistency"] = self.consistency_weight(step.progress) * F.mse_loss(student_probs, teacher_probs[n_labeled:])
        if not (self.options["use_adversarial"] or self.options["use_feature"]):
            return losses

        levels = self.options["feature_levels"]
        per_class = self.options["voxels_per_class"]
        real_points, real_classes = sample_class_voxels(labeled["label"][:, 0], per_class, self.num_classes)
        if self.options["use_feature"]:
            losses["feature"] = self.options["beta"] * self._feature_loss(
                [features[i] for i in levels], [teacher_features[i] for i in levels], real_points, real_classes, size
            )
        if self.options["use_adversarial"]:
            top, pseudo = teacher_probs[n_labeled:].max(1)
            pseudo = pseudo.masked_fill(top <= self.options["pseudo_threshold"], -1)  # Eq. 1; -1: not sampled
            fake_points, fake_classes = sample_class_voxels(pseudo, per_class, self.num_classes)
            fake_points[:, 0] += n_labeled  # batch index into the concatenated patches
            discriminator = self.networks["discriminator"]
            chosen = [features[i] for i in levels]
            detached = [f.detach() for f in chosen]
            real = discriminator(detached, real_points, real_classes, size)
            fake = discriminator(detached, fake_points, fake_classes, size)
            losses["discriminator"] = binary_cross_entropy(real, 1.0) + binary_cross_entropy(fake, 0.0)
            with frozen(discriminator):  # the generator's term must not train the discriminator
                fooled = discriminator(chosen, fake_points, fake_classes, size)
            losses["adversarial"] = self.options["alpha"] * binary_cross_entropy(fooled, 1.0)
        return losses

    def _feature_loss(self, student_features: list[torch.Tensor], teacher_features: list[torch.Tensor],
                      points: torch.Tensor, classes: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """Eq. 3: BYOL between each student voxel and a teacher voxel of the same class."""
        online = self.networks["predictor"](self.networks["projector"](student_features, points, size))
        with torch.no_grad():
            target = self.networks["projector_teacher"](teacher_features, points[within_class_shuffle(classes)], size)
        return (F.normalize(online.float(), dim=1) - F.normalize(target.float(), dim=1)).pow(2).sum(1).mean()

    @torch.no_grad()
    def after_step(self, step: StepInfo) -> None:
        super().after_step(step)
        if "projector" in self.networks:  # the teacher's feature layer follows at the teacher's rate
            alpha = min(1.0 - 1.0 / (step.iteration + 2), self.options["ema_alpha"])
            ema_update(self.networks["projector_teacher"], self.networks["projector"], alpha)


def sample_class_voxels(labels: torch.Tensor, per_class: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `per_class` random voxels of each class in a (B, z, y, x) label map (negative = excluded):
    ((N, 4) voxel indices (batch, z, y, x), (N,) classes), grouped by class."""
    points, classes = [labels.new_zeros(0, 4)], [labels.new_zeros(0)]
    for c in range(num_classes):
        where = torch.nonzero(labels == c)
        chosen = where[torch.randperm(len(where), device=labels.device)[:per_class]]
        points.append(chosen)
        classes.append(torch.full((len(chosen),), c, dtype=torch.long, device=labels.device))
    return torch.cat(points), torch.cat(classes)


def binary_cross_entropy(logits: torch.Tensor, target: float) -> torch.Tensor:
    """Mean BCE of real/fake logits against one target; 0 without voxels (no confident pseudo-label yet)."""
    if not len(logits):
        return logits.new_zeros(())
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(), target))


def within_class_shuffle(classes: torch.Tensor) -> torch.Tensor:
    """A permutation of 0..N-1 that maps every index to an index of the same class."""
    order = torch.arange(len(classes), device=classes.device)
    for c in torch.unique(classes).tolist():
        members = order[classes == c]
        order[classes == c] = members[torch.randperm(len(members), device=classes.device)]
    return order


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters without gradient inside the block (the graph built there gives them none), restored after."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(module.parameters(), flags):
            parameter.requires_grad_(flag)
