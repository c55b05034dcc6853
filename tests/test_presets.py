"""`--preset paper`: each method's published protocol, checked against tables written here from the
papers and the UA-MT / SSL4MIS code, and the trainer pieces it needs (UA-MT's ramp-up and step
schedule, VNet dropout, student-only prediction, UA-MT's augmentation, a fresh stage for SSCL),
training on the bundled hippocampus sample."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.checkpoint import read_meta
from semiseg.cli import build_parser, explicit_arguments, main
from semiseg.config import from_arguments, resolve_settings
from semiseg.errors import InputError
from semiseg.methods import METHODS, build_method, method_class
from semiseg.methods.base import NetworkSpec, StepInfo, consistency_rampup
from semiseg.models import load_model
from semiseg.networks import build_network
from semiseg.presets import PAPER, apply_preset, resolve_preset
from semiseg.sampling import PatchDataset, Volumes
from semiseg.training import TrainConfig, lr_factor

SAMPLE = Path(__file__).resolve().parents[1] / "resources" / "hippocampus"
pytestmark = pytest.mark.usefixtures("one_thread")

# What UA-MT's code sets (yulequan/UA-MT code/train_LA_meanteacher_certainty_unlabel.py): VNet(has_dropout=True)
# l. 89; optim.SGD(lr=0.01, momentum=0.9, weight_decay=0.0001) l. 121 (no nesterov); lr_ = base_lr * 0.1 **
# (iter_num // 2500) l. 239-240; max_iterations 6000; labeled_bs 2 of batch_size 4; RandomRotFlip + RandomCrop
# l. 102-103; no autocast.
UA_MT_CODE = {"network": "vnet", "network_options": {"dropout": True}, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
              "nesterov": False, "weight_decay": 1e-4, "lr_schedule": "step", "iterations": 6000, "batch_size": 2,
              "augmentation": "ua-mt", "amp": False}


def check_preset(method: str, expected: dict) -> None:
    """The preset equals `expected`, every option exists for the method, and the settings make a TrainConfig."""
    resolved = resolve_preset(method, "paper")
    assert resolved == {**expected, "preset": "paper"}
    assert set(resolved["method_options"]) <= set(method_class(method).defaults)
    assert resolved["network"] == method_class(method).paper_network
    TrainConfig(data="d", output="o", method=method, **resolved)


def test_every_method_has_a_paper_preset():
    assert set(PAPER) == set(METHODS)


def test_supervised_is_ua_mt_train_la():
    # UA-MT code/train_LA.py: batch_size 4 (all labeled) l. 29, VNet has_dropout=True l. 68, 0.5 * (CE + Dice).
    check_preset("supervised", {**UA_MT_CODE, "batch_size": 4, "method_options": {"supervised_loss": "half-dice+ce"}})


def test_mean_teacher_is_ua_mt():
    # UA-MT l. 36-39: ema_decay 0.99, consistency 0.1, consistency_rampup 40.0; l. 171
    # sigmoid_rampup(iter_num // 150); l. 146 noise clamp(randn * 0.1, -0.2, 0.2); l. 169
    # 0.5 * (loss_seg + loss_seg_dice); test_LA.py l. 27-29 loads the student's saved weights.
    check_preset("mean-teacher", {**UA_MT_CODE, "method_options": {
        "ema_alpha": 0.99, "consistency": 0.1, "rampup_epochs": 40, "noise": 0.1,
        "supervised_loss": "half-dice+ce", "predict_with": "student"}})


def test_cps_is_ssl4mis():
    # SSL4MIS code/train_cross_pseudo_supervision_3D.py: max_iterations 30000 (l. 38-39), consistency 0.1 and
    # consistency_rampup 200.0 (l. 60-63) with iter_num // 150 (l. 159), CE cross terms on [labeled_bs:] (l. 171-172),
    # 0.5 * (CE + Dice) (l. 161-166), SGD momentum 0.9 / weight decay 1e-4 (l. 133-136), poly lr (l. 189).
    check_preset("cps", {**UA_MT_CODE, "lr_schedule": "poly", "iterations": 30000, "method_options": {
        "cps_weight": 0.1, "rampup_epochs": 200, "cross_on": "unlabeled", "supervised_loss": "half-dice+ce"}})


def test_sscl_is_its_implementation_details():
    # SSCL Sec. 4.2: SGD lr 0.01, weight decay 1e-4, momentum 0.9, VNet, batch 2 + 2, pre-training 4k and formal
    # 30k iterations, rotation and flip; Eq. 6 lambda 0.5; Eq. 10 alpha 0.999; Fig. 6 threshold 0.5.
    check_preset("sscl", {**UA_MT_CODE, "iterations": 34000, "method_options": {
        "pretrain": 4 / 34, "pretrain_stage": True, "unsup_weight": 0.5, "threshold": 0.5, "ema_alpha": 0.999}})
    assert round(resolve_preset("sscl", "paper")["method_options"]["pretrain"] * 34000) == 4000


def test_dual_subnet_is_its_implementation_details():
    # Dual-subnet Sec. 4: SGD weight decay 1e-4, momentum 0.9, lr 0.01 / 10 every 2500 iterations, 6000 iterations,
    # batch 2 + 2, lambda_u = 1.0, lambda_c = 0.1 e^{4 (1 - t/t_max)^2} (as printed).
    check_preset("dual-subnet", {**UA_MT_CODE, "method_options": {
        "unlabeled_weight": 1.0, "contrast_weight": 0.1, "contrast_schedule": "printed"}})


def test_voxel_adversarial_is_its_la_settings():
    # Voxel-adversarial Sec. IV-B: SGD (0.9, 1e-4), 6000 iterations, lr 0.01 / 10 every 2500; discriminator Adam
    # (0.5, 0.999) lr 0.0002; alpha 0.01, beta 0.1; gamma(t) = 0.001 e^{-5 (1 - t/t_max)^2}; widths 64; t 0.7;
    # Eq. 4 Dice only; "only the VNet framework was used for segmentation".
    check_preset("voxel-adversarial", {**UA_MT_CODE, "method_options": {
        "supervised_loss": "dice", "predict_with": "student", "consistency": 0.001, "rampup": 1.0, "alpha": 0.01,
        "beta": 0.1, "pseudo_threshold": 0.7, "feature_width": 64, "discriminator_lr": 2e-4,
        "discriminator_betas": [0.5, 0.999]}})


def test_dk_uxnet_is_its_section_3_2():
    # DK-UXNet Sec. 3.2: batch 4 = two samples, each in a weak and a strong view; 112x112x80 random crops
    # "following [23]" (UA-MT); AdamW, initial lr 0.0001; the 3D UX-Net backbone (Sec. 2.2); Eq. 3's L_segc
    # and L_qdc both on (the default leaves L_segc off).
    check_preset("dk-uxnet", {"network": "uxnet", "batch_size": 1, "augmentation": "ua-mt", "amp": False,
                              "method_options": {"lr": 1e-4, "segc": True}})


def test_3d_cps_is_its_table_2():
    # 3D-CPS Table 2: batch 2 in D_l and 2 in D_u, 1000 epochs (nnU-Net: 250 iterations each), SGD, weight decay
    # 3e-5, initial lr 0.01; Sec. 2.2 lambda up to 0.5; nnU-Net's residual U-Net, mixed precision.
    check_preset("3d-cps", {"network": "residual-unet", "iterations": 250_000, "batch_size": 2, "amp": True,
                            "method_options": {"lr": 0.01, "weight_decay": 3e-5, "cps_weight": 0.5}})


def test_unknown_preset_or_method_is_an_input_error():
    with pytest.raises(InputError, match="unknown preset 'book'"):
        resolve_preset("mean-teacher", "book")
    with pytest.raises(InputError, match="no settings for method 'nope'"):
        resolve_preset("nope", "paper")


# Ramp-up and learning-rate schedule ------------------------------------------------------------

def test_ua_mt_ramp_up_at_0_2400_6000():
    options = {"rampup_epochs": 40, "rampup": 0.4}
    weights = [consistency_rampup(StepInfo(i, 6000), options) for i in (0, 2400, 6000)]
    assert weights[0] == pytest.approx(math.exp(-5.0))  # iteration 0: epoch 0
    assert weights[1] == pytest.approx(math.exp(-5.0 * (1 - 16 / 40) ** 2)) == pytest.approx(0.165, abs=5e-4)
    assert weights[2] == 1.0
    # The project's default ramp (40 % of the run) is already at full weight at iteration 2400.
    assert consistency_rampup(StepInfo(2400, 6000), {"rampup": 0.4, "rampup_epochs": None}) == 1.0
    # Constant within each 150-iteration "epoch", as iter_num // 150.
    assert consistency_rampup(StepInfo(2549, 6000), options) == weights[1]


def _learning_rates(factor, base: float, at: list[int]) -> dict[int, float]:
    """The learning rate the optimizer uses for step `it` (0-based), stepping a real LambdaLR as the trainer does."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=base)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    rates = {}
    for it in range(max(at) + 1):
        if it in at:
            rates[it] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    return rates


def test_step_schedule_divides_by_10_every_2500_iterations():
    rates = _learning_rates(lr_factor("step", 6000), 0.01, [0, 2499, 2500, 5000])
    assert rates == pytest.approx({0: 0.01, 2499: 0.01, 2500: 0.001, 5000: 0.0001})


def test_a_stage_start_restarts_the_schedule():
    rates = _learning_rates(lr_factor("step", 34000, [4000]), 0.01, [3999, 4000, 6499, 6500])
    assert rates == pytest.approx({3999: 0.001, 4000: 0.01, 6499: 0.01, 6500: 0.001})
    # Without stages, poly is the trainer's former schedule.
    assert lr_factor("poly", 100)(30) == pytest.approx((1 - 30 / 100) ** 0.9)
    with pytest.raises(InputError, match="unknown learning-rate schedule"):
        lr_factor("cosine", 100)


# Networks and predictors -------------------------------------------------------------------------

def test_paper_vnet_has_active_dropout_in_train_mode():
    network = build_network("vnet", 1, 2, **{**PAPER["mean-teacher"]["network_options"], "base_filters": 4})
    assert any(isinstance(m, torch.nn.Dropout3d) and m.p == 0.5 for m in network.modules())
    image = torch.randn(1, 1, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    network.train()
    torch.manual_seed(0)
    first = network(image)
    torch.manual_seed(1)
    assert not torch.allclose(first, network(image))  # other channels dropped
    network.eval()
    assert torch.equal(network(image), network(image))
    plain = build_network("vnet", 1, 2, base_filters=4).train()
    assert not any(isinstance(m, torch.nn.Dropout3d) for m in plain.modules())


@pytest.mark.parametrize("method", ["mean-teacher", "voxel-adversarial"])
def test_teacher_methods_predict_with_the_student_under_the_preset(method):
    preset = resolve_preset(method, "paper")
    network = NetworkSpec("vnet", {**preset["network_options"], "base_filters": 4})
    with_preset = build_method(method, 1, 3, network, preset["method_options"])
    assert list(with_preset.predictors()) == ["student"]
    assert with_preset.predictors()["student"] is with_preset.networks["student"]
    assert list(build_method(method, 1, 3, network).predictors()) == ["student", "teacher"]
    with pytest.raises(InputError, match="predict_with 'teacher'"):
        build_method(method, 1, 3, network, {"predict_with": "teacher"})


def test_the_dice_loss_alone_and_half_dice_ce_differ_from_the_default():
    logits = torch.randn(2, 3, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    label = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=torch.Generator().manual_seed(1))
    losses = {kind: float(build_method("supervised", 1, 3, NetworkSpec("vnet", {"base_filters": 4}),
                                       {"supervised_loss": kind}).supervised_loss(logits, label))
              for kind in ("dice+ce", "half-dice+ce", "dice")}
    cross_entropy = float(torch.nn.functional.cross_entropy(logits, label[:, 0]))
    assert losses["half-dice+ce"] == pytest.approx(0.5 * (cross_entropy + losses["dice"]))
    assert 0 < losses["dice"] < 1 and losses["dice+ce"] != pytest.approx(losses["half-dice+ce"])


# Augmentation ------------------------------------------------------------------------------------

def test_ua_mt_augmentation_is_a_turned_flipped_crop():
    shape = (20, 30, 26)
    volume = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)  # every voxel names its position
    patch = (8, 12, 10)
    dataset = PatchDataset(Volumes([volume], [volume.copy()]), patch, seed=3, strong_view=False, augmentation="ua-mt")
    assert dataset.foreground is None and dataset.spatial is None  # uniform crops, no MONAI transforms
    turned = set()
    for index in range(24):
        sample = dataset[index]
        assert torch.equal(sample["image"], sample["label"].float())  # image and label turned alike
        values = sample["image"][0].double().numpy()
        assert values.shape == patch
        z, y, x = np.unravel_index(values.astype(np.int64), shape)
        assert (np.diff(z, axis=0) == 1).all() and (np.diff(z, axis=(1)) == 0).all()  # z untouched
        # The patch covers a box of the scan: y x x of 12 x 10, or 10 x 12 after an odd quarter turn.
        box = (y.max() - y.min() + 1, x.max() - x.min() + 1)
        assert box in ((12, 10), (10, 12)) and len(np.unique(values)) == values.size
        turned.add(box)
    assert turned == {(12, 10), (10, 12)}
    with pytest.raises(InputError, match="unknown augmentation"):
        PatchDataset(Volumes([volume]), patch, seed=0, augmentation="nnunet")


# Command line ------------------------------------------------------------------------------------

def _settings(*argv: str) -> dict:
    argv = ["train", "--data", "d", "--out", "o", *argv]
    return resolve_settings(from_arguments(build_parser().parse_args(argv)).to_dict(), explicit_arguments(argv))


def test_explicit_flags_win_and_the_paper_network_is_the_default():
    assert _settings("--method", "dk-uxnet")["network"] == "uxnet"  # no --network: the paper's
    assert _settings("--method", "dk-uxnet", "--network", "vnet")["network"] == "vnet"
    assert _settings("--method", "mean-teacher")["network"] == "vnet" and _settings()["preset"] is None
    settings = _settings("--method", "mean-teacher", "--preset", "paper", "--lr", "0.05", "--option", "consistency=0.2")
    assert settings["lr"] == 0.05  # typed, even though it is the flag's default
    assert settings["iterations"] == 6000 and settings["lr_schedule"] == "step" and settings["preset"] == "paper"
    assert settings["method_options"]["consistency"] == 0.2 and settings["method_options"]["rampup_epochs"] == 40
    # Another network than the preset's: the preset's VNet options stay off it.
    other = _settings("--preset", "paper", "--network", "unet")
    assert other["network"] == "unet" and other["network_options"] == {}
    assert apply_preset({"network": "vnet", "network_options": {"dropout": False}}, PAPER["supervised"], set())["network_options"] == {"dropout": False}


def test_train_with_the_paper_preset_records_it_in_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data", str(SAMPLE), "--out", str(out), "--method", "mean-teacher", "--preset", "paper",
                 "--iterations", "2", "--network-option", "base_filters=4", "--labeled", "25%", "--workers", "0",
                 "--device", "cpu", "--log-every", "1"])
    assert code == 0, capsys.readouterr().err
    meta = read_meta(out / "last")
    preset = resolve_preset("mean-teacher", "paper")
    assert meta["train_config"]["preset"] == "paper"
    config = meta["train_config"]
    for field in ("lr", "lr_schedule", "nesterov", "weight_decay", "augmentation", "amp", "batch_size"):
        assert config[field] == preset[field], field
    assert config["iterations"] == 2 and meta["iteration"] == 2  # the explicit flag won
    assert meta["model"]["network"]["options"] == {"dropout": True, "base_filters": 4}
    assert {k: meta["model"]["options"][k] for k in preset["method_options"]} == preset["method_options"]
    assert list(load_model(out / "last").method.predictors()) == ["student"]
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["lr"]["main"] for e in events if e["type"] == "iteration"] == [0.01, 0.01]  # step: no decay yet


def test_sscl_pre_training_is_a_stage_with_fresh_optimizers(tmp_path):
    from semiseg.training import train

    config = TrainConfig(data=str(SAMPLE), output=str(tmp_path / "run"), method="sscl", network="vnet",
                         network_options={"base_filters": 4}, method_options={"pretrain": 0.5, "pretrain_stage": True},
                         labeled="25%", iterations=4, lr=0.01, log_every=1, validate_every=100, workers=0, device="cpu")
    events: list[dict] = []
    train(config, events.append)
    rates = [e["lr"]["segmentation"] for e in events if e["type"] == "iteration"]
    # Poly over each 2-iteration stage: the rate after iteration 2 is back at 0.01.
    assert rates == pytest.approx([0.01 * 0.5 ** 0.9, 0.01, 0.01 * 0.5 ** 0.9, 0.0])
    method = build_method("sscl", 1, 3, NetworkSpec("vnet", {"base_filters": 4}), {"pretrain": 4 / 34, "pretrain_stage": True})
    assert method.stage_starts(34000) == [4000]
    assert build_method("sscl", 1, 3, NetworkSpec("vnet", {"base_filters": 4})).stage_starts(34000) == []
