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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from semiseg.errors import InputError
from semiseg.io import Volume
from semiseg.preprocessing import Plan

ProgressCallback = Callable[[dict], None]
logger = logging.getLogger(__name__)


@torch.no_grad()
def predict_probabilities(
    image: np.ndarray,
    predictors: list[Callable[[torch.Tensor], torch.Tensor]],
    patch_size: tuple[int, int, int],
    device: torch.device,
    overlap: float = 0.5,
    tta: bool = False,
    sw_batch_size: int = 2,
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
    sw_batch_size: int = 2,
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
