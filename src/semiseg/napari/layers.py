"""Layers <-> volumes, keeping every scan's physical geometry; error maps and metric tables.

napari places a volume with its `affine` (spacing × direction cosines, origin; see `placement`), so
world coordinates are physical ones. The full geometry is also kept in `layer.metadata` and is what
every writer uses, so an exported mask lands exactly on its scan's grid whatever the viewer did
with the layer's display transform.

Metadata keys set on layers this plugin makes (all JSON-able):
  geometry       semiseg.io.Geometry.to_dict() of the voxel grid (SimpleITK x, y, z order)
  shape          [z, y, x] of the array the geometry belongs to
  source_path    the file or DICOM folder the scan (or the label file) was read from
  image_path     for a label map: the scan it belongs to, when known
  role           image | labels | prediction | entropy | disagreement | errors | correction
  class_names    {"1": "Anterior", ...} for label maps
  checkpoint, checkpoint_sha256, method   for predictions: the model that made them
  written_digest a digest of the data the plugin last wrote into the layer (to notice user edits)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from semiseg.errors import InputError
from semiseg.io import Geometry, Volume, strip_suffix
from semiseg.metrics import METRICS, case_metrics
from semiseg.napari.placement import display_kwargs, geometry_of_matrix, layer_world_matrix, world_matrix
from semiseg.napari.windows import DEFAULT_CT_WINDOW, is_ct, window_limits

# Distinct values (in a sample of voxels) up to which an integer volume opens as a label map.
MAX_LABEL_VALUES = 32
_SAMPLE_VOXELS = 1_000_000
_LABEL_NAME_HINTS = ("_seg", "-seg", "_label", "_labels", "_mask", "-mask", "_gt")

# Error map values and colours (Okabe-Ito, distinguishable with the common colour-vision deficiencies).
ERROR_NAMES = {0: "correct", 1: "false positive", 2: "false negative", 3: "wrong class"}
ERROR_COLORS = {0: (0.0, 0.0, 0.0, 0.0), 1: (0.835, 0.369, 0.0, 1.0), 2: (0.0, 0.447, 0.698, 1.0), 3: (0.941, 0.894, 0.259, 1.0)}
UNCERTAINTY_COLORMAP = "magma"
# Class colours of prediction and correction layers: chosen far (RGB distance > 0.4) from every
# error-map colour, so that a class is never read as a false positive or negative. Class k takes
# colour (k - 1) mod 6; a value no class has (painted by hand) shows in light grey.
CLASS_COLORS = ((0.0, 0.8, 0.4, 1.0), (0.8, 0.4, 0.8, 1.0), (0.55, 0.85, 0.95, 1.0),
                (1.0, 0.6, 0.8, 1.0), (0.45, 0.3, 0.75, 1.0), (0.2, 0.5, 0.2, 1.0))
UNNAMED_CLASS_COLOR = (0.8, 0.8, 0.8, 1.0)


# Geometry <-> layer ------------------------------------------------------------------------------

def geometry_metadata(geometry: Geometry, shape: tuple[int, ...], source_path: str | None = None, **extra: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"geometry": geometry.to_dict(), "shape": [int(s) for s in shape]}
    if source_path is not None:
        metadata["source_path"] = str(source_path)
    metadata.update({k: v for k, v in extra.items() if v is not None})
    return metadata


def geometry_from(metadata: Mapping[str, Any] | None, shape: tuple[int, ...], world: np.ndarray | None = None,
                  name: str = "layer") -> Geometry:
    """The geometry of a layer's data: from its metadata (checked against the data's shape), else
    from its full data-to-world matrix (a layer another plugin placed)."""
    metadata = metadata or {}
    if "geometry" in metadata:
        recorded = metadata.get("shape")
        if recorded is not None and tuple(int(s) for s in recorded) != tuple(shape):
            raise InputError(
                f"'{name}': its data has shape {tuple(shape)} but its scan geometry was recorded for shape "
                f"{tuple(recorded)}; it no longer matches its scan"
            )
        try:
            return Geometry.from_dict(metadata["geometry"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"'{name}': its recorded geometry is unreadable") from None
    if len(shape) != 3:
        raise InputError(f"'{name}': data of shape {tuple(shape)}; semiseg works on 3D volumes")
    if world is None:
        raise InputError(f"'{name}': its geometry is unknown")
    return geometry_of_matrix(world, name)


def layer_array(layer) -> np.ndarray:
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    array = np.asarray(data)
    if getattr(layer, "rgb", False):
        raise InputError(f"'{layer.name}' is an RGB image; semiseg segments single-channel 3D scans")
    if array.ndim != 3:
        raise InputError(f"'{layer.name}' has {array.ndim} dimensions (shape {array.shape}); semiseg works on 3D volumes")
    return array


def volume_from_layer(layer, copy: bool = False) -> Volume:
    array = layer_array(layer)
    geometry = geometry_from(layer.metadata, array.shape, layer_world_matrix(layer), layer.name)
    return Volume(np.array(array, copy=True) if copy else array, geometry)


def volume_from_attributes(data, attributes: Mapping[str, Any]) -> Volume:
    """For npe2 writers, which receive (data, attributes) instead of a layer."""
    array = np.asarray(data[0] if attributes.get("multiscale") else data)
    name = attributes.get("name", "layer")
    if array.ndim != 3:
        raise InputError(f"'{name}' has {array.ndim} dimensions (shape {array.shape}); semiseg writes 3D volumes")
    geometry = geometry_from(attributes.get("metadata"), array.shape, world_matrix(attributes), name)
    return Volume(array, geometry)


def labels_array(array: np.ndarray, name: str = "labels") -> np.ndarray:
    """Label values in the smallest unsigned integer type that holds them (refusing negatives)."""
    array = np.asarray(array)
    if array.dtype.kind == "b":
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(np.equal(np.mod(array, 1), 0)):
            raise InputError(f"'{name}': label values must be whole numbers")
    elif array.dtype.kind not in "iu":
        raise InputError(f"'{name}': {array.dtype} data is not a label map")
    if array.size == 0:
        return array.astype(np.uint8)
    low, high = array.min(), array.max()
    if low < 0:
        raise InputError(f"'{name}': negative label value {int(low)}")
    for dtype in (np.uint8, np.uint16, np.uint32):
        if high <= np.iinfo(dtype).max:
            return array.astype(dtype, copy=False)
    return array.astype(np.uint64, copy=False)


def data_digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


# Reading ------------------------------------------------------------------------------------------

def _sample(array: np.ndarray) -> np.ndarray:
    step = max(1, int(round((array.size / _SAMPLE_VOXELS) ** (1 / 3))))
    return array[::step, ::step, ::step] if array.ndim == 3 else array.ravel()[::step**3]


def looks_like_labels(path: str | Path, array: np.ndarray) -> bool:
    """A label map: a file in a folder named labels* (labelsTr, labels, ...), a name ending like a
    segmentation (`_seg`, `_label`, `_mask`), or whole-number data with few distinct values."""
    path = Path(path)
    sample = _sample(array)
    if sample.dtype.kind == "f" and not np.all(np.equal(np.mod(sample, 1), 0)):
        return False
    if sample.size and sample.min() < 0:
        return False
    if path.parent.name.lower().startswith("label"):
        return True
    if strip_suffix(path).lower().endswith(_LABEL_NAME_HINTS):
        return True
    return sample.dtype.kind in "iub" and len(np.unique(sample)) <= MAX_LABEL_VALUES


def label_features(class_names: Mapping[int, str] | None, values: list[int] | None = None) -> dict[str, list] | None:
    """A napari features table naming each label value (shown in the status bar on hover)."""
    if not class_names:
        return None
    indices = sorted(set(int(k) for k in class_names) | set(values or []))
    return {"index": indices, "class": [class_names.get(i, f"class {i}") for i in indices]}


def class_colors(class_names: Mapping[int, str] | None) -> dict[int | None, tuple[float, ...]]:
    """A napari `colormap` dict for a label layer: background transparent, each class its colour."""
    classes = max([int(k) for k in class_names or {}] + [len(CLASS_COLORS)])
    colors: dict[int | None, tuple[float, ...]] = {0: (0.0, 0.0, 0.0, 0.0), None: UNNAMED_CLASS_COLOR}
    colors.update({k: CLASS_COLORS[(k - 1) % len(CLASS_COLORS)] for k in range(1, classes + 1)})
    return colors


def class_volumes_ml(labels: np.ndarray, spacing_zyx, class_names: Mapping[int, str] | None = None) -> dict[int, float]:
    """Volume in mL of every foreground class that is named or present in labels."""
    labels = np.asarray(labels)
    counts = np.bincount(labels.ravel().astype(np.int64, copy=False)) if labels.size else np.zeros(1, np.int64)
    classes = sorted({int(k) for k in class_names or {}} | {int(v) for v in np.flatnonzero(counts)})
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0  # mm^3 -> mL
    return {k: float(counts[k]) * voxel_ml if k < len(counts) else 0.0 for k in classes if k != 0}


def jsonable_names(class_names: Mapping[int, str] | None) -> dict[str, str] | None:
    return None if class_names is None else {str(k): str(v) for k, v in class_names.items()}


def names_from_metadata(metadata: Mapping[str, Any] | None) -> dict[int, str] | None:
    names = (metadata or {}).get("class_names")
    return {int(k): str(v) for k, v in names.items()} if isinstance(names, dict) else None


def volume_layer_data(volume: Volume, name: str, kind: str, source_path: str | None = None, **extra: Any) -> tuple:
    """An npe2 LayerData tuple for a volume, placed physically, with its geometry in metadata."""
    role = extra.pop("role", "labels" if kind == "labels" else "image")
    metadata = geometry_metadata(volume.geometry, volume.shape, source_path, role=role, **extra)
    attributes: dict[str, Any] = {"name": name, "metadata": metadata, **display_kwargs(volume.geometry)}
    if kind == "labels":
        data = labels_array(volume.array, name)
        names = names_from_metadata(metadata)
        attributes["colormap"] = class_colors(names)
        features = label_features(names)
        if features:
            attributes["features"] = features
        return data, attributes, "labels"
    if is_ct(volume.array, metadata):  # shown in a soft-tissue window, not stretched from air to bone
        metadata["modality"] = "CT"
        attributes["contrast_limits"] = list(window_limits(DEFAULT_CT_WINDOW))
    return volume.array, attributes, "image"


# Error maps and metrics ----------------------------------------------------------------------------

def error_map(prediction: np.ndarray, reference: np.ndarray, ignore_label: int | None = None) -> np.ndarray:
    """Per voxel: 0 correct (or unannotated: the reference holds `ignore_label`), 1 false positive
    (predicted a class where the reference has background), 2 false negative (predicted background
    where the reference has a class), 3 wrong class (both foreground, different classes)."""
    prediction = np.asarray(prediction)
    reference = np.asarray(reference)
    if prediction.shape != reference.shape:
        raise InputError(f"the prediction's shape {prediction.shape} differs from the reference's {reference.shape}")
    wrong = prediction != reference
    if ignore_label is not None:
        wrong &= reference != ignore_label
    errors = np.zeros(prediction.shape, np.uint8)
    errors[wrong & (reference == 0)] = 1
    errors[wrong & (prediction == 0)] = 2
    errors[wrong & (prediction != 0) & (reference != 0)] = 3
    return errors


def error_counts(errors: np.ndarray) -> dict[str, int]:
    counts = np.bincount(np.asarray(errors).ravel(), minlength=4)
    return {ERROR_NAMES[i]: int(counts[i]) for i in (1, 2, 3)}


def metrics_rows(prediction: np.ndarray, reference: np.ndarray, class_names: Mapping[int, str], spacing_zyx,
                 ignore_label: int | None = None) -> list[dict[str, Any]]:
    """One row per foreground class: {"class", "id", "dice", "jaccard", "hd95", "asd"} (distances in mm),
    the reference's unannotated voxels (`ignore_label`) left out."""
    ids = sorted(int(c) for c in class_names if int(c) != 0)
    extra = sorted(set(np.unique(reference).tolist()) - set(ids) - {0, ignore_label})
    ids += [int(v) for v in extra]
    results = case_metrics(prediction, reference, ids, tuple(float(s) for s in spacing_zyx), ignore_label)
    return [{"class": class_names.get(i, f"class {i}"), "id": i, **{m: results[i][m] for m in METRICS}} for i in ids]


def format_metric(value: float, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" if metric in ("dice", "jaccard") else f"{value:.2f}"
