"""Bidirectional Copy-Paste (Bai et al., CVPR 2023), as the authors' 3D code (LA_BCP_train.py) runs it.

A Mean Teacher whose student never sees a plain patch. One box, 2/3 of each side of the patch
(`mask_ratio`), is drawn per step at a random position. Pre-training (the first `pretrain`
fraction of the run): labeled patch b pasted into labeled patch a, the labels mixed the same way,
Dice + CE over the whole patch; no unlabeled data. Self-training: the teacher labels the unlabeled
patches (argmax, then the largest connected component per sample), and two mixtures go through the
student: unlabeled patch pasted into labeled patch a, and labeled patch b pasted into an unlabeled
one. Each voxel is supervised by the label of the patch it came from: ground truth with weight 1,
teacher pseudo-label with weight `alpha` (the code's u_weight, 0.5). The loss of each (mixture,
region) is (masked Dice + masked CE) / 2, as the code's mix_loss. The student predicts.

Choices where the paper is silent, and deviations from the released code:
- Two stages on one trainer: the code trains 2000 pre-training iterations (SGD lr 0.01 constant,
  fresh model) and then 15000 self-training iterations (a new SGD, lr 0.01 x 0.1 every 2500
  iterations). Here one optimizer and the run's schedule (poly by default) span both stages, so SGD
  momentum carries over and the self-training stage starts at the poly lr of that iteration.
  `pretrain` is 2000 / 17000 of the run by default.
- The teacher starts self-training as the student at the end of pre-training (the code loads the
  pre-training checkpoint with the best Dice on the test cases into both; here the last one, with no
  selection on test data). From then on teacher = 0.99 teacher + 0.01 student every step, no warm-up.
  The code averages parameters only and leaves the teacher's batch-norm statistics to its own
  forward passes; here `ema_update` also averages them. The teacher only runs in training mode
  (batch statistics), so this changes no pseudo-label.
- Pairs (deviation by default): the code halves its 4 labeled + 4 unlabeled batch (a = first half,
  b = second half; `pairs: "halves"`, the paper preset's). At the trainer's default 2 + 2 that leaves
  one patch per half, so batch-norm sees one patch per forward pass; the default `"shifted"` keeps
  the whole batch instead (a = the batch, b = the batch shifted by one patch). On the hippocampus
  benchmark (4 labeled, 1000 iterations, seed 0) it scored 0.782 where halves scored 0.726.
  Of an odd batch the middle patch is in both halves (a single patch is both).
- The box's position is random, as the abstract's "random crop" and the 3D code's context_mask
  (not a central crop); one box per step for the whole batch, as the code. Here every position
  inside the patch can be drawn (the code's np.random.randint excludes the last one).
- More than two classes: pseudo-labels are the argmax (the code thresholds the foreground
  probability at 0.5, the same for two classes) and the largest component is kept per class.
- Augmentation is the trainer's (the code: random rotation by 90 degrees, flip, crop); `--preset paper`
  selects UA-MT's, which is the code's, and its 17000 iterations, 4 + 4 batch, dropout VNet and step
  schedule (over both stages: the code's pre-training lr is constant, and it selects the best
  self-training checkpoint from iteration 2200 on; `semiseg benchmark la --select-from 2200` does that).
Ignore label: supported (the ignored voxels are pasted with their patch and left out of the region
losses like the voxels outside the region).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss

from semiseg.postprocessing import largest_component
from semiseg.errors import InputError
from semiseg.labels import IGNORE_INDEX
from semiseg.methods.base import Batch, Method, StepInfo, ema_update


def paste_box(patch_shape: tuple[int, ...], ratio: float) -> torch.Tensor:
    """A boolean (D, H, W) mask, True in a box of int(ratio * side) voxels per axis at a random position."""
    inside = torch.zeros(patch_shape, dtype=torch.bool)
    box = []
    for side in patch_shape:
        size = int(side * ratio)
        start = int(torch.randint(0, side - size + 1, ()))
        box.append(slice(start, start + size))
    inside[tuple(box)] = True
    return inside


def paste(background: torch.Tensor, foreground: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Foreground where `inside`, background elsewhere (images and label maps alike)."""
    return torch.where(inside.to(background.device), foreground, background)


def halves(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and second half of a batch; of an odd batch the middle patch is in both (one patch: both are it)."""
    half = (len(batch) + 1) // 2
    return batch[:half], batch[len(batch) - half:]


def shifted(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch and the batch shifted by one patch: every patch is paired with the next one."""
    return batch, torch.roll(batch, 1, dims=0)


def largest_component_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, 1, D, H, W) label maps with only the largest connected component of each class kept, per sample."""
    kept = np.stack([largest_component(sample) for sample in labels.cpu().numpy()])
    return torch.from_numpy(kept).to(labels.device)


class BidirectionalCopyPaste(Method):
    name = "bcp"
    summary = "Mean Teacher on bidirectional copy-paste of labeled and unlabeled patches, after labeled copy-paste pre-training."
    handles_ignore_label = True
    defaults = {
        "alpha": 0.5,  # weight of the pseudo-labeled voxels (the code's u_weight)
        "mask_ratio": 2 / 3,  # box side / patch side (the code's mask_ratio)
        "pretrain": 2 / 17,  # fraction of the run before self-training (2000 of 2000 + 15000 on LA)
        "ema_alpha": 0.99,
        "pairs": "shifted",  # which patches are mixed: "shifted" (whole batch) or "halves" (the code's); see above
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0 < self.options["mask_ratio"] < 1 or not 0 <= self.options["pretrain"] < 1:
            raise InputError("bcp: mask_ratio must be in (0, 1) and pretrain in [0, 1)")
        if self.options["pairs"] not in ("halves", "shifted"):
            raise InputError(f"bcp: pairs must be 'halves' or 'shifted', not {self.options['pairs']!r}")
        self.split = halves if self.options["pairs"] == "halves" else shifted
        self.networks["student"] = self.make_network()
        self.networks["teacher"] = copy.deepcopy(self.networks["student"]).requires_grad_(False)
        self.dice_loss = MaskedDiceLoss(include_background=True, softmax=True)  # per sample and class, as mask_DiceLoss

    def frozen_networks(self) -> set[str]:
        return {"teacher"}

    def pretraining(self, step: StepInfo) -> bool:
        return step.iteration < round(self.options["pretrain"] * step.iterations)

    def region_loss(self, logits: torch.Tensor, labels: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """(Dice + CE) / 2 over the voxels of `region` ((D, H, W) bool) only, ignored voxels left out."""
        logits = logits.float()
        annotated = labels != IGNORE_INDEX
        mask = region.to(logits.device).expand(len(logits), 1, *region.shape).float() * annotated
        labels = labels.masked_fill(~annotated, 0)
        one_hot = F.one_hot(labels[:, 0].long(), logits.shape[1]).movedim(-1, 1).float()
        cross_entropy = (F.cross_entropy(logits, labels[:, 0].long(), reduction="none") * mask[:, 0]).sum() / (mask.sum() + 1e-16)
        return (self.dice_loss(logits, one_hot, mask) + cross_entropy) / 2

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor) -> torch.Tensor:
        return largest_component_labels(self.networks["teacher"](images).argmax(1, keepdim=True))

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: StepInfo) -> dict[str, torch.Tensor]:
        student = self.networks["student"]
        (image_a, image_b), (label_a, label_b) = self.split(labeled["image"]), self.split(labeled["label"])
        inside = paste_box(tuple(image_a.shape[2:]), self.options["mask_ratio"])
        if self.pretraining(step):
            logits = student(paste(image_a, image_b, inside))
            everywhere = torch.ones_like(inside)
            loss = self.region_loss(logits, paste(label_a, label_b, inside), everywhere)
            return {"labeled_part": loss, "unlabeled_part": loss.new_zeros(())}
        assert unlabeled is not None
        unlabeled_a, unlabeled_b = self.split(unlabeled["image"])
        pseudo_a, pseudo_b = self.pseudo_labels(unlabeled_a), self.pseudo_labels(unlabeled_b)
        # Two forward passes, as the code: batch-norm statistics per mixture direction.
        inward = student(paste(image_a, unlabeled_a, inside))  # labeled outside, unlabeled box
        outward = student(paste(unlabeled_b, image_b, inside))  # unlabeled outside, labeled box
        outside = ~inside
        return {
            "labeled_part": self.region_loss(inward, label_a, outside) + self.region_loss(outward, label_b, inside),
            "unlabeled_part": self.options["alpha"] * (self.region_loss(inward, pseudo_a, inside) + self.region_loss(outward, pseudo_b, outside)),
        }

    @torch.no_grad()
    def after_step(self, step: StepInfo) -> None:
        # While pre-training the teacher copies the student, so self-training starts from the pre-trained student.
        alpha = 0.0 if self.pretraining(step) else self.options["ema_alpha"]
        ema_update(self.networks["teacher"], self.networks["student"], alpha)

    def predictors(self):
        return {"student": self.networks["student"]}
