"""Per-class segmentation metrics for 3D label maps: Dice, Jaccard, HD95 and ASD.

Arrays are numpy-ordered (z, y, x); a spacing is given in the same (z, y, x) order, in mm. With
``spacing=None`` (or all ones) distances are in voxels, as the LA papers report them.

The semantics are those of ``medpy.metric.binary`` (``dc``, ``jc``, ``hd95``, ``asd``), the
implementation the semi-supervised segmentation papers report with:

- Dice = 2|A∩B| / (|A| + |B|), Jaccard = |A∩B| / |A∪B|;
- a mask's surface is the mask minus its erosion by the connectivity-1 structure
  (``generate_binary_structure(ndim, 1)``; outside the array counts as background);
- the distance from a surface voxel of A to B is the Euclidean distance transform of the
  complement of B's surface (``distance_transform_edt(..., sampling=spacing)``) at that voxel;
- HD95 is the 95th percentile (numpy's linear interpolation) of the distances of both directions
  pooled together: ``percentile(hstack((d_pred_to_ref, d_ref_to_pred)), 95)``;
- ASD is directed, prediction -> reference: the mean of the distances from the prediction's
  surface voxels to the reference's surface (``medpy.metric.binary.asd(prediction, reference)``).

Empty masks never raise (medpy raises for the distances):

- both empty: dice 1, jaccard 1, hd95 0, asd 0 (a correct "nothing here"; medpy's dc/jc mean 1
  here too, but return NaN because numpy's 0/0 never raises their ZeroDivisionError);
- exactly one empty: dice 0, jaccard 0, hd95 NaN, asd NaN (a distance to nothing is undefined).

The aggregations (``summarize``, ``markdown_summary``) skip NaN values when averaging and report
how many were skipped. medpy is not imported here: it is only the tests' reference.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from semiseg.errors import InputError
from semiseg.io import Volume, check_same_grid, read_volume, strip_suffix, volume_suffix

METRICS = ("dice", "jaccard", "hd95", "asd")
METRIC_TITLES = {"dice": "Dice", "jaccard": "Jaccard", "hd95": "HD95", "asd": "ASD"}
# Decimals shown in the Markdown table: overlaps are fractions, distances mm or voxels.
METRIC_DECIMALS = {"dice": 4, "jaccard": 4, "hd95": 2, "asd": 2}
CSV_COLUMNS = ("case", "class", *METRICS)
# Dataset holding the label map in an .h5 file (the LA benchmark's layout).
H5_LABEL_DATASET = "label"
_MAX_LISTED = 5

Spacing = tuple[float, float, float]


def binary_metrics(
    prediction: np.ndarray, reference: np.ndarray, spacing: Spacing | None = None
) -> dict[str, float]:
    """Dice, Jaccard, HD95 and directed ASD (prediction -> reference) of two binary masks.

    Nonzero voxels are foreground. ``spacing`` is per axis, in the arrays' order (z, y, x);
    None gives distances in voxels. See the module docstring for the empty-mask values.
    """
    prediction = np.asarray(prediction)
    reference = np.asarray(reference)
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from reference shape {reference.shape}")
    if prediction.ndim == 0:
        raise ValueError("expected arrays with at least one dimension")
    sampling = _sampling(spacing, prediction.ndim)
    pred = prediction.astype(bool, copy=False)
    ref = reference.astype(bool, copy=False)

    intersection = int(np.count_nonzero(pred & ref))
    size_pred = int(np.count_nonzero(pred))
    size_ref = int(np.count_nonzero(ref))
    union = size_pred + size_ref - intersection
    if size_pred == 0 and size_ref == 0:
        return {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    dice = 2.0 * intersection / float(size_pred + size_ref)
    jaccard = intersection / float(union)
    if size_pred == 0 or size_ref == 0:
        return {"dice": dice, "jaccard": jaccard, "hd95": math.nan, "asd": math.nan}

    # Every surface voxel lies in the joint bounding box, so neither the erosion (the margin
    # voxel is background, like medpy's outside-the-array) nor any surface-to-surface distance
    # changes when both masks are cropped to it: the results are identical, only faster.
    box = _joint_box(pred, ref, margin=1)
    pred, ref = pred[box], ref[box]
    pred_to_ref, ref_to_pred = _surface_distances(pred, ref, sampling)
    # Not MONAI's HausdorffDistanceMetric(percentile=95): it takes the max of two directed percentiles (mm apart).
    hd95 = float(np.percentile(np.hstack((pred_to_ref, ref_to_pred)), 95))
    asd = float(pred_to_ref.mean())
    return {"dice": float(dice), "jaccard": float(jaccard), "hd95": hd95, "asd": asd}


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty (nothing to score)."""
    total = prediction.sum() + reference.sum()
    return float("nan") if total == 0 else float(2.0 * np.logical_and(prediction, reference).sum() / total)


def case_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    class_ids: Sequence[int],
    spacing: Spacing | None = None,
    ignore_label: int | None = None,
) -> dict[int, dict[str, float]]:
    """``binary_metrics`` of each foreground class (voxels equal to the class id) of two label maps.

    Voxels whose reference is ``ignore_label`` (unannotated) are in neither mask of any class. Each
    class is measured on its bounding box (prediction ∪ reference, one voxel of margin), the boxes
    of all classes found in one pass over each map: with many classes no class costs a pass over
    the whole volume, and the results are those of the whole volume (``binary_metrics`` crops the
    same way).
    """
    prediction = np.asarray(prediction)
    reference = np.asarray(reference)
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from reference shape {reference.shape}")
    if ignore_label is not None:
        prediction = np.where(reference == ignore_label, reference, prediction)  # no class is predicted there
    predicted_boxes, reference_boxes = _class_boxes(prediction, class_ids), _class_boxes(reference, class_ids)
    results = {}
    for class_id in class_ids:
        if class_id > 0:
            box = _union_box([predicted_boxes[int(class_id)], reference_boxes[int(class_id)]], prediction.shape, margin=1)
        else:  # background (or a negative id): no box is smaller than the volume
            box = (slice(None),) * prediction.ndim
        results[int(class_id)] = binary_metrics(prediction[box] == class_id, reference[box] == class_id, spacing)
    return results


def _class_boxes(labels: np.ndarray, class_ids: Sequence[int]) -> dict[int, tuple[slice, ...] | None]:
    """The bounding box of each positive class id in a label map (None where absent), in one pass."""
    positive = [int(c) for c in class_ids if c > 0]
    if not positive:
        return {}
    if labels.dtype.kind == "b":
        labels = labels.view(np.uint8)
    elif labels.dtype.kind not in "iu":  # float maps: only whole values can equal a class id
        labels = np.where(np.mod(labels, 1) == 0, labels, 0).astype(np.int64)
    boxes = ndimage.find_objects(labels, max_label=max(positive))
    return {class_id: boxes[class_id - 1] for class_id in positive}


def _union_box(boxes: Sequence[tuple[slice, ...] | None], shape: tuple[int, ...], margin: int) -> tuple[slice, ...]:
    present = [box for box in boxes if box is not None]
    if not present:
        return (slice(0, 0),) * len(shape)  # the class is in neither map: empty masks
    return tuple(
        slice(max(min(box[axis].start for box in present) - margin, 0), min(max(box[axis].stop for box in present) + margin, size))
        for axis, size in enumerate(shape)
    )


def _sampling(spacing: Spacing | float | None, ndim: int) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    if np.isscalar(spacing):
        values = (float(spacing),) * ndim  # type: ignore[arg-type]
    else:
        values = tuple(float(v) for v in spacing)  # type: ignore[union-attr]
    if len(values) != ndim:
        raise ValueError(f"spacing {tuple(values)} has {len(values)} values for {ndim}D arrays")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing {tuple(values)} must be positive and finite")
    return values


def _joint_box(a: np.ndarray, b: np.ndarray, margin: int) -> tuple[slice, ...]:
    joint = a | b
    box = []
    for axis, size in enumerate(joint.shape):
        others = tuple(i for i in range(joint.ndim) if i != axis)
        present = np.flatnonzero(joint.any(axis=others) if others else joint)
        box.append(slice(max(int(present[0]) - margin, 0), min(int(present[-1]) + 1 + margin, size)))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1)


def _surface_distances(
    pred: np.ndarray, ref: np.ndarray, sampling: tuple[float, ...] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each surface voxel of pred to ref's surface, and from ref's to pred's."""
    pred_surface = _surface(pred)
    ref_surface = _surface(ref)
    pred_to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=sampling)[pred_surface]
    ref_to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)[ref_surface]
    return pred_to_ref, ref_to_pred


# --- aggregation -------------------------------------------------------------------------------


def mean_sd(values: Sequence[float]) -> dict[str, float | int]:
    """Mean and population sd (numpy's ddof=0) of the non-NaN values.

    Returns {"mean", "sd", "n" (values used), "nan" (NaN values skipped)}; mean and sd are NaN
    when no value is left.
    """
    array = np.asarray(list(values), dtype=np.float64).reshape(-1)
    finite = array[~np.isnan(array)]
    if finite.size == 0:
        return {"mean": math.nan, "sd": math.nan, "n": 0, "nan": int(array.size)}
    return {
        "mean": float(finite.mean()),
        "sd": float(finite.std()),
        "n": int(finite.size),
        "nan": int(array.size - finite.size),
    }


def class_order(rows: Sequence[Mapping]) -> list[str]:
    """Class names in the order they first appear in the rows."""
    return list(dict.fromkeys(str(row["class"]) for row in rows))


def summarize(rows: Sequence[Mapping]) -> dict:
    """Per-class and overall mean ± sd of each metric over per-case rows, NaN skipped and counted.

    ``rows`` are like {"case": ..., "class": ..., "dice": ..., "jaccard": ..., "hd95": ..., "asd": ...}.
    Returns {"n_cases": int, "classes": {name: {metric: mean_sd}}, "overall": {metric: mean_sd}},
    where the overall statistics pool every (case, class) row: with every class in every case the
    overall mean is the mean of the per-class means.
    """
    classes = {
        name: {metric: mean_sd([row[metric] for row in rows if str(row["class"]) == name]) for metric in METRICS}
        for name in class_order(rows)
    }
    overall = {metric: mean_sd([row[metric] for row in rows]) for metric in METRICS}
    return {"n_cases": len({row["case"] for row in rows}), "classes": classes, "overall": overall}


def format_mean_sd(stats: Mapping[str, float | int], decimals: int) -> str:
    """"0.8812 ± 0.0123"; "n/a" when no value was defined."""
    if stats["n"] == 0:
        return "n/a"
    return f"{stats['mean']:.{decimals}f} ± {stats['sd']:.{decimals}f}"


def markdown_summary(rows: Sequence[Mapping], title: str, *, unit: str | None = None) -> str:
    """A Markdown table: one row per class and a "mean" row, each metric as "mean ± sd".

    ``unit`` ("mm" or "voxels") labels the distance columns. A note under the table says how
    many undefined (NaN) values were left out of the means.
    """
    summary = summarize(rows)
    headers = ["Class"] + [
        f"{METRIC_TITLES[m]} ({unit})" if unit and m in ("hd95", "asd") else METRIC_TITLES[m] for m in METRICS
    ]
    lines = [f"### {title}", "", f"{summary['n_cases']} cases.", ""]
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * len(METRICS)) + "|")
    entries = list(summary["classes"].items()) + [("mean", summary["overall"])]
    for name, stats in entries:
        cells = [format_mean_sd(stats[m], METRIC_DECIMALS[m]) for m in METRICS]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    skipped = {m: summary["overall"][m]["nan"] for m in METRICS if summary["overall"][m]["nan"]}
    if skipped:
        counts = ", ".join(f"{METRIC_TITLES[m]} {n}" for m, n in skipped.items())
        lines += [
            "",
            f"Undefined values (one mask empty) left out of the means: {counts} of {len(rows)} rows.",
        ]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Write the per-case rows as CSV: case, class, dice, jaccard, hd95, asd, then any other keys."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"{path.parent}: the output folder does not exist")
    columns = list(CSV_COLUMNS)
    for row in rows:
        columns += [key for key in row if key not in columns]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_value(value) for key, value in row.items()})
    return path


def _csv_value(value: object) -> object:
    # repr keeps every digit of a float ("0.8812345678901234", "nan").
    return repr(float(value)) if isinstance(value, (float, np.floating)) else value


# --- folders -----------------------------------------------------------------------------------


def evaluate_folders(
    prediction_dir: str | os.PathLike,
    label_dir: str | os.PathLike,
    class_names: dict[int, str] | None,
    voxel_units: bool = False,
    ignore_label: int | None = None,
) -> list[dict]:
    """Per-case, per-class metrics of the predictions in one folder against the labels in another.

    Files are paired by name without the volume suffix ("case_01.nii.gz" <-> "case_01.nrrd").
    Distances use the label's spacing in mm, or voxels with ``voxel_units``. With
    ``class_names=None`` the classes are the sorted nonzero values found in the labels, named
    by their value (the ``ignore_label`` of unannotated voxels is no class: its voxels are left
    out). Returns rows {"case", "class", "dice", "jaccard", "hd95", "asd"}, sorted by case then
    class id. Raises InputError for unpaired files, unreadable volumes or grids that differ.
    """
    predictions = volume_files(prediction_dir, "prediction")
    labels = volume_files(label_dir, "label")
    return evaluate_pairs(pair_cases(predictions, labels, prediction_dir, label_dir), class_names, voxel_units, ignore_label)


def pair_cases(predictions: Mapping[str, Path], labels: Mapping[str, Path], prediction_dir: str | os.PathLike,
               label_dir: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """(case, prediction, label) for the files of `volume_files` that share a case name, sorted by
    case; raises InputError naming the folders for any file without its partner."""
    no_label = sorted(set(predictions) - set(labels))
    no_prediction = sorted(set(labels) - set(predictions))
    if no_label or no_prediction:
        problems = []
        if no_label:
            problems.append(f"{len(no_label)} prediction(s) without a label in {label_dir}: {_listed(no_label)}")
        if no_prediction:
            problems.append(
                f"{len(no_prediction)} label(s) without a prediction in {prediction_dir}: {_listed(no_prediction)}"
            )
        raise InputError("; ".join(problems))
    return [(case, predictions[case], labels[case]) for case in sorted(labels)]


def evaluate_pairs(
    pairs: Sequence[tuple[str, str | os.PathLike, str | os.PathLike]],
    class_names: dict[int, str] | None,
    voxel_units: bool = False,
    ignore_label: int | None = None,
) -> list[dict]:
    """Per-case, per-class metrics of (case, prediction file, label file) triples, the voxels labeled
    ``ignore_label`` (unannotated) left out; the rest as `evaluate_folders`."""
    pairs = [(case, Path(prediction), Path(label)) for case, prediction, label in pairs]
    if class_names is None:
        found: set[int] = set()
        for _, _, label_path in pairs:
            values = np.unique(_read_label(label_path).array)
            found.update(_class_ids(values, label_path))
        class_names = {class_id: str(class_id) for class_id in sorted(found - {0, ignore_label})}
    class_ids = sorted(int(c) for c in class_names)

    rows: list[dict] = []
    for case, prediction_path, label_path in pairs:
        label = _read_label(label_path)
        prediction = _read_label(prediction_path)
        try:
            check_same_grid(label, prediction, prediction_path.name)
        except InputError as error:
            # check_same_grid speaks of a label against its image; here it is a prediction against its label.
            message = str(error).replace(": label ", ": prediction ", 1).replace(" its image's", " its label's")
            raise InputError(f"{message} ({label_path})") from None
        spacing = None if voxel_units else label.geometry.spacing_zyx
        for class_id, values in case_metrics(prediction.array, label.array, class_ids, spacing, ignore_label).items():
            rows.append({"case": case, "class": class_names[class_id], **values})
    return rows


def volume_files(folder: str | os.PathLike, role: str) -> dict[str, Path]:
    """The volume files of a folder by case name (file name without its volume suffix)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: the {role} folder does not exist")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or volume_suffix(path) is None:
            continue
        name = strip_suffix(path)
        if name in files:
            raise InputError(f"{folder}: two {role} files for case '{name}' ({files[name].name}, {path.name})")
        files[name] = path
    if not files:
        raise InputError(f"{folder}: no {role} volumes (.nii.gz, .nii, .nrrd, .mha, .mhd, .h5)")
    return files


def _read_label(path: Path) -> Volume:
    return read_volume(path, dataset=H5_LABEL_DATASET)


def _class_ids(values: np.ndarray, path: Path) -> list[int]:
    ids = [int(v) for v in values]
    if not np.array_equal(np.asarray(ids, dtype=np.float64), values.astype(np.float64)):
        raise InputError(f"{path}: a label map with non-integer values; expected class ids")
    return ids


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" (and {len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")
