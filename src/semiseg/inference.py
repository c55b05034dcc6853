"""Sliding-window prediction with class probabilities and per-voxel uncertainty.

Uncertainty maps, both in [0, 1]:
- entropy: predictive entropy of the mean class probabilities, divided by log(number of classes);
- disagreement (methods with two predicting networks, e.g. teacher/student or a CPS pair): the
  total-variation distance between the two networks' class probabilities, 0.5 * sum |p1 - p2|.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from semiseg.errors import InputError
from semiseg.io import Geometry, Volume
from semiseg.preprocessing import Plan

ProgressCallback = Callable[[dict], None]
logger = logging.getLogger(__name__)
SW_BATCH_SIZE = 2  # windows per network call


@torch.no_grad()
def predict_probabilities(
    image: np.ndarray,
    predictors: list[Callable[[torch.Tensor], torch.Tensor]],
    patch_size: tuple[int, int, int],
    device: torch.device,
    overlap: float = 0.5,
    tta: bool = False,
    sw_batch_size: int = SW_BATCH_SIZE,
    progress: ProgressCallback | None = None,
    mode: str = "gaussian",
) -> np.ndarray:
    """Softmax of each predictor over a preprocessed (z, y, x) image: array (P, C, z, y, x).

    ``overlap`` may be one fraction or one per axis (z, y, x); ``mode`` is MONAI's blending of
    overlapping windows: "gaussian" (default) or "constant" (a plain average, as the LA papers' code).

    Memory guard: the whole-volume sums live on the device only when they fit comfortably; on an
    accelerator out-of-memory error the volume is predicted again one window at a time with the
    sums on the CPU, and if even that does not fit the error says what to do instead.
    """
    x = torch.from_numpy(np.array(image, dtype=np.float32))[None, None]  # a copy: cached arrays are read-only maps
    flips = [axes for r in range(4) for axes in itertools.combinations((2, 3, 4), r)] if tta else [()]

    def all_predictors(patch: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.softmax(p(patch).float(), dim=1) for p in predictors], dim=1)

    def run(windows: int, sums_on: torch.device) -> torch.Tensor:
        total = torch.zeros((), device=sums_on)
        for index, axes in enumerate(flips):
            flipped = torch.flip(x, axes) if axes else x
            out = sliding_window_inference(flipped, patch_size, windows, all_predictors, overlap=overlap, mode=mode,
                                           sw_device=device, device=sums_on)
            total = total + (torch.flip(out, axes) if axes else out)
            if progress is not None:
                progress({"type": "inference", "step": index + 1, "steps": len(flips)})
        return total

    try:
        total = run(sw_batch_size, _sums_device(x, len(predictors), device))
    except torch.OutOfMemoryError:
        _empty_cache(device)
        logger.warning("out of %s memory: predicting again one window at a time, summing on the CPU", device)
        try:
            total = run(1, torch.device("cpu"))
        except torch.OutOfMemoryError:
            _empty_cache(device)
            raise InputError(f"out of {device} memory even one window at a time; predict on the CPU (device cpu)") from None
    probabilities = (total / len(flips))[0].cpu().numpy()
    return probabilities.reshape(len(predictors), -1, *probabilities.shape[1:])


def _sums_device(image: torch.Tensor, predictors: int, device: torch.device) -> torch.device:
    """The device for the whole-volume sums: the accelerator when they take under a quarter of its free memory."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    # Sums and weights for up to 8 classes per predictor plus a flipped copy, float32: a generous bound.
    needed = image.numel() * 4 * (predictors * 8 + 2)
    return device if needed < free / 4 else torch.device("cpu")


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Normalised predictive entropy of (C, ...) class probabilities."""
    p = np.clip(probabilities, 1e-8, 1.0)
    return (-(p * np.log(p)).sum(0) / math.log(probabilities.shape[0])).astype(np.float32)


def disagreement(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return (0.5 * np.abs(first - second).sum(0)).astype(np.float32)


@dataclass
class Prediction:
    labels: Volume  # label map on the source grid, in the label values of the plan's classes (uint8 up to 255)
    probabilities: np.ndarray  # (C, z, y, x) mean class probabilities on the source grid, channel c = plan.channel_values[c]
    entropy: Volume
    disagreement: Volume | None

    def uncertainty_score(self) -> float:
        """One number per volume for ranking scans: mean entropy over the voxels predicted foreground
        (over all voxels when none is), so large empty backgrounds do not dilute it."""
        foreground = self.labels.array > 0
        values = self.entropy.array[foreground] if foreground.any() else self.entropy.array
        return float(values.mean())


def predict_volume(
    volume: Volume,
    plan: Plan,
    predictors: list[Callable[[torch.Tensor], torch.Tensor]],
    device: torch.device,
    overlap: float = 0.5,
    tta: bool = False,
    sw_batch_size: int = SW_BATCH_SIZE,
    progress: ProgressCallback | None = None,
) -> Prediction:
    """Preprocess a scan with the model's plan, predict, and map everything back to its grid."""
    image = plan.preprocess_image(volume)
    per_network = predict_probabilities(image, predictors, plan.patch_size, device, overlap, tta, sw_batch_size, progress)
    per_network = np.stack([plan.restore(p, volume) for p in per_network])
    mean = per_network.mean(0)
    labels = plan.label_map(mean.argmax(0))
    second = Volume(disagreement(per_network[0], per_network[1]), volume.geometry) if len(per_network) == 2 else None
    return Prediction(Volume(labels, volume.geometry), mean, Volume(entropy(mean), volume.geometry), second)


# Time and memory of a prediction, estimated before it runs ------------------------------------------
#
# Time: the network calls the sliding window will make (windows per pass / batch size, times the
# predicting networks, times 8 with TTA) times the seconds of one call measured on the device
# (`measure_window_cost`: one batch of random windows through each network, after a warm-up on an
# accelerator). Resampling before and after is not counted (small next to the networks on a CPU).
# Memory: the float32 whole-volume buffers, at the larger of two phases (on the network's grid: the
# scan and its tensor copy, MONAI's output sums and weights, with TTA a flipped copy and the sum over
# flips, the mean to numpy; on the scan's grid: each network's probabilities resampled and stacked,
# their mean, entropy and disagreement), plus what one batch of windows needs: measured on CUDA
# (peak allocation during the calls), elsewhere the sum of every layer's output for one batch (an
# upper bound: inference frees most of them as it goes).


@dataclass(frozen=True)
class WindowCost:
    """One network call (a batch of sliding windows through one network) on a device, measured."""

    seconds: float
    bytes: int
    device: str


@dataclass(frozen=True)
class InferenceEstimate:
    seconds: float
    peak_bytes: int
    calls: int  # network calls: sliding-window batches x predicting networks x TTA flips
    grid_shape: tuple[int, ...]  # (z, y, x) of the grid the networks see
    device: str

    def fits(self, available_bytes: int | None) -> bool:
        return available_bytes is None or self.peak_bytes <= available_bytes

    def describe(self, available_bytes: int | None = None) -> str:
        text = (f"about {_seconds(self.seconds)} and {_gigabytes(self.peak_bytes)} of memory at the peak on {self.device} "
                f"({self.calls} network calls over a {'x'.join(map(str, self.grid_shape))} grid)")
        if available_bytes is not None and not self.fits(available_bytes):
            text += f"; only {_gigabytes(available_bytes)} is free there: it may run out of memory"
        return text


def _seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _gigabytes(count: int) -> str:
    return f"{count / 2**30:.2f} GB" if count < 10 * 2**30 else f"{count / 2**30:.0f} GB"


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


def grid_shape(shape: tuple[int, ...], geometry: Geometry, plan: Plan) -> tuple[int, ...]:
    """(z, y, x) of a scan once resampled to the plan's grid."""
    grid = plan.target_grid(geometry, shape)
    return tuple(shape) if grid is None else tuple(reversed(grid[1]))


def network_calls(shape: tuple[int, ...], geometry: Geometry, plan: Plan, predictors: int, overlap: float = 0.5,
                  tta: bool = False, sw_batch_size: int = SW_BATCH_SIZE) -> int:
    """How many times `predict_volume` calls a predictor for a scan of this shape and geometry."""
    batches = math.ceil(windows_per_pass(grid_shape(shape, geometry, plan), plan.patch_size, overlap) / sw_batch_size)
    return max(1, batches * predictors * (8 if tta else 1))


@torch.inference_mode()
def measure_window_cost(predictors: list[Callable[[torch.Tensor], torch.Tensor]], patch_size: tuple[int, int, int],
                        device: torch.device, sw_batch_size: int = SW_BATCH_SIZE) -> WindowCost:
    """Time one batch of random windows through each predictor on the device (see the notes above)."""
    patch = torch.randn(sw_batch_size, 1, *patch_size, device=device)
    accelerator = device.type != "cpu"
    if accelerator:
        for predictor in predictors:  # lazy initialisation, kernel selection
            predictor(patch)
        _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    outputs: list[int] = []
    hook = None if device.type == "cuda" else torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: outputs.append(_leaf_output_bytes(module, output)))
    try:
        started = time.perf_counter()
        for predictor in predictors:
            torch.softmax(predictor(patch).float(), dim=1)
        _synchronize(device)
        seconds = (time.perf_counter() - started) / max(len(predictors), 1)
    finally:
        if hook is not None:
            hook.remove()
    used = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else sum(outputs) // max(len(predictors), 1)
    return WindowCost(seconds, int(used), str(device))


def _leaf_output_bytes(module: torch.nn.Module, output) -> int:
    if next(module.children(), None) is not None:
        return 0  # a container: its layers count themselves
    tensors = output if isinstance(output, (tuple, list)) else [output]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def estimate_inference(shape: tuple[int, ...], geometry: Geometry, plan: Plan, predictors: int, cost: WindowCost,
                       overlap: float = 0.5, tta: bool = False, sw_batch_size: int = SW_BATCH_SIZE) -> InferenceEstimate:
    """Seconds and peak bytes of `predict_volume` for a scan of this shape and geometry (see the notes above)."""
    calls = network_calls(shape, geometry, plan, predictors, overlap, tta, sw_batch_size)
    on_grid = math.prod(grid_shape(shape, geometry, plan))
    on_scan = math.prod(shape)
    channels = len(plan.class_names) * predictors
    grid_phase = 4 * on_grid * (2 + (channels + 1) + channels + (1 + channels if tta else 0))
    scan_phase = 4 * on_grid * channels + 4 * on_scan * (2 * channels + 2 * len(plan.class_names) + 2) + on_scan
    return InferenceEstimate(calls * cost.seconds, max(grid_phase, scan_phase) + cost.bytes, calls,
                             grid_shape(shape, geometry, plan), cost.device)
