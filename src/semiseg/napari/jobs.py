"""Segmenting a volume for the widgets: progress per sliding-window batch, prompt cancellation,
optional error map and metrics against a reference. Runs in a napari worker thread; no Qt here.

Cancellation and progress need no engine hook: the predictors handed to
`semiseg.inference.predict_volume` are wrapped so that each call (one batch of windows) reports
progress and raises `Cancelled` once a stop was asked for.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from semiseg.inference import Prediction, predict_volume
from semiseg.io import Volume
from semiseg.napari.layers import error_counts, error_map, metrics_rows
from semiseg.regions import Region, prediction_regions

Progress = Callable[[dict[str, Any]], None]
SW_BATCH_SIZE = 2


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


def windows_per_pass(shape: tuple[int, ...], patch: tuple[int, ...], overlap: float) -> int:
    """Sliding windows MONAI's sliding_window_inference visits over an image of this shape."""
    count = 1
    for size, roi in zip(shape, patch):
        size = max(size, roi)
        if roi >= size:
            continue
        interval = max(int(roi * (1 - overlap)), 1)
        count *= math.ceil((size - roi) / interval) + 1
    return count


def expected_calls(volume: Volume, plan, predictors: int, overlap: float, tta: bool, sw_batch_size: int = SW_BATCH_SIZE) -> int:
    grid = plan.target_grid(volume.geometry, volume.shape)
    shape = volume.shape if grid is None else tuple(reversed(grid[1]))
    batches = math.ceil(windows_per_pass(shape, plan.patch_size, overlap) / sw_batch_size)
    return max(1, batches * predictors * (8 if tta else 1))


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
    total = expected_calls(volume, model.plan, len(predictors), overlap, tta)
    done = [0]

    def on_call() -> None:
        done[0] += 1
        report({"stage": "predicting", "fraction": min(done[0] / total, 0.99), "text": f"predicting ({done[0]}/{total} batches)"})

    report({"stage": "predicting", "fraction": 0.0, "text": "preprocessing"})
    if should_stop():
        raise Cancelled()
    with torch.inference_mode():
        prediction = predict_volume(volume, model.plan, guarded(predictors, should_stop, on_call), device, overlap, tta, SW_BATCH_SIZE)
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
