"""The trainer and the baseline methods on real hippocampus MRI (the bundled sample)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.checkpoint import MODEL_WEIGHTS, read_meta
from semiseg.inference import predict_volume
from semiseg.methods import build_method
from semiseg.methods.base import NetworkSpec, StepInfo
from semiseg.metrics import case_metrics
from semiseg.models import load_model
from semiseg.preprocessing import read_case
from semiseg.datasets import load_dataset
from semiseg.training import TrainConfig, train

from batches import tiny_batch

SAMPLE = Path(__file__).resolve().parents[1] / "resources" / "hippocampus"
SMALL_VNET = {"base_filters": 8}


def _config(tmp_path: Path, **overrides) -> TrainConfig:
    settings = dict(data=str(SAMPLE), output=str(tmp_path / "run"), method="supervised", network="vnet",
                    network_options=SMALL_VNET, labeled="100%", validation="0", iterations=40, log_every=5,
                    validate_every=1000, workers=0, device="cpu", seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def _losses(events: list[dict]) -> list[float]:
    return [e["loss"] for e in events if e["type"] == "iteration"]


@pytest.mark.parametrize("method", ["supervised", "mean-teacher", "cps"])
def test_loss_falls_on_a_short_real_run(tmp_path, method):
    events: list[dict] = []
    train(_config(tmp_path, method=method, labeled="6"), events.append)
    losses = _losses(events)
    assert len(losses) == 8
    assert np.mean(losses[-2:]) < 0.85 * np.mean(losses[:2]), losses
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["loss"] for e in log if e["type"] == "iteration"] == pytest.approx(losses)
    meta = read_meta(tmp_path / "run" / "best")
    assert meta["model"]["method"] == method and meta["iteration"] == 40
    assert len(meta["split"]["labeled"]) == 6
    assert len(meta["split"]["unlabeled"]) == 14  # 6 labeled of 12, the other 6 + 8 imagesTs unlabeled


def test_short_supervised_training_reaches_dice_on_real_validation_cases(tmp_path):
    events: list[dict] = []
    config = _config(tmp_path, validation="3", iterations=200, validate_every=100, optimizer="adamw", lr=1e-3)
    best = train(config, events.append)
    validations = [e for e in events if e["type"] == "validation"]
    assert [v["iteration"] for v in validations] == [100, 200]
    model = load_model(best)
    cases = {c.case_id: c for c in load_dataset(SAMPLE).cases}
    dices = []
    for case_id in model.record.split.validation:
        image, label = read_case(cases[case_id])
        prediction = predict_volume(image, model.plan, model.predictors(), torch.device("cpu"))
        assert prediction.labels.geometry == image.geometry and prediction.labels.shape == image.shape
        dices += [m["dice"] for m in case_metrics(prediction.labels.array, label.array, [1, 2]).values()]
    assert np.mean(dices) > 0.6, dices
    assert model.record.best_dice_mean == pytest.approx(max(v["dice_mean"] for v in validations))


def test_resume_continues_the_uninterrupted_run_exactly(tmp_path):
    config = dict(method="mean-teacher", labeled="6", iterations=20, validate_every=10)
    full: list[dict] = []
    train(_config(tmp_path / "a", **config), full.append)
    first: list[dict] = []
    stop_at_10 = lambda: any(e["type"] == "iteration" and e["iteration"] == 10 for e in first)  # noqa: E731
    train(_config(tmp_path / "b", **config), first.append, should_stop=stop_at_10)
    assert first[-1]["type"] == "cancelled" and first[-1]["iteration"] == 10
    resumed: list[dict] = []
    train(_config(tmp_path / "b", **config, resume=True), resumed.append)
    assert any(e["type"] == "resume" and e["iteration"] == 10 for e in resumed)
    assert _losses(first) + _losses(resumed) == _losses(full)
    a = load_model(tmp_path / "a" / "run" / "last").method.state_dict()
    b = load_model(tmp_path / "b" / "run" / "last").method.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_is_safetensors_and_reloads_to_the_same_prediction(tmp_path):
    best = train(_config(tmp_path, iterations=5))
    header = (best / MODEL_WEIGHTS).read_bytes()[:8]
    assert int.from_bytes(header, "little") < 10**7  # a safetensors header length, not a zip/pickle magic
    model_a, model_b = load_model(best), load_model(best)
    image, _ = read_case(load_dataset(SAMPLE).cases[0])
    first = predict_volume(image, model_a.plan, model_a.predictors(), torch.device("cpu"))
    second = predict_volume(image, model_b.plan, model_b.predictors(), torch.device("cpu"))
    np.testing.assert_array_equal(first.probabilities, second.probabilities)
    assert 0 <= first.entropy.array.min() and first.entropy.array.max() <= 1


def test_mean_teacher_teacher_gets_no_gradient_and_follows_the_ema_formula():
    torch.manual_seed(0)
    method = build_method("mean-teacher", 1, 3, NetworkSpec("vnet", {"base_filters": 4}), {"ema_alpha": 0.9})
    labeled, unlabeled = tiny_batch()
    losses = method.training_step(labeled, unlabeled, StepInfo(50, 100))
    assert set(losses) == {"supervised", "consistency"} and all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in method.networks["teacher"].parameters())
    assert all(p.grad is not None for p in method.networks["student"].parameters())
    teacher_before = copy.deepcopy(method.networks["teacher"].state_dict())
    with torch.no_grad():
        for p in method.networks["student"].parameters():
            p.add_(1.0)
    method.after_step(StepInfo(50, 100))
    student = method.networks["student"].state_dict()
    for key, value in method.networks["teacher"].state_dict().items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value, 0.9 * teacher_before[key] + 0.1 * student[key])


def test_cps_each_network_learns_from_the_other_and_both_predict():
    torch.manual_seed(0)
    method = build_method("cps", 1, 3, NetworkSpec("vnet", {"base_filters": 4}))
    left, right = method.networks["left"], method.networks["right"]
    assert any(not torch.equal(a, b) for a, b in zip(left.parameters(), right.parameters()))
    labeled, unlabeled = tiny_batch()
    losses = method.training_step(labeled, unlabeled, StepInfo(99, 100))
    assert losses["cross_pseudo"] > 0
    losses["cross_pseudo"].backward()
    assert all(p.grad is not None for p in left.parameters()) and all(p.grad is not None for p in right.parameters())
    assert set(method.predictors()) == {"left", "right"}
