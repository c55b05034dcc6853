"""Warnings for a scan (or a reference label map) that does not fit the model about to segment it.

Each warning is one plain sentence; none of them stops a prediction: the user may know better
(a phantom, an unusual but valid protocol), so the engine says what it sees and goes on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from semiseg.io import Volume, volume_suffix
from semiseg.preprocessing import TRAINING_PERCENTILES, Plan, sample_voxels

# Air is about -1000 HU, so a CT's 0.5th percentile is far below zero; MR intensities are
# non-negative and intensity-normalised volumes stay within a few units of zero.
CT_LOW_PERCENTILE_BELOW = -500.0
# Beyond half or twice the training spacing, structures appear at a scale the network never saw
# (and resampling to the model's grid has to invent or throw away more than half the detail).
SPACING_FACTOR = 2.0


def mismatch_warnings(
    volume: Volume,
    plan: Plan,
    class_names: Mapping[int, str] | None = None,
    reference_class_names: Mapping[int, str] | None = None,
    source: str | os.PathLike | None = None,
) -> list[str]:
    """Sentences on what about the scan (read from source) and its reference label map's classes
    is far from what the model (plan, class_names: the plan's by default) was trained on."""
    warnings = []
    if source is not None and volume_suffix(source) == ".h5":
        warnings.append(f"{Path(source).name}: an h5 volume records no voxel spacing, so it is placed at 1 mm voxels; "
                        "its sizes and distances are in voxels, not mm")
    warnings += _intensity_warnings(volume, plan)
    warnings += _spacing_warnings(volume, plan)
    if reference_class_names is not None:
        warnings += _class_name_warnings(dict(class_names or plan.class_names), dict(reference_class_names))
    return warnings


def _intensity_warnings(volume: Volume, plan: Plan) -> list[str]:
    if plan.training_percentiles is None:
        return []  # a plan from before training statistics were recorded
    low, median, high = (float(v) for v in np.percentile(sample_voxels(volume.channel(0).array, "scan"), TRAINING_PERCENTILES))
    train_low, _, train_high = plan.training_percentiles
    scan_kind, train_kind = _modality(low), _modality(train_low)
    seen = f"this scan's intensities (median {_number(median)}, 0.5-99.5%: {_number(low)}..{_number(high)})"
    trained = f"({_number(train_low)}..{_number(train_high)})"
    if scan_kind != train_kind:
        return [f"{seen} look like {scan_kind}; the model was trained on {train_kind}-like intensities {trained}"]
    if plan.normalization == "ct" and not train_low <= median <= train_high:
        # CT normalisation is global (not per scan): a median outside the training range means
        # most of the scan is clipped to one end before the network sees it.
        return [f"{seen} are far from the training scans' intensities {trained}"]
    return []


def _number(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _modality(low_percentile: float) -> str:
    return "CT" if low_percentile < CT_LOW_PERCENTILE_BELOW else "MR"


def _spacing_warnings(volume: Volume, plan: Plan) -> list[str]:
    if plan.training_spacing_range is None:
        return []
    smallest, largest = (np.asarray(bound) for bound in plan.training_spacing_range)
    spacing = np.asarray(volume.geometry.spacing_zyx)
    if np.all(spacing <= largest * SPACING_FACTOR) and np.all(spacing >= smallest / SPACING_FACTOR):
        return []
    if np.allclose(smallest, largest):
        trained = f"{_mm(smallest)} mm"
    else:
        trained = f"{_mm(smallest)} to {_mm(largest)} mm"
    return [f"this scan's voxel spacing {_mm(spacing)} mm (z, y, x) is more than {SPACING_FACTOR:g}x off the training scans' {trained}"]


def _mm(spacing: np.ndarray) -> str:
    return " x ".join(f"{v:.3g}" for v in spacing)


def _class_name_warnings(model_names: dict[int, str], reference_names: dict[int, str]) -> list[str]:
    def foreground(names: dict[int, str]) -> dict[int, str]:
        return {int(k): str(v) for k, v in names.items() if int(k) != 0}

    model, reference = foreground(model_names), foreground(reference_names)
    if {k: v.strip().lower() for k, v in model.items()} == {k: v.strip().lower() for k, v in reference.items()}:
        return []
    return [f"the reference's classes ({_listed(reference)}) differ from the model's ({_listed(model)}); "
            "its Dice and distances compare different structures"]


def _listed(names: dict[int, str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(names.items())) or "none"
