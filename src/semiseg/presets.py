"""Named training presets: each method's published protocol as data.

A preset maps a method to overrides of `TrainConfig` fields; `method_options` and
`network_options` among them are merged into the user's options (the user's keys win). The
"paper" preset reproduces each paper's settings literally, and where a paper builds on the
UA-MT code (Yu et al., MICCAI 2019, github yulequan/UA-MT) or SSL4MIS (github HiLab-git/SSL4MIS),
that code's. Which settings each one changes is stated in the method module's docstring.

Pure data and one resolve function: the CLI applies a preset, and explicit flags win over it.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from typing import Any

from semiseg.errors import InputError

# UA-MT's code (train_LA.py, train_LA_meanteacher_certainty_unlabel.py): VNet(has_dropout=True),
# optim.SGD(lr=0.01, momentum=0.9, weight_decay=0.0001) (no Nesterov), lr_ = base_lr * 0.1 **
# (iter_num // 2500), max_iterations 6000, labeled_bs 2 of batch 4, RandomRotFlip + RandomCrop,
# fp32 (no autocast).
UA_MT_TRAINING: dict[str, Any] = {
    "network": "vnet",
    "network_options": {"dropout": True},
    "optimizer": "sgd",
    "lr": 0.01,
    "lr_schedule": "step",
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 1e-4,
    "iterations": 6000,
    "batch_size": 2,
    "augmentation": "ua-mt",
    "amp": False,
}

PAPER: dict[str, dict[str, Any]] = {
    # UA-MT code/train_LA.py: batch_size 4 (all labeled), loss = 0.5 * (CE + Dice).
    "supervised": {**UA_MT_TRAINING, "batch_size": 4, "method_options": {"supervised_loss": "half-dice+ce"}},
    # UA-MT code/train_LA_meanteacher_certainty_unlabel.py without its uncertainty mask: ema_decay 0.99,
    # consistency 0.1 * sigmoid_rampup(iter_num // 150, 40.0), noise clamp(randn * 0.1, -0.2, 0.2),
    # supervised 0.5 * (CE + Dice); test_LA.py loads the student's iter_6000.pth.
    "mean-teacher": {**UA_MT_TRAINING, "method_options": {
        "ema_alpha": 0.99, "consistency": 0.1, "rampup_epochs": 40, "noise": 0.1,
        "supervised_loss": "half-dice+ce", "predict_with": "student"}},
    # SSL4MIS code/train_cross_pseudo_supervision_3D.py: max_iterations 30000, base_lr 0.01 with
    # lr_ = base_lr * (1 - iter_num / max_iterations) ** 0.9, SGD momentum 0.9 / weight decay 1e-4,
    # consistency 0.1 * sigmoid_rampup(iter_num // 150, 200.0), CE cross terms on outputs[labeled_bs:]
    # only, 0.5 * (CE + Dice) per network, net_factory_3d "vnet" with has_dropout=True.
    "cps": {**UA_MT_TRAINING, "lr_schedule": "poly", "iterations": 30000, "method_options": {
        "cps_weight": 0.1, "rampup_epochs": 200, "cross_on": "unlabeled", "supervised_loss": "half-dice+ce"}},
    # SSCL Sec. 4.2 "Implementation details": SGD lr 0.01, weight decay 1e-4, momentum 0.9, VNet,
    # batch 2 + 2, 4k pre-training + 30k formal iterations, rotation and flip; Eq. 6 / Table 5 lambda
    # 0.5; Eq. 10 alpha 0.999; Fig. 6 threshold 0.5. Step decay as BCP's LA_BCP_train.py.
    "sscl": {**UA_MT_TRAINING, "iterations": 34000, "method_options": {
        "pretrain": 4 / 34, "pretrain_stage": True, "unsup_weight": 0.5, "threshold": 0.5, "ema_alpha": 0.999}},
    # Dual-subnet Sec. 4 ("Implementation details"): SGD weight decay 1e-4, momentum 0.9, lr 0.01
    # divided by 10 every 2500 iterations, 6000 iterations, batch 2 + 2, lambda_u 1.0,
    # lambda_c = 0.1 e^{4 (1 - t/t_max)^2} as printed; ResNet + V-Net "following [14, 7]" (MCF).
    "dual-subnet": {**UA_MT_TRAINING, "method_options": {
        "unlabeled_weight": 1.0, "contrast_weight": 0.1, "contrast_schedule": "printed"}},
    # Voxel-adversarial Sec. IV-B (LA): SGD momentum 0.9, weight decay 1e-4, 6000 iterations, lr 0.01
    # divided by 10 every 2500; discriminator Adam (0.5, 0.999) lr 2e-4; alpha 0.01, beta 0.1,
    # gamma(t) = 0.001 e^{-5 (1 - t/t_max)^2}, hidden widths 64, t 0.7; Eq. 4 Dice only;
    # "only the VNet framework was used" at inference.
    "voxel-adversarial": {**UA_MT_TRAINING, "method_options": {
        "supervised_loss": "dice", "predict_with": "student", "consistency": 0.001, "rampup": 1.0,
        "alpha": 0.01, "beta": 0.1, "pseudo_threshold": 0.7, "feature_width": 64,
        "discriminator_lr": 2e-4, "discriminator_betas": [0.5, 0.999]}},
    # DK-UXNet Sec. 3.2: 3D UX-Net backbone, AdamW lr 1e-4, batch 4 = two samples in a weak and a
    # strong view, 112 x 112 x 80 random crops "following [23]" (UA-MT); both contrastive terms (Eq. 3).
    "dk-uxnet": {"network": "uxnet", "batch_size": 1, "augmentation": "ua-mt", "amp": False,
                 "method_options": {"lr": 1e-4, "segc": True}},
    # 3D-CPS Table 2: SGD, weight decay 3e-5, initial lr 0.01, 1000 epochs (nnU-Net: 250 iterations
    # each), batch 2 in D_l and 2 in D_u; Sec. 2.2 lambda linear to 0.5; nnU-Net networks, AMP.
    "3d-cps": {"network": "residual-unet", "iterations": 250_000, "batch_size": 2, "amp": True,
               "method_options": {"lr": 0.01, "weight_decay": 3e-5, "cps_weight": 0.5}},
    # BCP code/LA_BCP_train.py: 2000 pre-training + 15000 self-training iterations, 4 labeled + 4 unlabeled
    # patches, VNet(has_dropout=True), SGD lr 0.01 momentum 0.9 weight decay 1e-4, lr x 0.1 every 2500
    # self-training iterations (one schedule over both stages here; see the bcp docstring).
    "bcp": {**UA_MT_TRAINING, "iterations": 17000, "batch_size": 4, "method_options": {"pretrain": 2000 / 17000, "pairs": "halves"}},
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {"paper": PAPER}
PRESET_NAMES = tuple(PRESETS)
OPTION_FIELDS = ("method_options", "network_options")  # merged with the user's, not replaced


def resolve_preset(method: str, name: str) -> dict[str, Any]:
    """The TrainConfig field overrides of preset `name` for `method` (a copy), `preset` included."""
    if name not in PRESETS:
        raise InputError(f"unknown preset '{name}' (choose from: {', '.join(PRESET_NAMES)})")
    if method not in PRESETS[name]:
        raise InputError(f"preset '{name}' has no settings for method '{method}' (it has: {', '.join(sorted(PRESETS[name]))})")
    return {**copy.deepcopy(PRESETS[name][method]), "preset": name}


def apply_preset(settings: dict[str, Any], overrides: dict[str, Any], given: Collection[str]) -> dict[str, Any]:
    """`settings` (TrainConfig fields) with the preset's `overrides` applied, except to the fields
    in `given` (set explicitly by the user). Options merge, the user's keys winning; the preset's
    network options apply only to the preset's network."""
    merged = dict(settings)
    for field, value in overrides.items():
        if field in OPTION_FIELDS:
            continue
        if field not in given:
            merged[field] = value
    if merged.get("network") == overrides.get("network", merged.get("network")):
        merged["network_options"] = {**overrides.get("network_options", {}), **settings.get("network_options", {})}
    merged["method_options"] = {**overrides.get("method_options", {}), **settings.get("method_options", {})}
    return merged
