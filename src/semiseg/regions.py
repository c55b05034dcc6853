"""Uncertain regions inside one scan: connected components of a high-uncertainty map, most uncertain first.

The review queue ranks scans; this ranks places within a scan, so a reviewer can jump to where the
model hesitates. Components are face-connected (6-neighbourhood) voxels above a threshold of an
uncertainty map in [0, 1] (`Prediction.entropy` or `.disagreement`), ranked by summed uncertainty,
which weighs both how unsure the model is and over how much tissue.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from semiseg.errors import InputError
from semiseg.inference import Prediction
from semiseg.io import Geometry, Volume

# Half the maximal uncertainty: the model is nearer to a guess than to a decision (for 3 classes, a
# two-way doubt whose runner-up class holds about a quarter of the probability).
DEFAULT_THRESHOLD = 0.5
# Smaller components are speckle (a 2x2x2 cube is the smallest kept): not worth a reviewer's look.
DEFAULT_MIN_VOXELS = 8


@dataclass(frozen=True)
class Region:
    rank: int  # 1 = the most summed uncertainty
    voxels: int
    volume_ml: float
    uncertainty_sum: float
    uncertainty_max: float
    class_id: int  # the predicted class covering most of the region's voxels
    class_name: str
    centre_voxel: tuple[float, float, float]  # (z, y, x) voxel index of the region's centroid
    centre_physical: tuple[float, float, float]  # the same point in SimpleITK physical (x, y, z) mm
    peak_voxel: tuple[int, int, int]  # (z, y, x) of its most uncertain voxel: always inside it, unlike the centroid
    bounding_box: tuple[tuple[int, int], ...]  # (start, stop) per (z, y, x) axis, stop exclusive


def physical_point(geometry: Geometry, index_zyx: np.ndarray) -> np.ndarray:
    """SimpleITK's TransformContinuousIndexToPhysicalPoint for (z, y, x) indices: (x, y, z) mm."""
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    index_xyz = np.asarray(index_zyx, dtype=float)[..., ::-1]
    return np.asarray(geometry.origin) + (index_xyz * np.asarray(geometry.spacing)) @ direction.T


def uncertain_regions(
    uncertainty: Volume,
    labels: Volume,
    class_names: Mapping[int, str],
    threshold: float = DEFAULT_THRESHOLD,
    min_voxels: int = DEFAULT_MIN_VOXELS,
) -> list[Region]:
    """The connected regions of `uncertainty` above `threshold` with at least `min_voxels` voxels,
    sorted by summed uncertainty (largest first), each with its dominant predicted class in `labels`."""
    if uncertainty.shape != labels.shape:
        raise InputError(f"uncertainty map shape {uncertainty.shape} differs from the label map's {labels.shape}")
    if not 0.0 <= threshold < 1.0:
        raise InputError(f"uncertainty threshold must be in [0, 1), got {threshold}")
    values = np.asarray(uncertainty.array, dtype=np.float64)
    components, count = ndimage.label(values > threshold)
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    voxels = np.bincount(components.ravel(), minlength=count + 1)[1:]
    sums = ndimage.sum_labels(values, components, index)
    maxima = ndimage.maximum(values, components, index)
    peaks = ndimage.maximum_position(values, components, index)
    centres = np.asarray(ndimage.center_of_mass(np.ones_like(values), components, index), dtype=float).reshape(-1, 3)
    physical = physical_point(uncertainty.geometry, centres)
    dominant = _dominant_class(components, np.asarray(labels.array), count)
    boxes = ndimage.find_objects(components)
    voxel_ml = float(np.prod(uncertainty.geometry.spacing)) / 1000.0  # mm^3 -> mL
    kept = [i for i in np.argsort(-sums, kind="stable") if voxels[i] >= min_voxels]
    return [
        Region(rank=rank, voxels=int(voxels[i]), volume_ml=float(voxels[i]) * voxel_ml, uncertainty_sum=float(sums[i]),
               uncertainty_max=float(maxima[i]), class_id=int(dominant[i]),
               class_name=class_names.get(int(dominant[i]), str(int(dominant[i]))),
               centre_voxel=tuple(float(c) for c in centres[i]), centre_physical=tuple(float(c) for c in physical[i]),
               peak_voxel=tuple(int(c) for c in peaks[i]),
               bounding_box=tuple((s.start, s.stop) for s in boxes[i]))
        for rank, i in enumerate(kept, start=1)
    ]


def prediction_regions(prediction: Prediction, class_names: Mapping[int, str], **options) -> tuple[str, list[Region]]:
    """The regions of a prediction's disagreement map when it has two networks (their conflict is the
    sharper signal), else of its entropy; with the map's name."""
    name, uncertainty = ("disagreement", prediction.disagreement) if prediction.disagreement is not None else ("entropy", prediction.entropy)
    return name, uncertain_regions(uncertainty, prediction.labels, class_names, **options)


def _dominant_class(components: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Per component (1..count), the label value with the most voxels in it (ties: the lower value)."""
    inside = components > 0
    classes = int(labels.max()) + 1
    pairs = (components[inside].astype(np.int64) - 1) * classes + labels[inside].astype(np.int64)
    return np.bincount(pairs, minlength=count * classes).reshape(count, classes).argmax(1)
