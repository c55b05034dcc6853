"""SSCL (Liu et al., "A Spatial-Spectral and Commonality Learning Network for Semi-Supervised Medical
Image Segmentation"): a Mean Teacher whose segmentation networks add spectral features (an FFC
encoder) and the common features of a separately trained reconstruction network to the deepest
features of a VNet before decoding. No public code exists; this follows the paper's text.

Paper -> here:
- Student S and EMA teacher T (Eq. 10, alpha `ema_alpha` 0.999; Table 6 also tries 0.99), both
  D(F_c + F_f) with F_f = F_spa + F_spe (Eqs. 4-5): F_spa the network's encoder output, F_spe the
  spectral encoder's (networks/ffc.py, five Fourier units, same downsampling), F_c the last encoder
  features of the reconstruction network R.
- L_seg = L_sup + lambda L_unsup (Eq. 6), lambda `unsup_weight` 0.5 (Table 5), both Dice + CE
  (Eqs. 7-8); pseudo-labels from the teacher at `threshold` 0.5 (Fig. 6).
- R is a VNet of the same width with one output channel, trained by L_rec = MSE(X_hat, X) (Eq. 9) on
  labeled and unlabeled patches alike, with its own optimizer; F_c is detached in the segmentation
  path, so R learns from its MSE only and the student from L_seg only.
- Testing (Sec. 3.5, Fig. 4): the student with R's F_c; the teacher is not used, so one predictor.
- Ablation rows of Table 4: `reconstruction: false` removes R (and F_c), `spectral: false` removes
  the spectral encoder; "Baseline" (8 labeled, 0 unlabeled) is the project's `supervised` method on
  the VNet. Both switches false leave a Mean Teacher with thresholded Dice+CE pseudo-labels.

Choices where the paper is silent (each a reason):
- Pseudo-labels for more than two classes: the teacher's argmax, kept where its top probability is
  at least `threshold` (voxels below are left out of Dice and CE). With two classes and 0.5 this is
  the paper's thresholded foreground; Fig. 6 says higher thresholds "filter out" information, i.e.
  a confidence mask.
- F_spe and F_c are added at the deepest level only (Eqs. 4-5 name only the final features); the
  decoder's skips come from the spatial encoder.
- Teacher input: the unlabeled patch plus Gaussian noise (std `noise` 0.1, clipped to +-2 std), as in
  the UA-MT code whose VNet, batch (2 + 2) and optimizer the paper adopts; the student sees the
  patch itself. F_c for the teacher comes from R on the clean patch (Eq. 1 computes it once from X).
- The paper reports "4k pre-training and 30k formal" iterations without defining pre-training. It
  is read as in BCP's code, whose wording this matches: the first `pretrain` fraction of the run
  (4/34 by default) trains without L_unsup (student on labels, R on all patches), and the teacher
  starts the formal stage as a copy of the student. Set `pretrain: 0` to train all terms from the start.
- EMA warm-up as in the UA-MT / Mean Teacher code: alpha_t = min(1 - 1/(t + 1), ema_alpha), t
  counting formal-stage iterations from 0 (so t = 0 copies the student); Eq. 10 holds from then on.
  `pretrain_stage: true` makes the pre-training its own stage as in BCP's two scripts: at the formal
  stage's first iteration every optimizer starts afresh (no momentum carried over) and the
  learning-rate schedule restarts over the formal stage's iterations.
- lambda is constant (the paper gives no ramp-up).
- Optimizers: the paper's SGD (lr 0.01, momentum 0.9, weight decay 1e-4) for both the student and R
  is the run's optimizer setting (`--lr 0.01` to match; the trainer's SGD is Nesterov with a poly
  schedule, the paper names neither).

`--preset paper` (semiseg.presets) sets Sec. 4.2 literally: 34000 iterations, the first 4000 a
pre-training stage of their own (`pretrain_stage`), SGD lr 0.01, momentum 0.9, weight decay 1e-4
without Nesterov; the paper names no schedule and says "initial learning rate", read as BCP's
(whose pre-train/self-train wording it shares) lr / 10 every 2500 iterations, restarted in each
stage (BCP keeps its pre-training rate constant); from the UA-MT code whose VNet it adopts,
Dropout3d(0.5) and the crop + rotation/flip augmentation ("rotation, and flip operations"); fp32.
Ignore label: supported (only the supervised loss reads the labels).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from semiseg.methods.base import Batch, Method, OptimizerSpec, StepInfo, ema_update
from semiseg.networks import build_network
from semiseg.networks.ffc import SpectralEncoder


class SpatialSpectralNet(nn.Module):
    """A segmentation network whose deepest features get spectral (and, given, common) features added."""

    def __init__(self, spatial: nn.Module, spectral: SpectralEncoder | None):
        super().__init__()
        self.spatial = spatial
        self.spectral = spectral

    def forward(self, x: torch.Tensor, common: torch.Tensor | None = None) -> torch.Tensor:
        features = self.spatial.encode(x)
        final = features[-1]
        if self.spectral is not None:
            final = final + self.spectral(x)
        if common is not None:
            final = final + common
        return self.spatial.decode([*features[:-1], final])


class CommonFeaturePredictor(nn.Module):
    """Test-time SSCL (Eq. 11): the reconstruction network's common features feed the student."""

    def __init__(self, student: SpatialSpectralNet, reconstruction: nn.Module):
        super().__init__()
        self.student = student
        self.reconstruction = reconstruction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x, self.reconstruction.encode(x)[-1])


class SSCL(Method):
    name = "sscl"
    summary = "Mean Teacher + spectral (FFC) encoder + common features from a reconstruction VNet (Liu et al.)."
    handles_ignore_label = True
    defaults = {
        "unsup_weight": 0.5,  # lambda, Eq. 6 / Table 5
        "threshold": 0.5,  # pseudo-label confidence, Sec. 3.4 / Fig. 6
        "ema_alpha": 0.999,  # Eq. 10 / Table 6
        "reconstruction": True,  # REC, Table 4
        "spectral": True,  # FFC, Table 4
        "pretrain": round(4 / 34, 4),  # fraction of the run before L_unsup (4k of 4k + 30k iterations)
        "noise": 0.1,  # teacher input noise std (UA-MT code)
        "pretrain_stage": False,  # True: fresh optimizers and a restarted lr schedule when pre-training ends
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        spatial = self.make_network()
        spectral = SpectralEncoder(self.in_channels, spatial.encoder_widths, getattr(spatial, "strides", None)) if self.options["spectral"] else None
        self.networks["student"] = SpatialSpectralNet(spatial, spectral)
        self.networks["teacher"] = copy.deepcopy(self.networks["student"]).requires_grad_(False)
        if self.options["reconstruction"]:
            spec = self.network_spec
            self.networks["reconstruction"] = build_network(spec.name, self.in_channels, self.in_channels, **spec.options)
        self.dice_loss = DiceLoss(include_background=False, batch=True)  # the Dice half of supervised_loss

    def frozen_networks(self) -> set[str]:
        return {"teacher"}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        specs = {"segmentation": OptimizerSpec(networks=["student"])}
        if "reconstruction" in self.networks:
            specs["reconstruction"] = OptimizerSpec(networks=["reconstruction"])
        return specs

    def _pretrain_iterations(self, step: StepInfo) -> int:
        return int(round(self.options["pretrain"] * step.iterations))

    def stage_starts(self, iterations: int) -> list[int]:
        formal = self._pretrain_iterations(StepInfo(0, iterations))
        return [formal] if self.options["pretrain_stage"] and 0 < formal < iterations else []

    def pseudo_label_loss(self, logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """Dice + CE against the teacher's argmax, over voxels where its confidence reaches the threshold."""
        confidence, target = teacher_probs.max(1)
        mask = (confidence >= self.options["threshold"]).float()
        cross_entropy = (F.cross_entropy(logits, target, reduction="none") * mask).sum() / mask.sum().clamp(min=1.0)
        one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).float()
        mask = mask[:, None]
        dice = self.dice_loss(torch.softmax(logits.float(), 1) * mask, one_hot * mask)
        return dice + cross_entropy

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: StepInfo) -> dict[str, torch.Tensor]:
        assert unlabeled is not None
        n_labeled = labeled["image"].shape[0]
        images = torch.cat([labeled["image"], unlabeled["image"]])
        losses: dict[str, torch.Tensor] = {}
        common = None
        if "reconstruction" in self.networks:
            features = self.networks["reconstruction"].encode(images)
            reconstructed = self.networks["reconstruction"].decode(features)
            losses["reconstruction"] = F.mse_loss(reconstructed.float(), images.float())
            common = features[-1].detach()  # R learns from its MSE only
        logits = self.networks["student"](images, common)
        losses["supervised"] = self.supervised_loss(logits[:n_labeled], labeled["label"])
        if step.iteration < self._pretrain_iterations(step):
            losses["unsupervised"] = logits.new_zeros(())
            return losses
        noise = (torch.randn_like(unlabeled["image"]) * self.options["noise"]).clamp(-2 * self.options["noise"], 2 * self.options["noise"])
        with torch.no_grad():
            teacher_logits = self.networks["teacher"](unlabeled["image"] + noise, None if common is None else common[n_labeled:])
            teacher_probs = torch.softmax(teacher_logits.float(), 1)
        losses["unsupervised"] = self.options["unsup_weight"] * self.pseudo_label_loss(logits[n_labeled:], teacher_probs)
        return losses

    def ema_alpha(self, step: StepInfo) -> float:
        formal = step.iteration - self._pretrain_iterations(step)
        return 0.0 if formal < 0 else min(1.0 - 1.0 / (formal + 1), self.options["ema_alpha"])

    @torch.no_grad()
    def after_step(self, step: StepInfo) -> None:
        ema_update(self.networks["teacher"], self.networks["student"], self.ema_alpha(step))

    def predictors(self):
        student = self.networks["student"]
        if "reconstruction" in self.networks:
            return {"student": CommonFeaturePredictor(student, self.networks["reconstruction"])}
        return {"student": student}
