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
from scipy import ndimage, special

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
    """Softmax of each predictor over a preprocessed (z, y, x) image, or (channel, z, y, x): array (P, C, z, y, x).

    ``overlap`` may be one fraction or one per axis (z, y, x); ``mode`` is MONAI's blending of
    overlapping windows: "gaussian" (default) or "constant" (a plain average, as the LA papers' code).

    Memory guard: the whole-volume sums live on the device only when they fit comfortably; on an
    accelerator out-of-memory error the volume is predicted again one window at a time with the
    sums on the CPU, and if even that does not fit the error says what to do instead.
    """
    x = torch.from_numpy(np.array(image, dtype=np.float32))  # a copy: cached arrays are read-only maps
    x = x[None, None] if x.dim() == 3 else x[None]
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
    return (special.entr(probabilities).sum(0) / math.log(probabilities.shape[0])).astype(np.float32, copy=False)


def most_likely(probabilities: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """argmax over the class axis of (C, ...) probabilities (the first on ties, as numpy's), one contiguous
    pass per class: numpy's argmax along a leading axis strides through memory, several times slower."""
    best = probabilities[0].copy()
    index = np.zeros(best.shape, dtype)
    for channel in range(1, len(probabilities)):
        better = probabilities[channel] > best
        index[better] = channel
        np.maximum(best, probabilities[channel], out=best)
    return index


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
    crop: bool = True,
    window_scale: int = 1,
) -> Prediction:
    """Preprocess a scan with the model's plan, predict, and map everything back to its grid.

    With `crop` the sliding window covers only the scan's foreground box (`inference_box`); the rest
    is background with probability 1. The intensities are normalised over the whole scan first, so
    the windows inside see the values they would see uncropped. `window_scale` > 1 lets a window span
    several training patches (`sliding_window`; `Model.window_scale` says what a model allows)."""
    plan.check_channels(volume, "the scan")
    resampled = plan.resample_image(volume)
    image = plan.normalize(resampled)
    grid = resampled.shape[-3:]
    box = inference_box(volume, plan, grid) if crop else tuple(slice(0, n) for n in grid)
    covered = image[(Ellipsis, *box)]
    window, overlaps = sliding_window(covered.shape[-3:], plan.patch_size, overlap, window_scale)
    inside = predict_probabilities(covered, predictors, window, device, overlaps, tta, sw_batch_size, progress)
    if plan.target_grid(volume.geometry, volume.shape) is None:
        per_network, region = inside, box  # the scan's own grid: everything after is computed inside the box only
    else:
        on_grid = _paste(inside, grid, box)
        per_network, region = np.stack([plan.restore(p, volume) for p in on_grid]), tuple(slice(0, n) for n in volume.shape)
    mean = per_network.mean(0)
    labels = np.zeros(volume.shape, np.min_scalar_type(plan.num_classes - 1))  # channel indices
    labels[region] = most_likely(mean, labels.dtype)
    second = disagreement(per_network[0], per_network[1]) if len(per_network) == 2 else None
    return Prediction(Volume(plan.label_map(labels), volume.geometry), _paste(mean, volume.shape, region),
                      Volume(_in_zeros(entropy(mean), volume.shape, region), volume.geometry),
                      Volume(_in_zeros(second, volume.shape, region), volume.geometry) if second is not None else None)


def _paste(probabilities: np.ndarray, shape: tuple[int, ...], box: tuple[slice, ...]) -> np.ndarray:
    """(..., C, *box) class probabilities in (..., C, *shape) ones that are background outside the box."""
    if probabilities.shape[-3:] == tuple(shape):
        return probabilities
    whole = np.zeros((*probabilities.shape[:-3], *shape), np.float32)
    whole[..., 0, :, :, :] = 1.0
    whole[(Ellipsis, *box)] = probabilities
    return whole


def _in_zeros(values: np.ndarray, shape: tuple[int, ...], box: tuple[slice, ...]) -> np.ndarray:
    """A map computed inside a box, zero (certain, agreeing) outside it."""
    if values.shape == tuple(shape):
        return values
    whole = np.zeros(shape, values.dtype)
    whole[box] = values
    return whole


def sliding_window(shape: tuple[int, ...], patch: tuple[int, ...], overlap: float, scale: int = 1) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The window and per-axis overlap for an image of this shape: along each axis up to `scale`
    training patches, as many as fit inside the image (a window larger than the image would be
    padded with values never seen in training: on hippocampus that cost 0.17 Dice), overlapping by
    the same number of voxels as patch-sized windows would. Fewer voxels are computed twice, and with
    a fully convolutional network each voxel still sees the neighbourhood it saw in training."""
    window = tuple(p * max(1, min(scale, n // p)) for n, p in zip(shape, patch))
    return window, tuple(overlap * p / w for p, w in zip(patch, window))


# Cropping to the body -------------------------------------------------------------------------------
# nnU-Net crops scans to their nonzero box. A CT's air is about -1000 HU, not zero, so in a scan
# that holds values at or below BODY_HU (a CT: no MR intensity is that negative) the body is the
# voxels above BODY_HU; in other scans, the voxels above the scan's minimum (its zero background).
# Connected pieces under a tenth of the largest (the CT table, a cable) are left out; pieces of
# similar size (two legs) all count. Found on a subsampled mask: a box needs no full resolution. The box gets half a training patch of margin on each side, so the windows at its
# edge still see context, and is found on the scan's own grid (cheap: no resampling), then scaled to
# the network's grid.
BODY_HU = -500.0


def inference_box(volume: Volume, plan: Plan, grid: tuple[int, ...] | None = None) -> tuple[slice, ...]:
    """The (z, y, x) box of the plan's grid that the sliding window covers for this scan."""
    grid = grid or grid_shape(volume.shape, volume.geometry, plan)
    array = volume.channel(0).array  # a scan of several channels: its first channel's body
    lowest = array.min()
    steps = tuple(max(1, math.ceil(n / 128)) for n in array.shape)
    body = array[tuple(slice(None, None, step) for step in steps)] > (BODY_HU if lowest <= BODY_HU else lowest)
    pieces, count = ndimage.label(body)
    if count == 0:
        return tuple(slice(0, n) for n in grid)
    sizes = np.bincount(pieces.ravel())[1:]
    body = np.isin(pieces, 1 + np.flatnonzero(sizes >= sizes.max() / 10))
    box = []
    for axis, (n_scan, n_grid, step, margin) in enumerate(zip(array.shape, grid, steps, (p // 2 for p in plan.patch_size))):
        present = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
        first, last = present[0] * step - (step - 1), present[-1] * step + step  # a subsampled voxel stands for its neighbours
        start = math.floor(max(first, 0) * n_grid / n_scan) - margin
        stop = math.ceil(min(last, n_scan) * n_grid / n_scan) + margin
        box.append(slice(max(start, 0), min(stop, n_grid)))
    return tuple(box)


# Time and memory of a prediction, estimated before it runs ------------------------------------------
#
# Time: the network calls the sliding window will make over the scan's body box (`inference_box`;
# windows per pass / batch size, times the predicting networks, times 8 with TTA) times the seconds of
# one call measured on the device (`measure_window_cost`: one batch of random windows through each
# network, after a warm-up on an accelerator). Resampling before and after is not counted (small next
# to the networks on a CPU). Memory: the float32 whole-volume buffers, at the larger of two phases (on
# the network's grid: the scan resampled and normalised and its tensor copy, MONAI's output sums and
# weights, with TTA a flipped copy and the sum over flips, the mean to numpy and pasted into the whole
# grid; on the scan's grid: each network's probabilities resampled and stacked, their mean, entropy
# and disagreement), plus what one batch of windows needs: measured on CUDA (peak allocation during
# the calls), elsewhere the sum of every layer's output for one batch (an
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


def windows_per_pass(shape: tuple[int, ...], patch: tuple[int, ...], overlap: float | tuple[float, ...]) -> int:
    """Sliding windows MONAI's sliding_window_inference visits over an image of this shape."""
    count = 1
    overlaps = overlap if isinstance(overlap, tuple) else (overlap,) * len(shape)
    for size, roi, fraction in zip(shape, patch, overlaps):
        size = max(size, roi)
        if roi >= size:
            continue
        interval = max(int(roi * (1 - fraction)), 1)
        count *= math.ceil((size - roi) / interval) + 1
    return count


def grid_shape(shape: tuple[int, ...], geometry: Geometry, plan: Plan) -> tuple[int, ...]:
    """(z, y, x) of a scan once resampled to the plan's grid."""
    grid = plan.target_grid(geometry, shape)
    return tuple(shape) if grid is None else tuple(reversed(grid[1]))


def network_calls(volume: Volume, plan: Plan, predictors: int, overlap: float = 0.5, tta: bool = False,
                  sw_batch_size: int = SW_BATCH_SIZE, window_scale: int = 1) -> int:
    """How many times `predict_volume` calls a predictor for this scan."""
    covered = tuple(s.stop - s.start for s in inference_box(volume, plan))
    window, overlaps = sliding_window(covered, plan.patch_size, overlap, window_scale)
    batches = math.ceil(windows_per_pass(covered, window, overlaps) / sw_batch_size)
    return max(1, batches * predictors * (8 if tta else 1))


@torch.inference_mode()
def measure_window_cost(predictors: list[Callable[[torch.Tensor], torch.Tensor]], patch_size: tuple[int, int, int],
                        device: torch.device, sw_batch_size: int = SW_BATCH_SIZE, in_channels: int = 1) -> WindowCost:
    """Time one batch of random windows through each predictor on the device (see the notes above)."""
    patch = torch.randn(sw_batch_size, in_channels, *patch_size, device=device)
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


def estimate_inference(volume: Volume, plan: Plan, predictors: int, cost: WindowCost, overlap: float = 0.5, tta: bool = False,
                       sw_batch_size: int = SW_BATCH_SIZE, window_scale: int = 1) -> InferenceEstimate:
    """Seconds and peak bytes of `predict_volume` for this scan (see the notes above)."""
    calls = network_calls(volume, plan, predictors, overlap, tta, sw_batch_size, window_scale)
    covered = tuple(s.stop - s.start for s in inference_box(volume, plan))
    window, _ = sliding_window(covered, plan.patch_size, overlap, window_scale)
    per_call = math.prod(window) / math.prod(plan.patch_size)  # the cost was measured on patch-sized windows
    grid = grid_shape(volume.shape, volume.geometry, plan)
    on_grid = math.prod(grid)
    on_scan = math.prod(volume.shape)
    channels = len(plan.class_names) * predictors
    grid_phase = 4 * on_grid * (3 * plan.in_channels + (channels + 1) + 2 * channels + (1 + channels if tta else 0))
    scan_phase = 4 * on_grid * channels + 4 * on_scan * (2 * channels + 2 * len(plan.class_names) + 2) + on_scan
    return InferenceEstimate(calls * cost.seconds * per_call, max(grid_phase, scan_phase) + int(cost.bytes * per_call), calls, grid,
                             cost.device)
