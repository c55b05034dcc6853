"""Dual-subnet contrastive learning (Karimijafarbigloo, Azad et al., "Leveraging unlabeled data for
3D medical image segmentation through self-supervised contrastive learning", 2023).

Two subnets of different architectures, A (the run's network, the VNet by default) and B (a ResNet-34
encoder under the VNet decoder, as in MCF, which the paper follows), both see every patch:
- L_s: Dice + cross-entropy of both on the labeled patches (Eq. 1).
- L_u (Eq. 2): the subnet with the lower L_s this step gives the pseudo-label (its argmax on the
  unlabeled patches, Fig. 1); voxels are split by that subnet's prediction entropy into reliable and
  unreliable; both subnets get Dice + cross-entropy against the pseudo-label on the reliable voxels,
  plus L_reg.
- L_reg (Eqs. 4-5): on M_diff, the unlabeled voxels where both subnets' top probability exceeds T
  but their classes differ, the L1 distance between their softmax outputs.
- L_c (Eqs. 6-7): per subnet, class prototypes are the mean embeddings (the last decoder feature
  map, as the authors' code uses; no projection head, none is mentioned) of the reliable voxels
  of each pseudo-class; each unreliable voxel gets a softmax over the negative distances to the
  prototypes and is pulled to its pseudo-class prototype by cross-entropy, and the prototypes are
  pushed apart.
- L = L_s + lambda_u L_u + lambda_c L_c (Eq. 3), lambda_u = 1.

Schedule of lambda_c. The paper prints lambda_c = 0.1 exp(4 (1 - t/t_max)^2), which DECAYS from
0.1 e^4 = 5.46 at the start to 0.1 at the end: the contrastive term would weigh 55 times more when
the prototypes come from an untrained network than when they are meaningful, and weigh 5.5
times L_s at step 0. The authors' code ramps it UP (0.1 exp(-5 (1 - s/40)^2), s = iteration // 150,
reaching 0.1 at iteration 6000, the end), the usual Gaussian warm-up, so the printed formula lost
its minus sign. Default `contrast_schedule="warmup"`: 0.1 exp(-4 (1 - t/t_max)^2) (the paper's
constant 4, the code's sign); `"printed"` gives the formula as printed.

Choices where the paper is silent, and differences from the authors' code (a fork of MCF's, which
departs from the paper and whose unlabeled and contrastive losses are computed on detached tensors,
so they train nothing; here every term has live gradients):
- Reliability: the `unreliable_percent` = 20 % highest-entropy voxels of the pseudo-label's subnet
  (over the unlabeled batch) are unreliable. The split is U2PL's, whose function the code reuses;
  20 % unreliable is U2PL's default. The code passes 20 as the percentile *kept*, in both subnets
  (reliable where either is in its lowest 20 %): on hippocampus patches that keeps only background,
  so no foreground prototype would exist. `unreliable_percent=80` approximates the code.
- Pseudo-label: the winner's argmax, as the paper says (the code takes the union of both argmaxes,
  which only works for binary tasks). The winner is compared on the whole L_s (Dice + CE; the code
  compares Dice only). Both subnets learn from it, as in the code and Eq. 2's generic f;
  `pseudo_label_to="loser"` trains only the other subnet on it, as MCF (which the paper builds
  on) does with its better subnet's output.
- M_diff is computed on the unlabeled patches, between the two subnets (Eq. 4); the code computes
  it on labeled patches, each subnet against the ground truth, with a fixed T (p >= 0.6).
  T rises linearly from `threshold_start` = 0.6 (the code's value) to `threshold_end` = 0.9 over
  the run ("we dynamically adjust T", rule not given): as the subnets grow confident, a rising
  T keeps M_diff to confident conflicts instead of every disagreement. Eq. 5's sum over voxels is
  averaged over M_diff (as the code normalises its masked loss) so its scale does not depend on the
  patch size; it is 0 when M_diff is empty.
- Contrastive loss on each subnet's own embeddings (the code: only the losing subnet's). Distances
  are squared Euclidean between l2-normalised embeddings and l2-normalised prototypes (the code
  normalises both; Eq. 7's prototypical-network softmax). Prototypes keep their gradient so they
  can be pushed apart; the push is the mean over class pairs of 1 - d(c_k, c_k')/4 = (1 + cos)/2,
  in [0, 1], 0 for opposite prototypes (the code's third term *adds* the prototype distance to
  the loss, pulling them together). The pull is averaged per class, then over classes (the code
  balances classes by sampling as many unreliable background voxels as foreground ones). Classes
  with no reliable voxel this step have no prototype; their unreliable voxels are skipped.
- Both subnets in one SGD optimizer (the code's two SGD optimizers with equal settings update
  identically); the trainer's poly schedule replaces the paper's /10 every 2500 iterations.
- Subnet B is `second_network` ("resnet", networks/resnet_segmenter.py) with the first network's
  `base_filters` and `dropout` unless `second_network_options` says otherwise. Dropout follows
  the network options (off by default, as for every method here; the authors' code uses it in
  both subnets).
- Predictors: both subnets, averaged, their disagreement reported as uncertainty (the authors'
  test script loads and runs both).
- lambda_u is constant from the first step (the paper gives no warm-up). `unlabeled_rampup` > 0
  (off by default) ramps L_u and L_reg up with exp(-5 (1 - t/length)^2) over that fraction of the
  run, as mean-teacher does.
- On the hippocampus CPU benchmark (10% labeled, benchmarks/results/hippocampus_cpu.md, notes) the
  paper's lambda_u = 1 ends below supervised-only (Dice 0.736; a repeat 0.717), and so do the
  warm-up (0.711) and pseudo-labels to the loser only (0.753); without L_reg it reaches 0.829 (without L_c
  0.722), so L_reg at weight 1 costs the most. lambda_u = 0.1 (`unlabeled_weight=0.1`, the consistency weight
  of MCF and of the authors' code) gives 0.845, and the two subnets on the labels alone 0.843. So the
  default is lambda_u = 0.1 (a deviation); `--preset paper` keeps the paper's 1.
Ablation switches `use_regularization` and `use_contrastive` drop L_reg and L_c (the paper's
ablation rows).

`--preset paper` (semiseg.presets) sets Sec. 4 literally: lambda_c as printed
(`contrast_schedule="printed"`), lambda_u = 1, SGD (momentum 0.9, weight decay 1e-4, no Nesterov),
lr 0.01 divided by 10 every 2500 iterations for 6000 iterations, batch 2 + 2, and from the MCF code
it follows, VNet + ResNet subnets with Dropout3d(0.5), the crop + rotation/flip augmentation, fp32.
NOT implemented: the paper's "K-fold cross-validation recommended by [7]" (MCF): one model per
fold of the LA cases, the table the mean over folds. It replaces the fixed train.list/test.list
split of `semiseg benchmark la` and needs one run per fold; its numbers are not comparable with
the fixed-split ones.
Ignore label: supported (only the supervised loss reads the labels; the better subnet is chosen on the
annotated voxels).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss

from semiseg.errors import InputError
from semiseg.methods.base import Batch, Method, StepInfo, sigmoid_rampup
from semiseg.networks import build_network, pools_per_axis


class DualSubnetContrastive(Method):
    name = "dual-subnet"
    summary = ("VNet + ResNet subnets: pseudo-labels from the better subnet on reliable voxels, L1 on confident "
               "disagreements, prototype contrast for unreliable voxels.")
    handles_ignore_label = True
    defaults = {
        "unlabeled_weight": 0.1,  # lambda_u; the paper's 1 falls below supervised-only on the hippocampus (docstring)
        "unlabeled_rampup": 0.0,  # fraction of the run over which lambda_u warms up; 0: constant (paper)
        "contrast_weight": 0.1,  # lambda_c's scale (paper)
        "contrast_schedule": "warmup",  # "warmup": 0.1 exp(-4(1-t)^2); "printed": 0.1 exp(+4(1-t)^2)
        "pseudo_label_to": "both",  # which subnets learn from the pseudo-label: "both" (paper) or "loser" (MCF)
        "unreliable_percent": 20.0,  # highest-entropy share of unlabeled voxels kept out of L_u (U2PL)
        "threshold_start": 0.6,  # T for M_diff at the start (the authors' code's fixed T) ...
        "threshold_end": 0.9,  # ... rising linearly to this at the end
        "use_regularization": True,
        "use_contrastive": True,
        "second_network": "resnet",
        "second_network_options": {},  # empty: base_filters and dropout follow the first network's
    }

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.options["contrast_schedule"] not in ("warmup", "printed"):
            raise InputError("dual-subnet: contrast_schedule must be 'warmup' or 'printed'")
        if self.options["pseudo_label_to"] not in ("both", "loser"):
            raise InputError("dual-subnet: pseudo_label_to must be 'both' or 'loser'")
        self.networks["subnet_a"] = self.make_network()
        shared = {k: v for k, v in self.network_spec.options.items() if k in ("base_filters", "dropout")}
        if "strides" in self.network_spec.options:  # anisotropic data: both subnets pool as the plan says
            second = self.options["second_network"]
            if not pools_per_axis(second, self.options["second_network_options"]):
                raise InputError(f"dual-subnet: second_network '{second}' cannot pool per axis as this anisotropic data's plan asks; "
                                 "use resnet or vnet")
            shared["strides"] = self.network_spec.options["strides"]
        self.networks["subnet_b"] = build_network(
            self.options["second_network"], self.in_channels, self.num_classes,
            **{**shared, **self.options["second_network_options"]},
        )
        self.masked_dice = MaskedDiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)

    def contrast_weight(self, progress: float) -> float:
        sign = 1.0 if self.options["contrast_schedule"] == "printed" else -1.0
        return self.options["contrast_weight"] * math.exp(sign * 4.0 * (1.0 - progress) ** 2)

    def confidence_threshold(self, progress: float) -> float:
        start, end = self.options["threshold_start"], self.options["threshold_end"]
        return start + (end - start) * progress

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: StepInfo) -> dict[str, torch.Tensor]:
        assert unlabeled is not None
        n_labeled = labeled["image"].shape[0]
        images = torch.cat([labeled["image"], unlabeled["image"]])
        logits, embeddings = {}, {}
        for name in ("subnet_a", "subnet_b"):
            network = self.networks[name]
            logits[name], embeddings[name] = network.decode(network.encode(images), return_embedding=True)
        supervised = {name: self.supervised_loss(out[:n_labeled], labeled["label"]) for name, out in logits.items()}
        probs_a, probs_b = (torch.softmax(logits[name][n_labeled:].float(), dim=1) for name in ("subnet_a", "subnet_b"))

        a_wins = supervised["subnet_a"] <= supervised["subnet_b"]  # a tensor: no host sync
        with torch.no_grad():  # Fig. 1: the subnet with the lower L_s labels the unlabeled patches
            winner = torch.where(a_wins, probs_a, probs_b)
            pseudo = winner.argmax(1, keepdim=True)
            reliable = reliable_voxels(winner, self.options["unreliable_percent"])
        pseudo_losses = {name: self._masked_dice_ce(out[n_labeled:], pseudo, reliable) for name, out in logits.items()}
        if self.options["pseudo_label_to"] == "loser":
            pseudo_loss = torch.where(a_wins, pseudo_losses["subnet_b"], pseudo_losses["subnet_a"])
        else:
            pseudo_loss = sum(pseudo_losses.values())

        weight_u = self.options["unlabeled_weight"] * sigmoid_rampup(step.progress, self.options["unlabeled_rampup"])
        losses = {"supervised": sum(supervised.values()), "unsupervised": weight_u * pseudo_loss}
        if self.options["use_regularization"]:
            mask = confident_disagreement(probs_a, probs_b, self.confidence_threshold(step.progress))
            losses["regularization"] = weight_u * masked_l1(probs_a, probs_b, mask)
        if self.options["use_contrastive"]:
            contrast = sum(prototype_contrast(emb[n_labeled:], pseudo[:, 0], reliable[:, 0], self.num_classes)
                           for emb in embeddings.values())
            losses["contrastive"] = self.contrast_weight(step.progress) * contrast
        return losses

    def _masked_dice_ce(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        cross_entropy = F.cross_entropy(logits, target[:, 0].masked_fill(~mask[:, 0], -100))  # -100: ignored
        return self.masked_dice(logits, target, mask) + cross_entropy

    def predictors(self):
        return {"subnet_a": self.networks["subnet_a"], "subnet_b": self.networks["subnet_b"]}


def reliable_voxels(probabilities: torch.Tensor, unreliable_percent: float) -> torch.Tensor:
    """(B, 1, ...) mask of the voxels whose prediction entropy is not among the highest `unreliable_percent` %."""
    entropy = -(probabilities * torch.log(probabilities + 1e-10)).sum(1, keepdim=True)
    count = entropy.numel()
    kept = max(1, round(count * (1.0 - unreliable_percent / 100.0)))
    threshold = entropy.flatten().kthvalue(kept).values
    return entropy <= threshold


def confident_disagreement(probs_a: torch.Tensor, probs_b: torch.Tensor, threshold: float) -> torch.Tensor:
    """M_diff (Eq. 4): (B, 1, ...) voxels where both top probabilities exceed T and the classes differ."""
    top_a, class_a = probs_a.max(1, keepdim=True)
    top_b, class_b = probs_b.max(1, keepdim=True)
    return (top_a > threshold) & (top_b > threshold) & (class_a != class_b)


def masked_l1(probs_a: torch.Tensor, probs_b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_reg (Eq. 5): L1 distance of the softmax outputs, summed over classes, averaged over the mask."""
    distance = (probs_a - probs_b).abs().sum(1, keepdim=True)
    return (distance * mask).sum() / mask.sum().clamp(min=1)


def class_prototypes(embeddings: torch.Tensor, classes: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6: the mean of the (N, E) embeddings of each class; returns (prototypes (K, E), their
    classes (K,)), classes without members left out."""
    sums = embeddings.new_zeros(num_classes, embeddings.shape[1]).index_add(0, classes, embeddings)
    counts = torch.bincount(classes, minlength=num_classes)
    present = torch.nonzero(counts).flatten()
    return sums[present] / counts[present, None].to(sums.dtype), present


def prototype_contrast(embeddings: torch.Tensor, pseudo: torch.Tensor, reliable: torch.Tensor, num_classes: int) -> torch.Tensor:
    """L_c for one subnet from its (B, E, ...) embeddings and the (B, ...) pseudo-labels and reliability."""
    vectors = F.normalize(embeddings.float().movedim(1, -1).reshape(-1, embeddings.shape[1]), dim=1)
    pseudo, reliable = pseudo.reshape(-1), reliable.reshape(-1)
    prototypes, present = class_prototypes(vectors[reliable], pseudo[reliable], num_classes)
    if len(present) < 2:  # a single prototype: nothing to contrast
        return vectors.new_zeros(())
    prototypes = F.normalize(prototypes, dim=1)
    pulls = []
    for row, k in enumerate(present.tolist()):
        members = vectors[~reliable & (pseudo == k)]
        if len(members):  # Eq. 7: softmax over negative squared distances, cross-entropy to its own prototype
            distances = torch.cdist(members, prototypes).pow(2)
            pulls.append(F.cross_entropy(-distances, torch.full((len(members),), row, device=members.device)))
    pull = torch.stack(pulls).mean() if pulls else vectors.new_zeros(())
    pairs = torch.triu_indices(len(present), len(present), offset=1, device=prototypes.device)
    push = (1.0 - (prototypes[pairs[0]] - prototypes[pairs[1]]).pow(2).sum(1) / 4.0).mean()
    return pull + push
