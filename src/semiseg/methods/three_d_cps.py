"""3D-CPS (Huang et al., "3D Cross-Pseudo Supervision: a semi-supervised nnU-Net architecture for
abdominal organ segmentation", FLARE 2022): two nnU-Net-configured U-Nets of one architecture,
initialised differently, each with its own optimizer, trained on labels and on each other's hard
pseudo-labels. The paper's network is `--network residual-unet` (networks/residual_unet.py; the
authors' code's backbone is `plain-unet`); any project network works.

Paper -> here:
- L = L_sup + lambda L_cps (Eq. 3), L_sup = l(T1(x), Y) + l(T2(x), Y) (Eq. 1) and
  L_cps = L_cps^l + L_cps^u with L_cps^u = l(T1(x), Y2) + l(T2(x), Y1) (Eq. 2), Y_k the other
  network's one-hot (argmax) prediction, detached; l is nnU-Net's Dice + CE (the project's
  supervised loss: soft Dice without background over the batch, plus CE). L_cps^l and L_cps^u are
  computed on the labeled and the unlabeled patches separately and summed, as Eq. 2 writes them.
- lambda rises linearly from 0 to `cps_weight` 0.5 over the first `rampup` fraction of the run and
  stays there ("increase linearity with epoch from 0 to 0.5, and keep that fixed after the specific
  epoch"); the paper does not name the epoch: `rampup` 0.5 is the authors' code's 500 of 1000 epochs.
- Deep supervision on L_sup as nnU-Net's default loss (the paper's networks have output blocks at
  several resolutions): weights 1/2^i over the decoder outputs, the lowest one 0, normalised; labels
  nearest-downsampled. Only for networks with `deep_supervision_logits` (the nnU-Net ones);
  `deep_supervision: false` supervises the full-resolution output only. L_cps uses the
  full-resolution outputs only (Eq. 2).
- Optimizers: one per network (Sec. 2.2), SGD, weight decay `weight_decay` 3e-5 (Table 2), batch 2
  labeled + 2 unlabeled (the trainer's default --batch-size 2).
- Both networks see the same patch (Fig. 2: "any input X" goes to T1 and T2).
- Intensity fingerprint: the project's `compute_plan` already clips CT at the 0.5/99.5 percentiles
  and z-scores with statistics of all voxels of all training scans, unlabeled included (the paper's
  change to nnU-Net's foreground statistics); MR is z-scored per scan as in nnU-Net.
- Inference as nnU-Net's: sliding window with step 0.7 of the patch (`inference_overlap` = 0.3),
  Gaussian weighting, mirroring TTA over all axes with predict's --tta. With `ensemble: false`
  (default) the first network predicts alone: the paper removes nnU-Net's ensembling and the authors'
  code predicts with network 0, as the original CPS reports one branch; `ensemble: true` averages
  both (and reports their disagreement).

Differences from the paper, or where it is silent:
- LR schedule: the paper's Table 2 says ReduceLROnPlateau; the trainer offers poly and constant, so
  poly (nnU-Net's and the authors' code's). Momentum is the run's (0.9, Nesterov); nnU-Net uses 0.99.
- lambda rises per iteration, not per nnU-Net epoch of 250 iterations.
- Learning rate `lr` 0.05 by default, not Table 2's 0.01 (which `--preset paper` keeps): the paper's 0.01 is for
  250000 iterations; at the hippocampus benchmark's 1000, 16 labeled, both networks still predicted background
  only at iteration 500 and reached Dice 0.315 (supervised-only on the same network, labels and seed: 0.797);
  with 0.05, 0.817 over 3 seeds, +0.019 over supervised-only (p = 5e-6; benchmarks/results/hippocampus_cpu.md).
- Augmentation is the project's sampler (flips, quarter turns, affine; nnU-Net's 1/3 foreground
  oversampling), not nnU-Net's full pipeline.
The paper's network is `residual-unet` (`paper_network`): the CLI trains on it unless --network
names another. `--preset paper` (semiseg.presets) sets Table 2 literally where the trainer can:
1000 epochs of nnU-Net's 250 iterations (250000), SGD lr 0.01, weight decay 3e-5 (the method's
options), batch 2 + 2, mixed precision as nnU-Net; the schedule stays poly (ReduceLROnPlateau
needs a validation loss the trainer does not compute).
The authors' released code differs from the paper text; it is not followed here except where noted:
nnU-Net v1 plain U-Net (`--network plain-unet`), SGD with Nesterov momentum 0.99 and gradient
clipping at 12, CPS on labeled and unlabeled at every deep-supervision scale, lambda = (epoch + 1) /
500 x 0.5 (starting above 0), inference with network 0 only.
Ignore label: supported (the deep-supervision targets are resized with the ignored voxels kept, and
the supervised loss leaves them out; the cross terms use pseudo-labels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from semiseg.methods.base import Batch, Method, OptimizerSpec, StepInfo, linear_rampup

NETWORK_NAMES = ("first", "second")


def deep_supervision_weights(count: int) -> list[float]:
    """nnU-Net's weights for `count` outputs (full resolution first): 1/2^i, the lowest 0, normalised."""
    weights = [1.0 / 2**i for i in range(count)]
    if count > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


class ThreeDCrossPseudoSupervision(Method):
    name = "3d-cps"
    summary = "Two nnU-Nets with own optimizers, Dice+CE cross pseudo supervision, lambda linear to 0.5 (Huang et al.)."
    handles_ignore_label = True
    inference_overlap = 0.3  # nnU-Net's step 0.7 of the patch
    paper_network = "residual-unet"
    find_unused_parameters = True  # the lowest deep-supervision head has weight 0, as in nnU-Net
    defaults = {
        "cps_weight": 0.5,  # lambda after the ramp, Sec. 2.2
        "rampup": 0.5,  # fraction of the run over which lambda rises linearly from 0
        "lr": 0.05,  # Table 2 says 0.01, for 250000 iterations; see "Differences from the paper"
        "weight_decay": 3e-5,  # Table 2
        "deep_supervision": True,  # nnU-Net's default loss on L_sup
        "ensemble": False,  # predict with both networks (True) or the first (the authors' code)
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in NETWORK_NAMES:  # successive builds draw different initial weights
            self.networks[name] = self.make_network()

    def optimizers(self) -> dict[str, OptimizerSpec]:
        return {name: OptimizerSpec(networks=[name], kind="sgd", lr=self.options["lr"], weight_decay=self.options["weight_decay"],
                                    schedule="poly") for name in NETWORK_NAMES}

    def cps_lambda(self, step: StepInfo) -> float:
        return self.options["cps_weight"] * linear_rampup(step.progress, self.options["rampup"])

    def _outputs(self, network: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
        if self.options["deep_supervision"] and hasattr(network, "deep_supervision_logits"):
            return network.deep_supervision_logits(images)
        return [network(images)]

    def deep_supervised_loss(self, outputs: list[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for weight, logits in zip(deep_supervision_weights(len(outputs)), outputs):
            if weight:
                target = label if logits.shape[2:] == label.shape[2:] else \
                    F.interpolate(label.float(), size=logits.shape[2:], mode="nearest-exact").long()
                total = total + weight * self.supervised_loss(logits, target)
        return total

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: StepInfo) -> dict[str, torch.Tensor]:
        assert unlabeled is not None
        n_labeled = labeled["image"].shape[0]
        images = torch.cat([labeled["image"], unlabeled["image"]])
        outputs = {name: self._outputs(self.networks[name], images) for name in NETWORK_NAMES}
        pseudo = {name: out[0].detach().argmax(1, keepdim=True) for name, out in outputs.items()}
        weight = self.cps_lambda(step)
        losses = {}
        for name, other in zip(NETWORK_NAMES, reversed(NETWORK_NAMES)):
            full = outputs[name][0]
            losses[f"supervised_{name}"] = self.deep_supervised_loss([o[:n_labeled] for o in outputs[name]], labeled["label"])
            cps_labeled = self.supervised_loss(full[:n_labeled], pseudo[other][:n_labeled])
            cps_unlabeled = self.supervised_loss(full[n_labeled:], pseudo[other][n_labeled:])
            losses[f"cps_{name}"] = weight * (cps_labeled + cps_unlabeled)
        return losses

    def predictors(self):
        names = NETWORK_NAMES if self.options["ensemble"] else NETWORK_NAMES[:1]
        return {name: self.networks[name] for name in names}
