"""CUDA checks, run by `benchmarks/gpu_check.py` on a GPU machine; skipped everywhere else (CI has no GPU).

They compare the GPU against the CPU on real data: the bundled model's prediction of a real scan, one
training step of the real trainer, and mixed-precision training that must still learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.inference import predict_volume
from semiseg.models import load_model
from semiseg.preprocessing import read_case
from semiseg.datasets import load_dataset
from semiseg.training import TrainConfig, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "resources" / "hippocampus"
DEFAULT_MODEL = ROOT / "resources" / "models" / "default"


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 matmuls would make the GPU differ from the CPU by ~1e-3 for reasons that are not bugs."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_prediction_on_cuda_equals_the_cpu_on_a_real_scan():
    case = next(c for c in load_dataset(SAMPLE).cases if c.label)
    image, _ = read_case(case)
    results = {}
    for device in ("cpu", "cuda"):
        model = load_model(DEFAULT_MODEL, device)
        results[device] = predict_volume(image, model.plan, model.predictors(), torch.device(device), model.overlap)
    agree = np.mean(results["cpu"].labels.array == results["cuda"].labels.array)
    assert agree > 0.999
    np.testing.assert_allclose(results["cuda"].probabilities, results["cpu"].probabilities, atol=1e-3)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_training_on_cuda_learns_the_sample(tmp_path, amp):
    events: list[dict] = []
    config = TrainConfig(data=str(SAMPLE), output=str(tmp_path / "run"), method="mean-teacher", labeled="4", validation="2",
                         iterations=120, validate_every=120, network_options={"base_filters": 8}, device="cuda", amp=amp,
                         workers=2, log_every=10)
    train(config, events.append)
    losses = [e["loss"] for e in events if e["type"] == "iteration"]
    dice = [e["dice_mean"] for e in events if e["type"] == "validation"]
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3])
    assert dice[-1] > 0.5
