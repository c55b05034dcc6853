"""Cross pseudo supervision (Chen et al., CVPR 2021): two networks of one architecture, initialised
differently, each trained on the other's hard pseudo-labels (cross-entropy against the argmax) on
labeled and unlabeled patches, with a ramped weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from semiseg.methods.base import Batch, Method, StepInfo, sigmoid_rampup


class CrossPseudoSupervision(Method):
    name = "cps"
    summary = "Two differently initialised networks, cross pseudo supervision (CE on each other's argmax)."
    defaults = {"cps_weight": 1.0, "rampup": 0.4}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
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
        cross = F.cross_entropy(left, right.detach().argmax(1)) + F.cross_entropy(right, left.detach().argmax(1))
        weight = self.options["cps_weight"] * sigmoid_rampup(step.progress, self.options["rampup"])
        return {"supervised": supervised, "cross_pseudo": weight * cross}

    def predictors(self):
        return {"left": self.networks["left"], "right": self.networks["right"]}
