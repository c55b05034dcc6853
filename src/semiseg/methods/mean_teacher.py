"""Mean Teacher (Tarvainen & Valpola, 2017) as the UA-MT code sets it up for 3D segmentation:
an EMA teacher sees a noisy copy of each unlabeled patch, and the student is pulled to the
teacher's softmax by a mean-squared consistency whose weight ramps up with a sigmoid schedule."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from semiseg.methods.base import Batch, Method, StepInfo, ema_update, sigmoid_rampup


class MeanTeacher(Method):
    name = "mean-teacher"
    summary = "EMA teacher, MSE consistency on unlabeled patches with sigmoid ramp-up."
    defaults = {
        "ema_alpha": 0.99,
        "consistency": 0.1,  # UA-MT's weight
        "rampup": 0.4,  # fraction of the iterations over which the weight ramps up
        "noise": 0.1,  # std of the Gaussian input noise for the teacher, clipped to +-2 std
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
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
        weight = self.options["consistency"] * sigmoid_rampup(step.progress, self.options["rampup"])
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
        return {"student": self.networks["student"], "teacher": self.networks["teacher"]}
