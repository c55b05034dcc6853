"""Voxel-wise adversarial learning: voxel sampling, gradient separation, ablations, schedule, a real run."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semiseg.datasets import load_dataset
from semiseg.inference import predict_volume
from semiseg.methods import build_method
from semiseg.methods.base import NetworkSpec, StepInfo
from semiseg.methods.voxel_adversarial import sample_class_voxels, within_class_shuffle
from semiseg.models import load_model
from semiseg.networks.discriminator import MultiResolutionVoxelFeatures
from semiseg.preprocessing import read_case
from semiseg.training import TrainConfig, train

from batches import tiny_batch

SAMPLE = Path(__file__).resolve().parents[1] / "resources" / "hippocampus"
TINY = {"base_filters": 4}


def test_voxel_features_equal_the_fused_full_resolution_map_at_the_sampled_voxels():
    torch.manual_seed(0)
    size = (8, 12, 8)
    features = [torch.randn(2, 3, 8, 12, 8), torch.randn(2, 5, 4, 6, 4), torch.randn(2, 7, 2, 3, 2)]
    fusion = MultiResolutionVoxelFeatures([3, 5, 7], width=6)
    # The paper's order: 1x1x1 conv per level, upsample to full resolution, add, 1x1x1 conv + ReLU.
    dense = sum(
        F.interpolate(F.conv3d(f, level.weight[..., None, None, None], level.bias), size=size, mode="trilinear", align_corners=False)
        for f, level in zip(features, fusion.levels)
    )
    conv = fusion.fuse[0]
    dense = F.relu(F.conv3d(dense, conv.weight[..., None, None, None], conv.bias))
    points = torch.tensor([[0, 0, 0, 0], [1, 7, 11, 7], [0, 3, 5, 2], [1, 4, 0, 6], [1, 1, 9, 3]])
    expected = dense[points[:, 0], :, points[:, 1], points[:, 2], points[:, 3]]
    torch.testing.assert_close(fusion(features, points, size), expected)


def test_class_sampling_takes_up_to_n_voxels_of_each_class_and_skips_excluded_ones():
    labels = torch.full((2, 4, 4, 4), 0)
    labels[0, :2] = 1
    labels[1, 0, 0, :3] = 2
    labels[1, 3] = -1  # below the pseudo-label threshold
    points, classes = sample_class_voxels(labels, per_class=5, num_classes=3)
    assert torch.bincount(classes, minlength=3).tolist() == [5, 5, 3]
    assert torch.equal(labels[points[:, 0], points[:, 1], points[:, 2], points[:, 3]], classes)
    assert len({tuple(p) for p in points.tolist()}) == len(points)  # without replacement
    shuffle = within_class_shuffle(classes)
    assert sorted(shuffle.tolist()) == list(range(len(classes))) and torch.equal(classes[shuffle], classes)


def _method(**options):
    torch.manual_seed(0)
    # Threshold 0: an untrained teacher is rarely 70 % sure, and the adversarial terms need fake voxels.
    return build_method("voxel-adversarial", 1, 3, NetworkSpec("vnet", TINY), {"pseudo_threshold": 0.0, **options})


def _has_grad(module: torch.nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_discriminator_and_segmentation_network_learn_only_from_their_own_terms():
    method = _method()
    specs = method.optimizers()
    assert specs["discriminator"].networks == ["discriminator"]
    assert (specs["discriminator"].kind, specs["discriminator"].lr, specs["discriminator"].betas) == ("adam", 2e-4, (0.5, 0.999))
    assert set(specs["main"].networks) == {"student", "projector", "predictor"}
    assert method.frozen_networks() == {"teacher", "projector_teacher"}
    labeled, unlabeled = tiny_batch()
    discriminator, student = method.networks["discriminator"], method.networks["student"]

    losses = method.training_step(labeled, unlabeled, StepInfo(50, 100))
    assert all(p.requires_grad for p in discriminator.parameters())  # restored after the generator's term
    losses["discriminator"].backward(retain_graph=True)
    assert _has_grad(discriminator) and not _has_grad(student)
    method.zero_grad(set_to_none=True)
    losses["adversarial"].backward(retain_graph=True)
    assert _has_grad(student.encoder) and not _has_grad(discriminator)
    method.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    assert all(p.grad is None for name in ("teacher", "projector_teacher") for p in method.networks[name].parameters())
    assert _has_grad(method.networks["projector"]) and _has_grad(method.networks["predictor"])


def test_terms_are_finite_and_the_ablation_switches_drop_exactly_their_term():
    labeled, unlabeled = tiny_batch()
    full = _method().training_step(labeled, unlabeled, StepInfo(50, 100))
    assert set(full) == {"supervised", "consistency", "feature", "discriminator", "adversarial"}
    assert all(torch.isfinite(v) and v > 0 for v in full.values()), full
    dropped = {"use_adversarial": {"adversarial", "discriminator"}, "use_feature": {"feature"}, "use_consistency": {"consistency"}}
    for switch, terms in dropped.items():
        method = _method(**{switch: False})
        ablated = method.training_step(labeled, unlabeled, StepInfo(50, 100))
        assert set(ablated) == set(full) - terms, switch
        torch.testing.assert_close(ablated["supervised"], full["supervised"])  # same seed, same student
        if switch == "use_adversarial":
            assert "discriminator" not in method.networks and set(method.optimizers()) == {"main"}
        if switch == "use_feature":
            assert not {"projector", "predictor", "projector_teacher"} & set(method.networks)


def test_consistency_warm_up_at_start_middle_and_end():
    method = _method()
    weights = [method.consistency_weight(p) for p in (0.0, 0.5, 1.0)]
    assert weights == pytest.approx([0.001 * math.exp(-5), 0.001 * math.exp(-1.25), 0.001])


def test_teacher_feature_layer_follows_the_student_by_ema():
    method = _method(ema_alpha=0.9)
    before = copy.deepcopy(method.networks["projector_teacher"].state_dict())
    with torch.no_grad():
        for p in method.networks["projector"].parameters():
            p.add_(1.0)
    method.after_step(StepInfo(50, 100))
    student = method.networks["projector"].state_dict()
    for key, value in method.networks["projector_teacher"].state_dict().items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value, 0.9 * before[key] + 0.1 * student[key])


def test_loss_falls_on_a_short_real_run_and_the_model_reloads(tmp_path):
    events: list[dict] = []
    config = TrainConfig(data=str(SAMPLE), output=str(tmp_path / "run"), method="voxel-adversarial", network="vnet",
                         network_options=TINY, labeled="6", validation="0", iterations=30, log_every=5,
                         patch_size=(16, 32, 16), workers=0, device="cpu", seed=0)
    best = train(config, events.append)
    logged = [e["losses"] for e in events if e["type"] == "iteration"]
    assert len(logged) == 6 and set(logged[0]) == {"supervised", "consistency", "feature", "discriminator", "adversarial"}
    # The supervised term: the discriminator's own loss plays a game (it does not fall with training).
    supervised = [losses["supervised"] for losses in logged]
    assert np.mean(supervised[-2:]) < 0.9 * np.mean(supervised[:2]), logged
    model = load_model(best)
    assert set(model.method.networks) == {"student", "teacher", "discriminator", "projector", "predictor", "projector_teacher"}
    image, _ = read_case(load_dataset(SAMPLE).cases[0])
    prediction = predict_volume(image, model.plan, model.predictors(), torch.device("cpu"))
    assert prediction.labels.shape == image.shape
    assert set(np.unique(prediction.labels.array)) <= {0, 1, 2}
