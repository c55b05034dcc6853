"""Supervised-only baseline: one network trained on the labeled patches, unlabeled scans unused."""

from __future__ import annotations

import torch

from semiseg.methods.base import Batch, Method, StepInfo


class Supervised(Method):
    name = "supervised"
    summary = "Labeled data only (Dice + cross-entropy); the lower bound semi-supervised methods must beat."
    uses_unlabeled = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.networks["student"] = self.make_network()

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: StepInfo) -> dict[str, torch.Tensor]:
        logits = self.networks["student"](labeled["image"])
        return {"supervised": self.supervised_loss(logits, labeled["label"])}

    def predictors(self):
        return {"student": self.networks["student"]}
