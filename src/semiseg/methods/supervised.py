"""Supervised-only baseline: one network trained on the labeled patches, unlabeled scans unused.

`--preset paper` (semiseg.presets) sets UA-MT's train_LA.py literally: the VNet with
Dropout3d(0.5), 0.5 (CE + Dice), batch 4 labeled patches, SGD without Nesterov, lr 0.01 divided
by 10 every 2500 iterations, 6000 iterations, crop + rotation/flip augmentation, fp32.
Ignore label: supported (only the supervised loss reads the labels, and it leaves ignored voxels out).
"""

from __future__ import annotations

import torch

from semiseg.methods.base import Batch, Method, StepInfo


class Supervised(Method):
    name = "supervised"
    summary = "Labeled data only (Dice + cross-entropy); the lower bound semi-supervised methods must beat."
    handles_ignore_label = True
    uses_unlabeled = False
    defaults = {"supervised_loss": "dice+ce"}  # or "half-dice+ce" (UA-MT's code), "dice"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.networks["student"] = self.make_network()

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: StepInfo) -> dict[str, torch.Tensor]:
        logits = self.networks["student"](labeled["image"])
        return {"supervised": self.supervised_loss(logits, labeled["label"])}

    def predictors(self):
        return {"student": self.networks["student"]}
