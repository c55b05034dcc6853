"""DK-UXNet: the k-means cross-attention, the UX-Net backbone, the dual contrastive loss, and a short
real run on the bundled hippocampus sample."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.datasets import load_dataset
from semiseg.errors import InputError
from semiseg.inference import predict_volume
from semiseg.methods import build_method
from semiseg.methods.base import NetworkSpec, StepInfo
from semiseg.methods.dk_uxnet import class_balanced_nll, info_nce, voxel_info_nce
from semiseg.models import load_model
from semiseg.networks import NETWORKS, build_network
from semiseg.networks.kmax import KMaXDecoder, aggregate_classes, kmeans_cross_attention
from semiseg.preprocessing import read_case
from semiseg.training import TrainConfig, train

SAMPLE = Path(__file__).resolve().parents[1] / "resources" / "hippocampus"
TINY_UXNET = {"base_filters": 4, "depths": [1, 1, 1, 1]}  # one UX block per stage halves the CPU time
TINY_KMAX = {"queries": 6, "query_dim": 16, "ffn_dim": 32, "heads": 2, "layers_per_scale": 1}
SIZE = (16, 32, 16)  # the smallest UX-Net patch whose 1/16 map has more than one voxel (instance norm)


def _method(network: str = "uxnet", **options):
    torch.manual_seed(0)
    network_options = TINY_UXNET if network == "uxnet" else {"base_filters": 4}
    return build_method("dk-uxnet", 1, 3, NetworkSpec(network, dict(network_options)), {**TINY_KMAX, **options})


def _batches(size=SIZE):
    """One labeled and one unlabeled patch: two patches, so each view has two negatives."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 1, *size, generator=generator)
    labeled = {"image": image, "image_strong": 1.1 * image + 0.1, "label": torch.randint(0, 3, (1, 1, *size), generator=generator)}
    image = torch.randn(1, 1, *size, generator=generator)
    return labeled, {"image": image, "image_strong": 0.9 * image - 0.1}


def test_kmeans_cross_attention_gives_each_voxel_one_cluster_and_sums_its_voxels():
    centers = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], requires_grad=True)
    pixels = torch.tensor([[[3.0, 1.0], [1.0, 2.0], [0.5, 0.4], [-1.0, -2.0]]])
    update, assignment = kmeans_cross_attention(centers, pixels, pixels)
    # C P^T per voxel: (3, 1) (1, 2) (0.5, 0.4) (-1, -2) -> clusters 0, 1, 0, 0
    expected = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
    assert torch.equal(assignment, expected) and torch.equal(assignment.sum(-1), torch.ones(1, 4))
    torch.testing.assert_close(update, torch.tensor([[[3.0 + 0.5 - 1.0, 1.0 + 0.4 - 2.0], [1.0, 2.0]]]))
    torch.testing.assert_close(update, expected.transpose(1, 2) @ pixels)
    update.sum().backward()  # the straight-through softmax path trains the centres through A too
    assert centers.grad is not None and centers.grad.abs().sum() > 0


def test_aggregated_segmentation_is_the_mask_weighted_class_distribution():
    generator = torch.Generator().manual_seed(0)
    masks = torch.randn(2, 5, 3, 4, 2, generator=generator).softmax(1)
    class_logits = torch.randn(2, 5, 3, generator=generator)
    log_probs = aggregate_classes(masks, class_logits)
    expected = (masks[:, :, None] * class_logits.softmax(-1)[..., None, None, None]).sum(1)
    torch.testing.assert_close(log_probs.exp(), expected)
    torch.testing.assert_close(log_probs.softmax(1), expected)  # what inference's softmax sees


def test_mask_logits_are_the_normalised_pixel_head_times_the_mask_kernels():
    torch.manual_seed(0)
    decoder = KMaXDecoder([16, 8, 4], 4, 3, queries=6, dim=16, layers_per_scale=1, heads=2, ffn_dim=32)
    embedding, kernels = torch.randn(2, 4, 3, 5, 4), torch.randn(2, 6, 16)
    pixels = torch.nn.functional.normalize(decoder.pixel_head(embedding.movedim(1, -1)).movedim(-1, 1), dim=1)  # (B, dim, ...)
    torch.testing.assert_close(decoder._mask_logits(embedding, kernels), torch.einsum("bc...,bnc->bn...", pixels, kernels))


def test_uxnet_features_and_odd_sized_inputs():
    assert NETWORKS["uxnet"] is not None
    net = build_network("uxnet", 1, 3, base_filters=4).eval()
    features = net.encode(torch.randn(1, 1, 16, 32, 16))
    assert [f.shape[1] for f in features] == net.encoder_widths == [4, 8, 16, 32, 64]
    assert [tuple(f.shape[2:]) for f in features] == [(16 // 2**i, 32 // 2**i, 16 // 2**i) for i in range(5)]
    with torch.no_grad():
        assert net(torch.randn(1, 1, 17, 23, 19)).shape == (1, 3, 17, 23, 19)
        method = _method().eval()
        log_probs = method.predictors()["dk-uxnet"](torch.randn(2, 1, 17, 23, 19))
    assert log_probs.shape == (2, 3, 17, 23, 19)
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(2, 17, 23, 19))


def test_info_nce_is_minimal_for_identical_views_and_grows_for_shuffled_ones():
    temperature = 0.5
    views = torch.eye(4)[:3, :, None, None, None].expand(3, 4, 2, 2, 2)  # patch i: class i everywhere
    identical = voxel_info_nce(views, views, temperature)
    # each anchor: its positive at cosine 1, four negatives (two views of two other patches) at 0
    assert identical.item() == pytest.approx(-math.log(math.exp(1 / temperature) / (math.exp(1 / temperature) + 4)), rel=1e-5)
    shuffled = voxel_info_nce(views, views[[1, 2, 0]], temperature)
    noisy = voxel_info_nce(views, (views + 0.5 * torch.rand(views.shape, generator=torch.Generator().manual_seed(0))), temperature)
    assert identical < noisy < shuffled


def test_training_step_terms_are_finite_and_gradients_reach_backbone_decoder_and_queries():
    method = _method(segc=True)  # the paper's full loss; the default leaves L_segc off
    spec = method.optimizers()["main"]
    assert (spec.kind, spec.lr, spec.schedule, sorted(spec.networks)) == ("adamw", 1e-4, "constant", ["backbone", "kmax"])
    losses = method.training_step(*_batches(), StepInfo(0, 10))
    assert set(losses) == {"supervised", "query_distribution", "semantic", "segc", "qdc"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    sum(losses.values()).backward()
    backbone, kmax = method.networks["backbone"], method.networks["kmax"]
    assert all(p.grad is not None for p in backbone.parameters())
    assert all(p.grad is not None for p in kmax.parameters())
    for module in (backbone.stages, backbone.skips, backbone.up, backbone.last, backbone.head, kmax.layers[0].center_keys):
        assert sum(p.grad.abs().sum() for p in module.parameters()) > 0
    assert kmax.centers.grad.abs().sum() > 0


def test_without_the_auxiliary_semantic_loss_the_backbone_head_is_left_alone():
    method = _method(semantic_weight=0.0)
    losses = method.training_step(*_batches(), StepInfo(0, 10))
    assert "semantic" not in losses
    sum(losses.values()).backward()
    assert all(p.grad is None for p in method.networks["backbone"].head.parameters())


def test_class_balanced_nll_weighs_each_class_equally():
    # four voxels: three of class 0 with p = 0.9, one of class 1 with p = 0.1
    log_probs = torch.tensor([[0.9, 0.9, 0.9, 0.9], [0.1, 0.1, 0.1, 0.1]]).log()[None]  # (1, 2, 4)
    target = torch.tensor([[0, 0, 0, 1]])
    balanced = class_balanced_nll(log_probs, target)
    assert balanced.item() == pytest.approx((-math.log(0.9) - math.log(0.1)) / 2)
    assert balanced > torch.nn.functional.nll_loss(log_probs, target)  # the voxel mean: (3 * 0.105 + 2.303) / 4
    assert class_balanced_nll(log_probs, torch.zeros(1, 4, dtype=torch.long)).item() == pytest.approx(-math.log(0.9))


def test_query_distribution_sums_grouped_masks_and_works_with_other_backbones():
    method = _method("vnet", queries=7)
    assert method.query_groups.sum(0).tolist() == [3.0, 2.0, 2.0]  # contiguous near-equal groups, one per class
    labeled, unlabeled = _batches((16, 16, 16))
    _, distribution, _ = method.segment(torch.cat([labeled["image"], unlabeled["image"]]))
    torch.testing.assert_close(distribution.sum(1), torch.ones(2, 16, 16, 16))
    losses = method.training_step(labeled, unlabeled, StepInfo(0, 10))
    assert all(torch.isfinite(v) for v in losses.values())


def test_ablation_switches_drop_their_terms():
    labeled, unlabeled = _batches((16, 16, 16))
    assert set(_method("vnet", segc=True, qdc=False).training_step(labeled, unlabeled, StepInfo(0, 10))) == {"supervised", "query_distribution", "semantic", "segc"}
    assert set(_method("vnet").training_step(labeled, unlabeled, StepInfo(0, 10))) == {"supervised", "query_distribution", "semantic", "qdc"}
    supervised_only = _method("vnet", segc=False, qdc=False).training_step(labeled, None, StepInfo(0, 10))
    assert set(supervised_only) == {"supervised", "query_distribution", "semantic"}


def test_volume_and_voxel_level_contrast():
    # three patches, two voxels: voxel 0 holds each patch's own class, voxel 1 is the same everywhere
    temperature = 0.5
    patches = torch.zeros(3, 3, 2)
    patches[torch.arange(3), torch.arange(3), 0] = 1.0
    patches[:, :, 1] = torch.tensor([1.0, 0.0, 0.0])
    views = patches[..., None, None]  # (B, C, 2, 1, 1)
    positive, four = math.exp(1 / temperature), 4
    # per voxel: voxel 0 tells the patches apart, voxel 1 cannot (all five candidates at cosine 1)
    per_voxel = (-math.log(positive / (positive + four)) + math.log(5)) / 2
    assert info_nce(views, views, temperature, "voxel").item() == pytest.approx(per_voxel, rel=1e-5)
    # per patch: the flattened patches share exactly voxel 1's vector, so any two meet at cosine 1/2
    expected = -math.log(positive / (positive + four * math.exp(0.5 / temperature)))
    assert info_nce(views, views, temperature, "volume").item() == pytest.approx(expected, rel=1e-5)
    labeled, unlabeled = _batches((16, 16, 16))
    losses = _method("vnet", contrast_level="voxel").training_step(labeled, unlabeled, StepInfo(0, 10))
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    with pytest.raises(InputError):
        _method("vnet", contrast_level="pixel")


def test_training_step_runs_under_autocast():
    method = _method()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = method.training_step(*_batches(), StepInfo(0, 10))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_short_real_run_reduces_the_loss_and_the_checkpoint_predicts(tmp_path):
    events: list[dict] = []
    config = TrainConfig(
        data=str(SAMPLE), output=str(tmp_path / "run"), method="dk-uxnet", network="uxnet", network_options=TINY_UXNET,
        method_options={**TINY_KMAX, "lr": 2e-3}, labeled="6", validation="0", iterations=30, log_every=5,
        patch_size=SIZE, workers=0, device="cpu", seed=0,
    )  # lr: the paper's 1e-4 (AdamW) hardly moves the loss in 30 iterations
    best = train(config, events.append)
    logged = [e for e in events if e["type"] == "iteration"]
    assert len(logged) == 6 and set(logged[0]["losses"]) == {"supervised", "query_distribution", "semantic", "qdc"}  # L_segc off by default
    losses = [e["loss"] for e in logged]
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2]), losses
    model = load_model(best)
    image, _ = read_case(load_dataset(SAMPLE).cases[0])
    prediction = predict_volume(image, model.plan, model.predictors(), torch.device("cpu"), overlap=0.25)  # fewer windows
    assert prediction.labels.shape == image.shape and prediction.labels.geometry == image.geometry
    assert set(np.unique(prediction.labels.array)) <= {0, 1, 2}
