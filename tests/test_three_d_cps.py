"""3D-CPS: nnU-Net topology and networks, loss terms, gradient isolation, lambda schedule, real run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.datasets import load_dataset
from semiseg.errors import InputError
from semiseg.inference import predict_volume
from semiseg.methods import build_method
from semiseg.methods.base import NetworkSpec, StepInfo
from semiseg.methods.three_d_cps import deep_supervision_weights
from semiseg.models import load_model
from semiseg.networks import build_network, size_multiple
from semiseg.networks.residual_unet import nnunet_strides
from semiseg.preprocessing import read_case
from semiseg.training import TrainConfig, train

from batches import tiny_batch

pytestmark = pytest.mark.usefixtures("one_thread")
SAMPLE = Path(__file__).resolve().parents[1] / "resources" / "hippocampus"
TINY = {"base_filters": 4, "downsamplings": 2}


def _cps(network: str = "residual-unet", **options):
    torch.manual_seed(0)
    return build_method("3d-cps", 1, 3, NetworkSpec(network, dict(TINY)), options)


def _without_gradient(network: torch.nn.Module) -> set[str]:
    return {name for name, p in network.named_parameters() if p.grad is None}


def test_nnunet_topology_reproduces_the_papers_3d_network():
    # 112x160x128 -> 6 stages, bottleneck 7x5x4 (Sec. 2.2); z stops pooling at 7.
    assert nnunet_strides([112, 160, 128]) == [[2, 2, 2]] * 4 + [[1, 2, 2]]
    assert nnunet_strides([40, 56, 40]) == [[2, 2, 2]] * 3  # nnU-Net's hippocampus plan
    plain = build_network("plain-unet", 1, 14, patch_size=[112, 160, 128])
    assert plain.reduction == [16, 32, 32] and plain.encoder_widths == [32, 64, 128, 256, 320, 320]
    assert sum(p.numel() for p in plain.parameters()) == 30_795_654  # the paper's "30.79M" (Table 2)
    with pytest.raises(InputError):
        build_network("residual-unet", 1, 2, patch_size=[64, 64, 64], downsamplings=3)


@pytest.mark.parametrize("name", ["residual-unet", "plain-unet"])
def test_nnunet_networks_follow_the_network_protocol(name):
    torch.manual_seed(0)
    network = build_network(name, 1, 3, **TINY)
    assert size_multiple(network) == 4
    x = torch.randn(2, 1, 8, 16, 12)
    features = network.encode(x)
    assert [f.shape[1] for f in features] == network.encoder_widths == [4, 8, 16]
    logits, embedding = network.decode(features, return_embedding=True)
    torch.testing.assert_close(logits, network(x))
    assert logits.shape == (2, 3, 8, 16, 12) and embedding.shape[1] == network.embedding_width
    deep = network.deep_supervision_logits(x)
    assert [o.shape[2:] for o in deep] == [(8, 16, 12), (4, 8, 6)]
    torch.testing.assert_close(deep[0], logits)
    assert not any(".encoder." in key for key in network.state_dict())  # no tensor saved twice
    with pytest.raises(InputError, match="multiples"):
        network(torch.randn(1, 1, 8, 16, 10))


def test_deep_supervision_weights_are_nnunets():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(4) == pytest.approx([1 / 1.75, 0.5 / 1.75, 0.25 / 1.75, 0.0])


def test_losses_are_finite_and_each_networks_terms_reach_only_it():
    method = _cps()
    first, second = method.networks["first"], method.networks["second"]
    assert any(not torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    losses = method.training_step(*tiny_batch(), StepInfo(50, 100))
    assert set(losses) == {"supervised_first", "cps_first", "supervised_second", "cps_second"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    (losses["supervised_first"] + losses["cps_first"]).backward(retain_graph=True)
    assert all(p.grad is None for p in second.parameters())
    assert _without_gradient(first) == {"heads.0.weight", "heads.0.bias"}  # the lowest output has weight 0
    first.zero_grad(set_to_none=True)
    (losses["supervised_second"] + losses["cps_second"]).backward()
    assert all(p.grad is None for p in first.parameters())
    assert _without_gradient(second) == {"heads.0.weight", "heads.0.bias"}
    specs = method.optimizers()
    assert {name: (s.networks, s.kind, s.lr, s.weight_decay) for name, s in specs.items()} == {
        "first": (["first"], "sgd", 0.05, 3e-5), "second": (["second"], "sgd", 0.05, 3e-5)}


def test_supervised_term_is_deep_supervised_and_cps_term_is_dice_ce_on_the_other_argmax():
    torch.manual_seed(0)
    method = build_method("3d-cps", 1, 3, NetworkSpec("residual-unet", {"base_filters": 4, "downsamplings": 3}))
    labeled, unlabeled = tiny_batch()
    losses = method.training_step(labeled, unlabeled, StepInfo(50, 100))  # lambda = 0.5 at the end of the ramp
    images = torch.cat([labeled["image"], unlabeled["image"]])
    with torch.no_grad():
        first = method.networks["first"].deep_supervision_logits(images)
        second = method.networks["second"](images).argmax(1, keepdim=True)
        low_label = labeled["label"][:, :, 1::2, 1::2, 1::2]  # nearest-exact halving picks the odd voxels
        assert len(first) == 3  # outputs at 16, 8 and 4 voxels: weights 1, 1/2 and 0 (the lowest), normalised
        supervised = (method.supervised_loss(first[0][:2], labeled["label"]) + 0.5 * method.supervised_loss(first[1][:2], low_label)) / 1.5
        cps = method.supervised_loss(first[0][:2], second[:2]) + method.supervised_loss(first[0][2:], second[2:])
    torch.testing.assert_close(losses["supervised_first"].detach(), supervised)
    torch.testing.assert_close(losses["cps_first"].detach(), 0.5 * cps)
    vnet = build_method("3d-cps", 1, 3, NetworkSpec("vnet", {"base_filters": 4}))
    assert set(vnet.training_step(labeled, unlabeled, StepInfo(0, 100))) == set(losses)  # no deep supervision needed


def test_lambda_rises_linearly_to_half_over_the_span_then_stays():
    method = _cps(rampup=0.4)
    assert [method.cps_lambda(StepInfo(i, 100)) for i in (0, 10, 20, 40, 70, 99)] == pytest.approx([0, 0.125, 0.25, 0.5, 0.5, 0.5])
    assert method.training_step(*tiny_batch(), StepInfo(0, 100))["cps_first"] == 0


def test_inference_uses_the_first_network_unless_ensembling_with_nnunets_step():
    assert list(_cps().predictors()) == ["first"]
    assert list(_cps(ensemble=True).predictors()) == ["first", "second"]
    assert _cps().inference_overlap == pytest.approx(0.3)


def test_short_real_run_reduces_the_supervised_loss_and_reloads_to_predict(tmp_path):
    events: list[dict] = []
    config = TrainConfig(data=str(SAMPLE), output=str(tmp_path / "run"), method="3d-cps", network="residual-unet",
                         network_options={"base_filters": 4, "downsamplings": 3}, method_options={"lr": 0.05},
                         labeled="6", validation="0", iterations=25, log_every=5, patch_size=(16, 32, 16), workers=0,
                         device="cpu", seed=0)
    best = train(config, events.append)
    logged = [e["losses"] for e in events if e["type"] == "iteration"]
    assert len(logged) == 5
    # lambda ramps up from 0, so the CPS terms (and the total) grow early on: the supervised terms must fall.
    supervised = [entry["supervised_first"] + entry["supervised_second"] for entry in logged]
    assert np.mean(supervised[-2:]) < 0.9 * np.mean(supervised[:2]), supervised
    assert logged[-1]["cps_first"] > logged[0]["cps_first"]

    model = load_model(best)
    assert model.record.network == "residual-unet"
    image, _ = read_case(load_dataset(SAMPLE).cases[0])
    prediction = predict_volume(image, model.plan, model.predictors(), torch.device("cpu"), overlap=model.method.inference_overlap)
    assert prediction.labels.shape == image.shape and prediction.disagreement is None
    assert set(np.unique(prediction.labels.array)) <= {0, 1, 2}
