"""Segmenting a volume for the widgets: progress per sliding-window batch, prompt cancellation,
optional error map and metrics against a reference. Runs in a napari worker thread; no Qt here.

Cancellation and progress need no engine hook: the predictors handed to
`semiseg.inference.predict_volume` are wrapped so that each call (one batch of windows) reports
progress and raises `Cancelled` once a stop was asked for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from semiseg.devices import available_memory
from semiseg.inference import (
    SW_BATCH_SIZE,
    InferenceEstimate,
    Prediction,
    WindowCost,
    estimate_inference,
    measure_window_cost,
    network_calls,
    predict_volume,
)
from semiseg.io import Volume
from semiseg.napari.layers import error_counts, error_map, metrics_rows
from semiseg.regions import Region, prediction_regions

Progress = Callable[[dict[str, Any]], None]


class Cancelled(Exception):
    """Raised inside a job when its stop was asked for."""


@dataclass
class SegmentResult:
    prediction: Prediction
    class_names: dict[int, str]
    checkpoint: str
    checkpoint_sha256: str | None
    method: str
    device: str
    seconds: float
    tta: bool
    errors: np.ndarray | None = None
    error_counts: dict[str, int] | None = None
    metrics: list[dict[str, Any]] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    regions_map: str = "entropy"  # the uncertainty map the regions are components of
    regions: list[Region] = field(default_factory=list)

    @property
    def score(self) -> float:
        return self.prediction.uncertainty_score()


def guarded(predictors: list, should_stop: Callable[[], bool], on_call: Callable[[], None]) -> list:
    """The predictors, each checking for a stop before and reporting after every call."""

    def wrap(predictor):
        def call(patch):
            if should_stop():
                raise Cancelled()
            output = predictor(patch)
            on_call()
            return output

        return call

    return [wrap(p) for p in predictors]


def segment(
    volume: Volume,
    model,
    device: torch.device,
    tta: bool = False,
    overlap: float | None = None,
    reference: np.ndarray | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    keep_probabilities: bool = False,
) -> SegmentResult:
    """Predict labels and uncertainty for a volume; with a reference, also the error map and per-class
    metrics (distances in mm, from the volume's spacing). Raises Cancelled when stopped."""
    should_stop = should_stop or (lambda: False)
    report = progress or (lambda event: None)
    started = time.perf_counter()
    predictors = model.predictors()
    overlap = model.overlap if overlap is None else overlap
    total = network_calls(volume, model.plan, len(predictors), overlap, tta, SW_BATCH_SIZE, model.window_scale)
    done = 0
    first_done_at: float | None = None

    def on_call() -> None:
        # The ETA extrapolates the pace of the calls after the first (which carries the start-up).
        nonlocal done, first_done_at
        done += 1
        now = time.perf_counter()
        if first_done_at is None:
            first_done_at = now
        pace = (now - first_done_at) / (done - 1) if done > 1 else now - started
        report({"stage": "predicting", "fraction": min(done / total, 0.99), "eta_s": pace * (total - done),
                "text": f"predicting ({done}/{total} batches)"})

    report({"stage": "predicting", "fraction": 0.0, "text": "preprocessing"})
    if should_stop():
        raise Cancelled()
    with torch.inference_mode():
        prediction = predict_volume(volume, model.plan, guarded(predictors, should_stop, on_call), device, overlap, tta, SW_BATCH_SIZE,
                                    window_scale=model.window_scale)
    timings = {"predict_s": time.perf_counter() - started}
    class_names = dict(model.plan.class_names)
    result = SegmentResult(prediction, class_names, model.path, model.record.weights_sha256, model.record.method,
                           str(device), 0.0, tta, timings=timings)
    result.regions_map, result.regions = prediction_regions(prediction, class_names)
    if reference is not None:
        if should_stop():
            raise Cancelled()
        report({"stage": "metrics", "fraction": 0.99, "text": "comparing with the reference"})
        ignore_label = model.plan.ignore_label
        result.errors = error_map(prediction.labels.array, reference, ignore_label)
        result.error_counts = error_counts(result.errors)
        result.metrics = metrics_rows(prediction.labels.array, reference, class_names, volume.geometry.spacing_zyx, ignore_label)
        timings["metrics_s"] = time.perf_counter() - started - timings["predict_s"]
    if not keep_probabilities:
        prediction.probabilities = None  # (C, z, y, x) float32: the widgets show labels and uncertainty only
    result.seconds = time.perf_counter() - started
    report({"stage": "done", "fraction": 1.0, "text": f"done in {result.seconds:.1f} s"})
    return result


def segment_job(volume: Volume, checkpoint: str, device: torch.device, tta: bool = False, reference: np.ndarray | None = None):
    """A `ThreadJob` function segmenting volume with the (cached) model at checkpoint."""
    from semiseg.napari.checkpoints import MODELS

    def run(progress: Progress, should_stop: Callable[[], bool]) -> SegmentResult:
        progress({"stage": "loading", "fraction": 0.0, "text": "loading the model"})
        model = MODELS.get(checkpoint, device)
        calibrate(model, checkpoint, device)
        estimated = known_estimate(volume, checkpoint, device, tta)
        if estimated is not None:
            progress({"stage": "estimate", "fraction": 0.0, "estimate": estimated[0], "available": estimated[1]})
        return segment(volume, model, device, tta=tta, reference=reference, progress=progress, should_stop=should_stop)

    return run


@dataclass(frozen=True)
class _Calibration:
    cost: WindowCost
    plan: Any
    predictors: int
    overlap: float
    window_scale: int


_CALIBRATIONS: dict[tuple[str, str, str], _Calibration] = {}


def _calibration_key(checkpoint: str, device: torch.device) -> tuple[str, str, str] | None:
    from semiseg.napari.checkpoints import read_record_or_none

    record = read_record_or_none(checkpoint)
    return None if record is None else (str(checkpoint), record.weights_sha256, str(device))


def calibrate(model, checkpoint: str, device: torch.device) -> None:
    """Measure the model's window cost on the device, once per model and device."""
    key = _calibration_key(checkpoint, device)
    if key is not None and key not in _CALIBRATIONS:
        cost = measure_window_cost(model.predictors(), model.plan.patch_size, device, in_channels=model.plan.in_channels)
        _CALIBRATIONS[key] = _Calibration(cost, model.plan, len(model.predictors()), model.overlap, model.window_scale)


def known_estimate(volume: Volume, checkpoint: str, device: torch.device, tta: bool = False) -> tuple[InferenceEstimate, int | None] | None:
    """The time and memory estimate of segmenting volume, and the memory free on the device; None
    until the model's window cost was measured on that device (`calibrate`, at its first use)."""
    key = _calibration_key(checkpoint, device)
    known = _CALIBRATIONS.get(key) if key is not None else None
    if known is None:
        return None
    estimate = estimate_inference(volume, known.plan, known.predictors, known.cost, known.overlap, tta, window_scale=known.window_scale)
    return estimate, available_memory(device)
