"""The contract between the one trainer and every method.

A method owns its networks (by name), says which optimizer updates which of them, computes its
losses for one labeled + one unlabeled batch, updates non-trained state after each step (EMA
teachers), and names the network(s) that predict. The trainer does everything else: data,
optimizers and schedules, AMP, backward, validation, checkpoints, progress, distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from monai.losses import DiceCELoss, DiceLoss, MaskedDiceLoss
from torch import nn

from semiseg.errors import InputError
from semiseg.labels import IGNORE_INDEX
from semiseg.networks import build_network


@dataclass
class OptimizerSpec:
    """One optimizer over some of the method's networks; `None` fields take the run's defaults."""

    networks: list[str]
    kind: str | None = None  # "sgd" | "adamw" | "adam"
    lr: float | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    schedule: str | None = None  # "poly" | "step" | "constant"; None: the run's


@dataclass
class NetworkSpec:
    """Which registered network, and its options: the same record rebuilds it from a checkpoint."""

    name: str = "vnet"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepInfo:
    iteration: int  # 0-based
    iterations: int  # the run's budget

    @property
    def progress(self) -> float:
        return self.iteration / max(self.iterations, 1)


# "image": (B, C, D, H, W) float; "label": (B, 1, D, H, W) long channel indices, IGNORE_INDEX where
# the voxel is not annotated (only when the run has an ignore label).
Batch = dict[str, torch.Tensor]


class Method(nn.Module):
    """Base class: subclasses set `name`, build networks in `__init__`, implement `training_step`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    uses_unlabeled: ClassVar[bool] = True
    # Whether training_step reads batch["image_strong"]; the loaders skip that augmentation otherwise.
    uses_strong_view: ClassVar[bool] = False
    # Sliding-window overlap inference should use unless the user sets one (predict --overlap).
    inference_overlap: ClassVar[float] = 0.5
    # Whether a prediction may use windows larger than the training patch (a fully convolutional
    # predictor: its output at a voxel depends on a bounded neighbourhood, not on the window's size).
    larger_windows: ClassVar[bool] = True
    # For DistributedDataParallel: True when a training step leaves some parameters without gradient.
    find_unused_parameters: ClassVar[bool] = False
    # Method options with their defaults; `semiseg methods` prints them, checkpoints record them.
    defaults: ClassVar[dict[str, Any]] = {}
    # The network the method's paper trains; the CLI uses it when the user names none.
    paper_network: ClassVar[str] = "vnet"
    # Whether the method trains on partially annotated labels (ignored voxels hold IGNORE_INDEX):
    # `supervised_loss` leaves them out; a method reading the labels otherwise must too before it
    # sets this (`build_method` refuses an ignore label for a method that does not).
    handles_ignore_label: ClassVar[bool] = False

    def __init__(self, in_channels: int, num_classes: int, network: NetworkSpec, options: dict[str, Any] | None = None,
                 *, ignore_label: bool = False):
        super().__init__()
        unknown = set(options or {}) - set(self.defaults)
        if unknown:
            raise InputError(
                f"method '{self.name}' has no option {', '.join(sorted(unknown))} "
                f"(options: {', '.join(sorted(self.defaults)) or 'none'})"
            )
        self.options = {**self.defaults, **(options or {})}
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.network_spec = network
        self.networks = nn.ModuleDict()
        self.supervised_loss = make_supervised_loss(self.options.get("supervised_loss", "dice+ce"), ignore_label)

    def make_network(self, **overrides: Any) -> nn.Module:
        options = {**self.network_spec.options, **overrides}
        return build_network(self.network_spec.name, self.in_channels, self.num_classes, **options)

    def optimizers(self) -> dict[str, OptimizerSpec]:
        """Optimizer name -> the networks it updates. Default: one optimizer over every trainable network."""
        return {"main": OptimizerSpec(networks=[n for n in self.networks if n not in self.frozen_networks()])}

    def frozen_networks(self) -> set[str]:
        """Networks no optimizer updates (EMA teachers); they are saved but get no gradient."""
        return set()

    def stage_starts(self, iterations: int) -> list[int]:
        """Iterations at which a new training stage begins: the trainer gives every optimizer a fresh
        state there and restarts its learning-rate schedule over the stage."""
        return []

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: StepInfo) -> dict[str, torch.Tensor]:
        """Loss terms for this step, by name. The trainer back-propagates their sum once and steps
        every optimizer, so a method detaches wherever the paper keeps gradients apart."""
        raise NotImplementedError

    def forward(self, labeled: Batch, unlabeled: Batch | None, step: StepInfo) -> dict[str, torch.Tensor]:
        # The training step is the module's forward so that DistributedDataParallel can wrap the
        # whole method (every network, every optimizer's parameters) in one reducer.
        return self.training_step(labeled, unlabeled, step)

    @torch.no_grad()
    def after_step(self, step: StepInfo) -> None:
        """Update state that is not trained by gradient (EMA teachers)."""

    def predictors(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The callables (image -> logits) whose softmax is averaged at inference; with two, their
        disagreement is reported as uncertainty."""
        raise NotImplementedError


def ema_update(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """teacher = alpha * teacher + (1 - alpha) * student, for parameters and float buffers (BN stats)."""
    with torch.no_grad():
        # One multi-tensor kernel instead of one launch per parameter (same arithmetic as lerp_).
        torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1.0 - alpha)
        for t, s in zip(teacher.buffers(), student.buffers()):
            if t.dtype.is_floating_point:
                t.lerp_(s, 1.0 - alpha)
            else:
                t.copy_(s)


def sigmoid_rampup(progress: float, length: float) -> float:
    """exp(-5 (1 - t)^2) with t = progress / length clipped to [0, 1] (Laine & Aila's ramp-up)."""
    if length <= 0:
        return 1.0
    t = min(max(progress / length, 0.0), 1.0)
    return float(torch.exp(torch.tensor(-5.0 * (1.0 - t) ** 2)))


def consistency_rampup(step: StepInfo, options: dict[str, Any]) -> float:
    """The ramp-up factor of a consistency weight: over the `rampup` fraction of the run, or, with
    `rampup_epochs` set, as the UA-MT/SSL4MIS code computes it, sigmoid_rampup(iteration // 150,
    rampup_epochs), in "epochs" of 150 iterations (40 of them span UA-MT's 6000 iterations)."""
    if options.get("rampup_epochs") is not None:
        return sigmoid_rampup(step.iteration // CODE_EPOCH_ITERATIONS, options["rampup_epochs"])
    return sigmoid_rampup(step.progress, options["rampup"])


CODE_EPOCH_ITERATIONS = 150  # UA-MT's and SSL4MIS's `iter_num // 150`


SUPERVISED_LOSSES = ("dice+ce", "half-dice+ce", "dice")


def make_supervised_loss(kind: str, ignore_label: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The labeled-patch loss on (logits, labels): "dice+ce" (MONAI DiceCE, the project's default),
    "half-dice+ce" = 0.5 (CE + Dice) as the UA-MT and SSL4MIS code, or "dice" alone. The Dice of the
    last two is UA-MT's: squared terms in the denominator, foreground classes, over the batch.

    With `ignore_label`, voxels labeled IGNORE_INDEX are left out of both terms, as if the batch held
    only the annotated voxels; a batch without one gets the unmasked loss, bit for bit."""
    loss = _unmasked_loss(kind)
    if not ignore_label:
        return loss
    masked_dice = MaskedDiceLoss(include_background=False, softmax=True, squared_pred=kind != "dice+ce", batch=True)
    dice_weight, ce_weight = {"dice+ce": (1.0, 1.0), "half-dice+ce": (0.5, 0.5), "dice": (1.0, 0.0)}[kind]

    def masked(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        ignored = label == IGNORE_INDEX
        if not bool(ignored.any()):
            return loss(logits, label)
        target = label.masked_fill(ignored, 0)[:, 0].long()
        annotated = (~ignored).to(torch.float32)
        one_hot = torch.nn.functional.one_hot(target, logits.shape[1]).movedim(-1, 1).to(torch.float32)
        dice = masked_dice(logits.float(), one_hot, annotated)
        cross_entropy = torch.nn.functional.cross_entropy(logits.float(), target, reduction="none")
        cross_entropy = (cross_entropy * annotated[:, 0]).sum() / annotated.sum().clamp_min(1.0)
        return dice_weight * dice + ce_weight * cross_entropy

    return masked


def _unmasked_loss(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "dice+ce":
        return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    if kind not in SUPERVISED_LOSSES:
        raise InputError(f"supervised_loss '{kind}': use {', '.join(SUPERVISED_LOSSES[:-1])} or {SUPERVISED_LOSSES[-1]}")
    dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, squared_pred=True, batch=True)
    if kind == "dice":
        return dice

    def half_dice_ce(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return 0.5 * (torch.nn.functional.cross_entropy(logits, label[:, 0]) + dice(logits, label))

    return half_dice_ce


def linear_rampup(progress: float, length: float) -> float:
    return 1.0 if length <= 0 else min(max(progress / length, 0.0), 1.0)
