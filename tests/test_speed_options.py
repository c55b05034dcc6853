"""The opt-in speed settings of the trainer (channels-last, torch.compile): each
one trains, changes no result beyond its numerical tolerance, and is recorded in the checkpoint.
Behaviour only: timings belong to benchmarks/throughput.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from semiseg.checkpoint import read_meta
from semiseg.cli import main
from semiseg.training import TrainConfig, train

SAMPLE = Path(__file__).resolve().parents[1] / "resources" / "hippocampus"


def _config(tmp_path: Path, name: str, **overrides) -> TrainConfig:
    settings = dict(data=str(SAMPLE), output=str(tmp_path / name), method="mean-teacher", network="vnet",
                    network_options={"base_filters": 4}, labeled="6", validation="0", iterations=12, log_every=3,
                    validate_every=1000, workers=0, device="cpu", seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def _run(config: TrainConfig) -> tuple[list[float], list[dict]]:
    events: list[dict] = []
    train(config, events.append)
    return [e["loss"] for e in events if e["type"] == "iteration"], events


def test_channels_last_follows_the_default_trajectory_and_is_recorded(tmp_path):
    default, _ = _run(_config(tmp_path, "default", iterations=5, log_every=1))
    channels_last, _ = _run(_config(tmp_path, "channels-last", iterations=5, log_every=1, channels_last=True))
    # Same arithmetic in another memory layout: only the order of float sums differs, so the first
    # step agrees closely and later steps drift apart slowly (lr 0.05 amplifies rounding).
    np.testing.assert_allclose(channels_last[0], default[0], rtol=1e-5)
    np.testing.assert_allclose(channels_last, default, rtol=0.02)
    meta = read_meta(tmp_path / "channels-last" / "last")
    assert meta["train_config"]["channels_last"] is True
    assert read_meta(tmp_path / "default" / "last")["train_config"]["channels_last"] is False


def test_channels_last_run_resumes_exactly(tmp_path):
    settings = dict(channels_last=True, iterations=8, log_every=2)
    full, _ = _run(_config(tmp_path, "full", **settings))
    first: list[dict] = []
    stop_at_4 = lambda: any(e["type"] == "iteration" and e["iteration"] == 4 for e in first)  # noqa: E731
    train(_config(tmp_path, "part", **settings), first.append, should_stop=stop_at_4)
    assert first[-1]["type"] == "cancelled" and first[-1]["iteration"] == 4
    resumed, _ = _run(_config(tmp_path, "part", **settings, resume=True))
    assert [e["loss"] for e in first if e["type"] == "iteration"] + resumed == full


def _eager_compile(monkeypatch) -> None:
    """Dynamo tracing and AOT autograd, without inductor's C++ code generation (minutes on this CPU)."""
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: original(self, backend="aot_eager"))


def test_compile_trains_logs_its_time_and_keeps_checkpoint_names(tmp_path, monkeypatch):
    _eager_compile(monkeypatch)
    settings = dict(method="supervised", iterations=12, log_every=1, network_options={"base_filters": 4})
    compiled, events = _run(_config(tmp_path, "compiled", compile=True, **settings))
    default, _ = _run(_config(tmp_path, "default", **settings))
    assert np.mean(compiled[-3:]) < 0.9 * np.mean(compiled[:3]), compiled
    # The traced graphs compute what eager does: the first step closely, later ones within drift.
    np.testing.assert_allclose(compiled[0], default[0], rtol=1e-4)
    np.testing.assert_allclose(compiled, default, rtol=0.02)
    timing = [e for e in events if e["type"] == "compile"]
    assert len(timing) == 1 and timing[0]["iteration"] == 1 and timing[0]["seconds"] > 0
    # Same parameters under the same names: compiled checkpoints load anywhere.
    keys = {}
    for run in ("compiled", "default"):
        with safe_open(str(tmp_path / run / "last" / "model.safetensors"), "pt") as handle:
            keys[run] = set(handle.keys())
    assert keys["compiled"] == keys["default"]
    assert read_meta(tmp_path / "compiled" / "last")["train_config"]["compile"] is True


@pytest.mark.slow
def test_compile_with_inductor_gives_the_eager_losses(tmp_path):
    compiled, events = _run(_config(tmp_path, "compiled", compile=True, method="supervised", iterations=6, log_every=1))
    eager, _ = _run(_config(tmp_path, "eager", method="supervised", iterations=6, log_every=1))
    # Fused kernels sum in another order: the first step agrees closely, later ones drift (measured 0.23% by step 6).
    np.testing.assert_allclose(compiled[0], eager[0], rtol=1e-5)
    np.testing.assert_allclose(compiled, eager, rtol=0.02)
    assert [e["type"] for e in events].count("compile") == 1


def test_cli_flags_reach_the_checkpoints_train_config(tmp_path, capsys):
    code = main(["train", "--data", str(SAMPLE), "--out", str(tmp_path / "run"), "--method", "supervised", "--labeled", "4",
                 "--iterations", "2", "--network-option", "base_filters=4", "--workers", "0", "--device", "cpu",
                 "--channels-last"])
    assert code == 0, capsys.readouterr().err
    config = read_meta(tmp_path / "run" / "last")["train_config"]
    assert config["channels_last"] is True and config["compile"] is False


def test_patches_without_the_strong_view_are_the_same_patches():
    from semiseg.sampling import PatchDataset, Volumes

    rng = np.random.default_rng(0)
    image = rng.normal(size=(20, 28, 24)).astype(np.float32)
    label = (rng.random((20, 28, 24)) > 0.7).astype(np.uint8)
    volumes = Volumes([image], [label])
    with_strong = PatchDataset(volumes, (16, 16, 16), seed=3)
    without = PatchDataset(volumes, (16, 16, 16), seed=3, strong_view=False)
    for index in (0, 1, 7, 12345):
        a, b = with_strong[index], without[index]
        assert "image_strong" in a and "image_strong" not in b
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
