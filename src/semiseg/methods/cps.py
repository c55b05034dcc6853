"""Cross pseudo supervision (Chen et al., CVPR 2021): two networks of one architecture, initialised
differently, each trained on the other's hard pseudo-labels (cross-entropy against the argmax) on
labeled and unlabeled patches, with a ramped weight.

`--preset paper` (semiseg.presets) sets SSL4MIS's train_cross_pseudo_supervision_3D.py literally:
0.5 (CE + Dice) per network on the labeled patches, the cross terms on the UNLABELED patches only
with weight 0.1 ramped as sigmoid_rampup(iteration // 150, 200) over its 30000 iterations, SGD
(momentum 0.9, weight decay 1e-4, no Nesterov) with poly decay from 0.01, UA-MT's crop +
rotation/flip augmentation, the VNet with Dropout3d(0.5), fp32. SSL4MIS's Dice also counts the
background class; the preset's Dice is over the foreground (UA-MT's).
Ignore label: supported (only the supervised loss reads the labels; the cross terms use pseudo-labels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from semiseg.errors import InputError
from semiseg.methods.base import Batch, Method, StepInfo, consistency_rampup


class CrossPseudoSupervision(Method):
    name = "cps"
    summary = "Two differently initialised networks, cross pseudo supervision (CE on each other's argmax)."
    handles_ignore_label = True
    defaults = {
        "cps_weight": 1.0,
        "rampup": 0.4,  # fraction of the iterations over which the weight ramps up
        "rampup_epochs": None,  # set: SSL4MIS's ramp, over this many 150-iteration epochs (replaces rampup)
        "cross_on": "all",  # patches the cross terms use: "all" or "unlabeled" (SSL4MIS)
        "supervised_loss": "dice+ce",  # or "half-dice+ce" (SSL4MIS), "dice"
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.options["cross_on"] not in ("all", "unlabeled"):
            raise InputError(f"cross_on '{self.options['cross_on']}': use all or unlabeled")
        # Two build calls draw different initial weights from the seeded generator.
        self.networks["left"] = self.make_network()
        self.networks["right"] = self.make_network()

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: StepInfo) -> dict[str, torch.Tensor]:
        assert unlabeled is not None
        n_labeled = labeled["image"].shape[0]
        images = torch.cat([labeled["image"], unlabeled["image"]])
        left, right = self.networks["left"](images), self.networks["right"](images)
        supervised = self.supervised_loss(left[:n_labeled], labeled["label"]) + self.supervised_loss(
            right[:n_labeled], labeled["label"]
        )
        if self.options["cross_on"] == "unlabeled":
            left, right = left[n_labeled:], right[n_labeled:]
        cross = F.cross_entropy(left, right.detach().argmax(1)) + F.cross_entropy(right, left.detach().argmax(1))
        weight = self.options["cps_weight"] * consistency_rampup(step, self.options)
        return {"supervised": supervised, "cross_pseudo": weight * cross}

    def predictors(self):
        return {"left": self.networks["left"], "right": self.networks["right"]}
