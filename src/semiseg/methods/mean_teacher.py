"""Mean Teacher (Tarvainen & Valpola, 2017) as the UA-MT code sets it up for 3D segmentation:
an EMA teacher sees a noisy copy of each unlabeled patch, and the student is pulled to the
teacher's softmax by a mean-squared consistency whose weight ramps up with a sigmoid schedule.

`--preset paper` (semiseg.presets) sets UA-MT's code literally: the VNet with Dropout3d(0.5),
0.5 (CE + Dice) on the labeled patches, the weight ramped as sigmoid_rampup(iteration // 150, 40)
(0.165 of its maximum at iteration 2400, full at 6000; the default `rampup` 0.4 reaches full
weight at 40 % of the run), SGD without Nesterov, lr 0.01 divided by 10 every 2500 iterations,
6000 iterations, UA-MT's crop + rotation/flip augmentation, fp32, and the student alone predicts
(UA-MT tests the student; by default student and teacher are averaged). UA-MT's uncertainty mask
is not part of this (plain) Mean Teacher.
Ignore label: supported (only the supervised loss reads the labels; the consistency term uses none).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from semiseg.errors import InputError
from semiseg.methods.base import Batch, Method, StepInfo, consistency_rampup, ema_update


class MeanTeacher(Method):
    name = "mean-teacher"
    summary = "EMA teacher, MSE consistency on unlabeled patches with sigmoid ramp-up."
    handles_ignore_label = True
    defaults = {
        "ema_alpha": 0.99,
        "consistency": 0.1,  # UA-MT's weight
        "rampup": 0.4,  # fraction of the iterations over which the weight ramps up
        "rampup_epochs": None,  # set: the UA-MT code's ramp, over this many 150-iteration epochs (replaces rampup)
        "noise": 0.1,  # std of the Gaussian input noise for the teacher, clipped to +-2 std
        "supervised_loss": "dice+ce",  # or "half-dice+ce" (UA-MT's code), "dice"
        "predict_with": "both",  # "both": student and teacher averaged; "student": UA-MT's test
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.options["predict_with"] not in ("both", "student"):
            raise InputError(f"predict_with '{self.options['predict_with']}': use both or student")
        self.networks["student"] = self.make_network()
        self.networks["teacher"] = copy.deepcopy(self.networks["student"]).requires_grad_(False)

    def frozen_networks(self) -> set[str]:
        return {"teacher"}

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: StepInfo) -> dict[str, torch.Tensor]:
        assert unlabeled is not None
        n_labeled = labeled["image"].shape[0]
        images = torch.cat([labeled["image"], unlabeled["image"]])
        logits = self.networks["student"](images)
        noise = (torch.randn_like(unlabeled["image"]) * self.options["noise"]).clamp(
            -2 * self.options["noise"], 2 * self.options["noise"]
        )
        with torch.no_grad():
            teacher_probs = torch.softmax(self.networks["teacher"](unlabeled["image"] + noise), dim=1)
        student_probs = torch.softmax(logits[n_labeled:], dim=1)
        weight = self.options["consistency"] * consistency_rampup(step, self.options)
        return {
            "supervised": self.supervised_loss(logits[:n_labeled], labeled["label"]),
            "consistency": weight * F.mse_loss(student_probs, teacher_probs),
        }

    @torch.no_grad()
    def after_step(self, step: StepInfo) -> None:
        # Warm start as in Tarvainen's code: alpha = min(1 - 1/(t+1), alpha) lets the teacher follow early.
        alpha = min(1.0 - 1.0 / (step.iteration + 2), self.options["ema_alpha"])
        ema_update(self.networks["teacher"], self.networks["student"], alpha)

    def predictors(self):
        if self.options["predict_with"] == "student":
            return {"student": self.networks["student"]}
        return {"student": self.networks["student"], "teacher": self.networks["teacher"]}
