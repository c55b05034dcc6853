"""SSCL: spectral encoder, commonality module, gradient routing, EMA, ablation switches, real run."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.datasets import load_dataset
from semiseg.inference import predict_volume
from semiseg.methods import build_method
from semiseg.methods.base import NetworkSpec, StepInfo
from semiseg.methods.sscl import CommonFeaturePredictor, SpatialSpectralNet
from semiseg.models import load_model
from semiseg.networks import build_network
from semiseg.networks.ffc import FourierUnit, SpectralEncoder
from semiseg.preprocessing import read_case
from semiseg.training import TrainConfig, train

from batches import tiny_batch

pytestmark = pytest.mark.usefixtures("one_thread")
SAMPLE = Path(__file__).resolve().parents[1] / "resources" / "hippocampus"
TINY = NetworkSpec("vnet", {"base_filters": 4})
AFTER_PRETRAINING = StepInfo(50, 100)


def _sscl(**options):
    torch.manual_seed(0)
    return build_method("sscl", 1, 3, TINY, options)


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_fourier_unit_keeps_the_grid_and_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    unit = FourierUnit(2, 3)
    x = torch.randn(2, 2, 8, 9, 7)  # odd sides: the inverse real FFT must restore them exactly
    assert unit(x).shape == (2, 3, 8, 9, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert unit(x.bfloat16()).dtype == torch.float32


def test_spectral_encoder_transforms_every_level_and_changes_the_student(monkeypatch):
    calls = []
    forward_fft = torch.fft.rfftn
    monkeypatch.setattr(torch.fft, "rfftn", lambda *a, **k: calls.append(a[0].shape) or forward_fft(*a, **k))
    encoder = SpectralEncoder(1, [4, 8, 16, 32, 64])
    features = encoder(torch.randn(2, 1, 32, 32, 16))
    assert features.shape == (2, 64, 2, 2, 1)  # the VNet's deepest features
    assert [shape[1:] for shape in calls] == [(1, 32, 32, 16), (8, 16, 16, 8), (16, 8, 8, 4), (32, 4, 4, 2), (64, 2, 2, 1)]

    # Train mode: batch statistics keep the deepest features' effect visible in an untrained VNet.
    student = _sscl().networks["student"].train()
    image = torch.randn(2, 1, 16, 16, 16)
    before = student(image)
    with torch.no_grad():
        for block in student.spectral.blocks:
            block.conv.weight.zero_()
    assert (before - student(image)).abs().max() > 0.1


def test_losses_are_finite_and_each_reaches_only_the_networks_the_paper_updates():
    method = _sscl()
    losses = method.training_step(*tiny_batch(), AFTER_PRETRAINING)
    assert set(losses) == {"reconstruction", "supervised", "unsupervised"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    student, teacher, reconstruction = (method.networks[n] for n in ("student", "teacher", "reconstruction"))

    (losses["supervised"] + losses["unsupervised"]).backward(retain_graph=True)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.spatial.parameters() if p.dim() > 1)
    assert all(p.grad is not None for p in student.spectral.parameters())
    assert all(p.grad is None for p in reconstruction.parameters())
    assert all(p.grad is None for p in teacher.parameters())

    student.zero_grad(set_to_none=True)
    losses["reconstruction"].backward()
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in reconstruction.parameters())
    assert set(method.optimizers()) == {"segmentation", "reconstruction"}
    assert method.optimizers()["reconstruction"].networks == ["reconstruction"]


def test_pseudo_label_loss_is_dice_ce_on_the_confident_voxels_only():
    method = _sscl()
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 8, 8, 8, generator=generator)
    target = torch.randint(0, 3, (2, 8, 8, 8), generator=generator)
    certain = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float()
    torch.testing.assert_close(method.pseudo_label_loss(logits, certain), method.supervised_loss(logits, target[:, None]))
    # Voxels below the 0.5 threshold are left out: relabelling them does not change the loss.
    unsure = certain.clone()
    unsure[:, :, :4] = torch.tensor([0.4, 0.35, 0.25])[:, None, None, None]
    relabelled = unsure.clone()
    relabelled[:, :, :4] = torch.tensor([0.25, 0.35, 0.4])[:, None, None, None]
    assert method.pseudo_label_loss(logits, unsure) == pytest.approx(float(method.pseudo_label_loss(logits, relabelled)))
    assert method.pseudo_label_loss(logits, unsure) != pytest.approx(float(method.pseudo_label_loss(logits, certain)))


def test_pretraining_stage_then_the_ema_formula():
    method = _sscl(ema_alpha=0.9, pretrain=0.2)
    losses = method.training_step(*tiny_batch(), StepInfo(19, 100))
    assert losses["unsupervised"] == 0 and losses["supervised"] > 0
    assert method.training_step(*tiny_batch(), StepInfo(20, 100))["unsupervised"] > 0
    assert [method.ema_alpha(StepInfo(i, 100)) for i in (0, 19, 20, 21, 22)] == [0.0, 0.0, 0.0, 0.5, pytest.approx(2 / 3)]
    assert method.ema_alpha(StepInfo(90, 100)) == 0.9

    teacher, student = method.networks["teacher"], method.networks["student"]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = copy.deepcopy(teacher.state_dict())
    method.after_step(StepInfo(90, 100))
    for key, value in teacher.state_dict().items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value, 0.9 * before[key] + 0.1 * student.state_dict()[key])
    method.after_step(StepInfo(20, 100))  # first formal iteration: the teacher starts as the student
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, student.state_dict()[key])


def test_ablation_switches_remove_exactly_their_modules():
    vnet = _parameters(build_network("vnet", 1, 3, base_filters=4))
    spectral = _parameters(SpectralEncoder(1, [4, 8, 16, 32, 64]))
    full, no_rec, no_ffc, neither = (_sscl(reconstruction=r, spectral=s) for r, s in ((True, True), (False, True), (True, False), (False, False)))
    assert _parameters(full.networks["reconstruction"]) == _parameters(build_network("vnet", 1, 1, base_filters=4))
    assert _parameters(full.networks["student"]) == vnet + spectral
    assert _parameters(no_ffc.networks["student"]) == vnet and no_ffc.networks["student"].spectral is None
    assert set(no_rec.networks) == set(neither.networks) == {"student", "teacher"}
    assert set(no_rec.optimizers()) == {"segmentation"}
    assert set(no_rec.training_step(*tiny_batch(), AFTER_PRETRAINING)) == {"supervised", "unsupervised"}
    assert _parameters(neither.networks["student"]) == vnet
    assert isinstance(full.predictors()["student"], CommonFeaturePredictor)
    assert isinstance(no_rec.predictors()["student"], SpatialSpectralNet) and len(no_rec.predictors()) == 1


def test_short_real_run_reduces_its_losses_and_reloads_to_predict(tmp_path):
    events: list[dict] = []
    config = TrainConfig(data=str(SAMPLE), output=str(tmp_path / "run"), method="sscl", network="vnet",
                         network_options={"base_filters": 4}, labeled="6", validation="0", iterations=25, log_every=5,
                         patch_size=(32, 32, 32), workers=0, device="cpu", seed=0)
    best = train(config, events.append)
    logged = [e["losses"] for e in events if e["type"] == "iteration"]
    assert len(logged) == 5
    # L_unsup is off for the first 4/34 of the run and then joins, so the total is not monotone:
    # the supervised and the reconstruction terms must fall.
    for term in ("supervised", "reconstruction"):
        series = [entry[term] for entry in logged]
        assert np.mean(series[-2:]) < 0.9 * np.mean(series[:2]), (term, series)
    assert logged[-1]["unsupervised"] > 0

    model = load_model(best)
    assert set(model.method.networks) == {"student", "teacher", "reconstruction"}
    image, _ = read_case(load_dataset(SAMPLE).cases[0])
    prediction = predict_volume(image, model.plan, model.predictors(), torch.device("cpu"))
    assert prediction.labels.shape == image.shape and prediction.disagreement is None
    assert set(np.unique(prediction.labels.array)) <= {0, 1, 2}
