"""Dual-subnet contrastive learning: its pieces on hand-built tensors, its gradients, a real run."""

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
from semiseg.methods.dual_subnet import (
    class_prototypes,
    confident_disagreement,
    masked_l1,
    prototype_contrast,
    reliable_voxels,
)
from semiseg.models import load_model
from semiseg.networks import build_network
from semiseg.networks.resnet_segmenter import ResNetSegmenter
from semiseg.preprocessing import read_case
from semiseg.training import TrainConfig, train

from batches import tiny_batch

SAMPLE = Path(__file__).resolve().parents[1] / "resources" / "hippocampus"
TINY = {"base_filters": 4}
TINY_RESNET = {"second_network_options": {"blocks": [1, 1, 1, 1]}}


def _voxels(*rows: list[float]) -> torch.Tensor:
    """(1, C, 1, 1, N) class probabilities from N per-voxel rows."""
    return torch.tensor(rows).T.reshape(1, len(rows[0]), 1, 1, len(rows))


def test_m_diff_selects_exactly_the_confident_disagreeing_voxels():
    probs_a = _voxels([0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.5, 0.4, 0.1], [0.1, 0.05, 0.85], [0.75, 0.2, 0.05])
    probs_b = _voxels([0.05, 0.9, 0.05], [0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.85, 0.1, 0.05], [0.2, 0.75, 0.05])
    # voxel 0 and 3: both confident, different classes; 1: agree; 2: A unsure; 4: both below T = 0.8
    mask = confident_disagreement(probs_a, probs_b, threshold=0.7)
    assert mask.flatten().tolist() == [True, False, False, True, True]
    mask = confident_disagreement(probs_a, probs_b, threshold=0.8)
    assert mask.flatten().tolist() == [True, False, False, True, False]
    # Eq. 5: L1 of the two softmax vectors, averaged over M_diff
    expected = ((0.85 + 0.85 + 0.0) + (0.75 + 0.05 + 0.8)) / 2
    assert masked_l1(probs_a, probs_b, mask).item() == pytest.approx(expected)
    assert masked_l1(probs_a, probs_b, torch.zeros_like(mask)).item() == 0.0


def test_reliable_voxels_leave_out_the_highest_entropy_share():
    probs = _voxels([1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.9, 0.1, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.6, 0.4, 0.0])
    assert reliable_voxels(probs, unreliable_percent=40).flatten().tolist() == [True, False, True, False, True]
    assert reliable_voxels(probs, unreliable_percent=0).all()


def test_prototypes_are_the_means_of_the_reliable_embeddings_per_class():
    embeddings = torch.tensor([[1.0, 2.0], [3.0, 4.0], [-1.0, 0.0], [-3.0, 2.0], [7.0, 7.0]])
    classes = torch.tensor([0, 0, 2, 2, 0])
    prototypes, present = class_prototypes(embeddings, classes, num_classes=3)
    assert present.tolist() == [0, 2]  # class 1 has no reliable voxel: no prototype
    torch.testing.assert_close(prototypes, torch.tensor([[11 / 3, 13 / 3], [-2.0, 1.0]]))


def test_contrast_pulls_unreliable_voxels_to_their_prototype_and_pushes_prototypes_apart():
    # (1, E=2, 1, 1, 4): reliable voxels along +x (class 0) and -x (class 1); unreliable ones of class 0.
    def contrast(unreliable_vector, class_one_vector):
        vectors = torch.tensor([[1.0, 0.0], class_one_vector, unreliable_vector, unreliable_vector])
        embeddings = vectors.T.reshape(1, 2, 1, 1, 4)
        pseudo = torch.tensor([0, 1, 0, 0]).reshape(1, 1, 1, 4)
        reliable = torch.tensor([True, True, False, False]).reshape(1, 1, 1, 4)
        return prototype_contrast(embeddings, pseudo, reliable, num_classes=2).item()

    # At its prototype, prototypes opposite: CE over -[0, 4] squared distances, push 0.
    assert contrast([2.0, 0.0], [-1.0, 0.0]) == pytest.approx(math.log(1 + math.exp(-4)), rel=1e-5)
    # At the other prototype: CE over -[4, 0].
    assert contrast([-1.0, 0.0], [-1.0, 0.0]) == pytest.approx(math.log(1 + math.exp(4)), rel=1e-5)
    # Orthogonal prototypes: push = 1 - 2/4.
    assert contrast([1.0, 0.0], [0.0, 1.0]) == pytest.approx(math.log(1 + math.exp(-2)) + 0.5, rel=1e-5)


def test_schedules_at_start_middle_and_end():
    method = build_method("dual-subnet", 1, 3, NetworkSpec("vnet", TINY), TINY_RESNET)
    assert [method.contrast_weight(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([0.1 * math.exp(-4), 0.1 * math.exp(-1), 0.1])
    assert [method.confidence_threshold(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([0.6, 0.75, 0.9])
    printed = build_method("dual-subnet", 1, 3, NetworkSpec("vnet", TINY), {**TINY_RESNET, "contrast_schedule": "printed"})
    assert [printed.contrast_weight(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([0.1 * math.exp(4), 0.1 * math.exp(1), 0.1])


def test_resnet_subnet_matches_the_vnet_interface():
    resnet, vnet = build_network("resnet", 1, 3, base_filters=4), build_network("vnet", 1, 3, base_filters=4)
    x = torch.randn(2, 1, 16, 16, 16)
    assert [f.shape for f in resnet.encode(x)] == [f.shape for f in vnet.encode(x)]
    logits, embedding = resnet.decode(resnet.encode(x), return_embedding=True)
    assert logits.shape == (2, 3, 16, 16, 16) and embedding.shape == (2, resnet.embedding_width, 16, 16, 16)
    blocks = [sum(1 for _ in stage.children()) for stage in resnet.residual_stages]
    assert blocks == [3, 4, 6, 3]  # ResNet-34


def _method(**options):
    torch.manual_seed(0)
    # T = 0 so that M_diff holds every disagreement of two untrained subnets.
    return build_method("dual-subnet", 1, 3, NetworkSpec("vnet", TINY),
                        {**TINY_RESNET, "threshold_start": 0.0, "threshold_end": 0.0, **options})


def test_every_term_trains_both_subnets_and_the_ablations_drop_exactly_their_term():
    method = _method()
    assert isinstance(method.networks["subnet_b"], ResNetSegmenter)
    assert method.networks["subnet_b"].encoder_widths[0] == 4  # width follows the first subnet's
    labeled, unlabeled = tiny_batch()
    losses = method.training_step(labeled, unlabeled, StepInfo(50, 100))
    assert set(losses) == {"supervised", "unsupervised", "regularization", "contrastive"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    for term in ("unsupervised", "regularization", "contrastive"):
        for name in ("subnet_a", "subnet_b"):
            params = list(method.networks[name].parameters())
            grads = torch.autograd.grad(losses[term], params, retain_graph=True, allow_unused=True)
            assert any(g is not None and g.abs().sum() > 0 for g in grads), (term, name)
    assert set(method.predictors()) == {"subnet_a", "subnet_b"}
    for switch, term in (("use_regularization", "regularization"), ("use_contrastive", "contrastive")):
        ablated = _method(**{switch: False}).training_step(labeled, unlabeled, StepInfo(50, 100))
        assert set(ablated) == set(losses) - {term}
        for key, value in ablated.items():
            torch.testing.assert_close(value, losses[key])


def test_pseudo_labels_to_the_loser_train_only_the_subnet_with_the_higher_supervised_loss():
    labeled, unlabeled = tiny_batch()
    method = _method(pseudo_label_to="loser")
    images, count = torch.cat([labeled["image"], unlabeled["image"]]), labeled["image"].shape[0]  # as the step sees them (batch norm)
    supervised = {name: method.supervised_loss(method.networks[name](images)[:count], labeled["label"]) for name in ("subnet_a", "subnet_b")}
    loser = max(supervised, key=lambda name: supervised[name].item())
    losses = method.training_step(labeled, unlabeled, StepInfo(50, 100))
    for name in ("subnet_a", "subnet_b"):
        grads = torch.autograd.grad(losses["unsupervised"], list(method.networks[name].parameters()), retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == (name == loser), name
    # the same pseudo-label as with both learners: the loser's share of that sum
    both = _method().training_step(labeled, unlabeled, StepInfo(50, 100))
    assert 0 < losses["unsupervised"] < both["unsupervised"]
    with pytest.raises(InputError):
        _method(pseudo_label_to="winner")


def test_unlabeled_rampup_scales_the_unlabeled_terms_and_leaves_the_rest():
    labeled, unlabeled = tiny_batch()
    constant = _method().training_step(labeled, unlabeled, StepInfo(10, 100))
    ramped = _method(unlabeled_rampup=0.4).training_step(labeled, unlabeled, StepInfo(10, 100))
    weight = math.exp(-5 * (1 - 0.1 / 0.4) ** 2)  # progress 0.1 of a 0.4 ramp
    for term in ("unsupervised", "regularization"):
        torch.testing.assert_close(ramped[term], weight * constant[term])
    for term in ("supervised", "contrastive"):
        torch.testing.assert_close(ramped[term], constant[term])
    after = _method(unlabeled_rampup=0.4).training_step(labeled, unlabeled, StepInfo(50, 100))
    torch.testing.assert_close(after["unsupervised"], _method().training_step(labeled, unlabeled, StepInfo(50, 100))["unsupervised"])


def test_loss_falls_on_a_short_real_run_and_the_model_reloads(tmp_path):
    events: list[dict] = []
    config = TrainConfig(data=str(SAMPLE), output=str(tmp_path / "run"), method="dual-subnet", network="vnet",
                         network_options=TINY, method_options=TINY_RESNET, labeled="6", validation="0",
                         iterations=30, log_every=5, patch_size=(16, 32, 16), workers=0, device="cpu", seed=0)
    best = train(config, events.append)
    logged = [e["losses"] for e in events if e["type"] == "iteration"]
    assert len(logged) == 6 and set(logged[0]) == {"supervised", "unsupervised", "regularization", "contrastive"}
    # The supervised term: lambda_c's warm-up spans the run, so the contrastive term grows by design.
    supervised = [losses["supervised"] for losses in logged]
    assert np.mean(supervised[-2:]) < 0.9 * np.mean(supervised[:2]), logged
    model = load_model(best)
    assert set(model.method.predictors()) == {"subnet_a", "subnet_b"}
    image, _ = read_case(load_dataset(SAMPLE).cases[0])
    prediction = predict_volume(image, model.plan, model.predictors(), torch.device("cpu"))
    assert prediction.labels.shape == image.shape and prediction.disagreement is not None
    assert set(np.unique(prediction.labels.array)) <= {0, 1, 2}
