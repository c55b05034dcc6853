"""Metrics: parity with medpy.metric.binary on real labels, empty cases, aggregation, folders."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from semiseg.errors import InputError
from semiseg.io import Geometry, Volume, read_volume, write_volume
from semiseg.metrics import (
    binary_metrics,
    case_metrics,
    evaluate_folders,
    markdown_summary,
    mean_sd,
    summarize,
    write_csv,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HIPPOCAMPUS_LABELS = DATA / "hippocampus" / "labelsTr"
LA = DATA / "la"
ANISOTROPIC = (2.0, 1.0, 0.7)  # (z, y, x) mm


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"real data not present: {path}")


@pytest.fixture(scope="module")
def medpy_binary():
    return pytest.importorskip("medpy.metric.binary")


@pytest.fixture(scope="module")
def hippocampus_files() -> list[Path]:
    _need(HIPPOCAMPUS_LABELS)
    files = sorted(HIPPOCAMPUS_LABELS.glob("*.nii.gz"))
    if len(files) < 4:
        pytest.skip("fewer than 4 hippocampus labels present")
    return files[:4]


@pytest.fixture(scope="module")
def hippocampus_labels(hippocampus_files) -> dict[str, np.ndarray]:
    return {path.name: read_volume(path).array for path in hippocampus_files}


def _shift(mask: np.ndarray, offset: tuple[int, int, int]) -> np.ndarray:
    """Shift without wrapping: voxels pushed out are lost, voxels coming in are background."""
    out = np.zeros_like(mask)
    source = tuple(slice(max(-o, 0), n - max(o, 0)) for o, n in zip(offset, mask.shape))
    target = tuple(slice(max(o, 0), n - max(-o, 0)) for o, n in zip(offset, mask.shape))
    out[target] = mask[source]
    return out


def _flip_boundary(mask: np.ndarray, rng: np.random.Generator, fraction: float = 0.3) -> np.ndarray:
    """Flip a random fraction of the voxels on both sides of the boundary, like a noisy prediction."""
    boundary = ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)
    flips = boundary & (rng.random(mask.shape) < fraction)
    return mask ^ flips


def _predictions(reference: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "eroded": ndimage.binary_erosion(reference),
        "dilated": ndimage.binary_dilation(reference, iterations=2),
        "shifted": _shift(reference, (1, -2, 1)),
        "noisy": _flip_boundary(reference, rng),
        "shifted_noisy": _flip_boundary(_shift(reference, (0, 1, -1)), rng, 0.2),
    }


def _medpy(medpy_binary, prediction, reference, spacing) -> dict[str, float]:
    return {
        "dice": medpy_binary.dc(prediction, reference),
        "jaccard": medpy_binary.jc(prediction, reference),
        "hd95": medpy_binary.hd95(prediction, reference, voxelspacing=spacing),
        "asd": medpy_binary.asd(prediction, reference, voxelspacing=spacing),
    }


def _assert_parity(ours: dict[str, float], expected: dict[str, float], context: str) -> None:
    assert set(ours) == {"dice", "jaccard", "hd95", "asd"}
    for key in ("dice", "jaccard"):
        assert ours[key] == pytest.approx(expected[key], abs=1e-6), f"{context}: {key}"
    for key in ("hd95", "asd"):
        assert ours[key] == pytest.approx(expected[key], abs=1e-3), f"{context}: {key}"


# --- parity with medpy on real data ------------------------------------------------------------


@pytest.mark.parametrize("spacing", [None, (1.0, 1.0, 1.0), ANISOTROPIC], ids=["voxels", "ones", "anisotropic"])
def test_hippocampus_parity_with_medpy(medpy_binary, hippocampus_labels, spacing):
    rng = np.random.default_rng(1234)
    checked = 0
    distances_seen = set()
    for name, label in hippocampus_labels.items():
        for class_id in (1, 2):
            reference = label == class_id
            assert reference.any(), f"{name} has no class {class_id}"
            for kind, prediction in _predictions(reference, rng).items():
                if not prediction.any():
                    continue
                ours = binary_metrics(prediction, reference, spacing)
                expected = _medpy(medpy_binary, prediction, reference, spacing)
                _assert_parity(ours, expected, f"{name} class {class_id} {kind} spacing {spacing}")
                distances_seen.add(round(ours["asd"], 3))
                checked += 1
    assert checked >= 35
    assert len(distances_seen) > 5  # the perturbations really produce a range of distances


def test_asd_is_directed_prediction_to_reference(medpy_binary, hippocampus_labels):
    reference = next(iter(hippocampus_labels.values())) == 1
    prediction = ndimage.binary_dilation(reference, iterations=3)
    forward = binary_metrics(prediction, reference, ANISOTROPIC)["asd"]
    backward = binary_metrics(reference, prediction, ANISOTROPIC)["asd"]
    assert forward == pytest.approx(medpy_binary.asd(prediction, reference, voxelspacing=ANISOTROPIC), abs=1e-9)
    assert backward == pytest.approx(medpy_binary.asd(reference, prediction, voxelspacing=ANISOTROPIC), abs=1e-9)
    assert abs(forward - backward) > 0.1  # really directed, not symmetric
    # hd95 pools both directions: symmetric.
    assert binary_metrics(prediction, reference)["hd95"] == binary_metrics(reference, prediction)["hd95"]


def test_la_case_parity_with_medpy(medpy_binary):
    h5py = pytest.importorskip("h5py")
    _need(LA / "test.list")
    ids = (LA / "test.list").read_text().split()
    path = next((LA / "2018LA_Seg_Training Set" / i / "mri_norm2.h5" for i in ids
                 if (LA / "2018LA_Seg_Training Set" / i / "mri_norm2.h5").exists()), None)
    if path is None:
        pytest.skip("no LA test case present")
    with h5py.File(path, "r") as handle:
        reference = np.asarray(handle["label"][()]) > 0
    assert reference.any()
    rng = np.random.default_rng(7)
    prediction = _flip_boundary(_shift(ndimage.binary_erosion(reference), (2, -1, 1)), rng, 0.25)
    for spacing in (None, ANISOTROPIC):
        ours = binary_metrics(prediction.astype(np.uint8), reference.astype(np.uint8), spacing)
        _assert_parity(ours, _medpy(medpy_binary, prediction, reference, spacing), f"LA {path.parent.name} {spacing}")
        assert 0.5 < ours["dice"] < 1.0 and ours["hd95"] > 0


def test_masks_touching_the_array_border_match_medpy(medpy_binary, hippocampus_labels):
    # The crop is clipped at the array's edge: the erosion must still treat outside as background.
    label = next(iter(hippocampus_labels.values()))
    reference = label > 0
    reference[:, :, :3] = reference[:, :, 3:6]  # the object now reaches the x = 0 face
    reference[0] |= reference[1]  # and the z = 0 face
    prediction = _shift(reference, (-1, 0, -1))
    for spacing in (None, ANISOTROPIC):
        _assert_parity(binary_metrics(prediction, reference, spacing),
                       _medpy(medpy_binary, prediction, reference, spacing), f"border {spacing}")


def test_cropping_gives_identical_results(hippocampus_labels):
    rng = np.random.default_rng(3)
    label = next(iter(hippocampus_labels.values()))
    reference = label == 2
    prediction = _flip_boundary(_shift(reference, (1, 1, 0)), rng)
    padding = ((40, 7), (3, 50), (21, 0))
    big_reference = np.pad(reference, padding)
    big_prediction = np.pad(prediction, padding)
    for spacing in (None, ANISOTROPIC):
        small = binary_metrics(prediction, reference, spacing)
        big = binary_metrics(big_prediction, big_reference, spacing)
        for key in small:
            assert big[key] == small[key], key  # identical, not merely close


def test_case_metrics_per_class(hippocampus_labels):
    label = next(iter(hippocampus_labels.values()))
    prediction = _shift(label, (0, 1, 0))
    result = case_metrics(prediction, label, [1, 2], ANISOTROPIC)
    assert list(result) == [1, 2]
    for class_id in (1, 2):
        assert result[class_id] == binary_metrics(prediction == class_id, label == class_id, ANISOTROPIC)
    # A class absent from both: the documented "both empty" values.
    assert case_metrics(prediction, label, [9])[9] == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}


# --- synthetic checks --------------------------------------------------------------------------


def test_known_values_on_a_cube():
    reference = np.zeros((10, 10, 10), bool)
    reference[2:6, 2:6, 2:6] = True  # 64 voxels
    prediction = _shift(reference, (0, 0, 1))  # overlap 48
    result = binary_metrics(prediction, reference)
    assert result["dice"] == pytest.approx(2 * 48 / 128)
    assert result["jaccard"] == pytest.approx(48 / 80)
    assert result["hd95"] == pytest.approx(1.0)
    # Spacing scales the shifted axis (x, the last one) only.
    assert binary_metrics(prediction, reference, (5.0, 5.0, 0.5))["hd95"] == pytest.approx(0.5)
    identical = binary_metrics(reference, reference, ANISOTROPIC)
    assert identical == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}


def test_empty_cases_never_raise(medpy_binary):
    empty = np.zeros((6, 7, 8), np.uint8)
    full = empty.copy()
    full[2:4, 2:5, 3:6] = 1
    assert binary_metrics(empty, empty) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    assert binary_metrics(empty, empty, ANISOTROPIC)["hd95"] == 0.0
    for prediction, reference in ((empty, full), (full, empty)):
        result = binary_metrics(prediction, reference, ANISOTROPIC)
        assert result["dice"] == 0.0 and result["jaccard"] == 0.0
        assert math.isnan(result["hd95"]) and math.isnan(result["asd"])
        with pytest.raises(RuntimeError):  # medpy has no value here: ours is NaN by choice
            medpy_binary.hd95(prediction, reference)
        assert medpy_binary.dc(prediction, reference) == 0.0 and medpy_binary.jc(prediction, reference) == 0.0


def test_bad_arguments():
    mask = np.ones((3, 3, 3), bool)
    with pytest.raises(ValueError, match="shape"):
        binary_metrics(mask, np.ones((3, 3, 4), bool))
    with pytest.raises(ValueError, match="spacing"):
        binary_metrics(mask, mask, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        binary_metrics(mask, mask, (1.0, 0.0, 1.0))


# --- aggregation -------------------------------------------------------------------------------


def _rows() -> list[dict]:
    rng = np.random.default_rng(11)
    rows = []
    for i in range(5):
        for name in ("Anterior", "Posterior"):
            rows.append({
                "case": f"hippocampus_{i:03d}",
                "class": name,
                "dice": float(rng.uniform(0.6, 0.95)),
                "jaccard": float(rng.uniform(0.4, 0.9)),
                "hd95": float(rng.uniform(0.5, 8.0)),
                "asd": float(rng.uniform(0.2, 3.0)),
            })
    rows[3].update(dice=0.0, jaccard=0.0, hd95=math.nan, asd=math.nan)  # one empty prediction
    return rows


def test_mean_sd_skips_and_counts_nan():
    assert mean_sd([1.0, math.nan, 3.0]) == {"mean": 2.0, "sd": 1.0, "n": 2, "nan": 1}
    empty = mean_sd([math.nan])
    assert math.isnan(empty["mean"]) and math.isnan(empty["sd"]) and empty["n"] == 0 and empty["nan"] == 1


def test_summarize_matches_numpy():
    rows = _rows()
    summary = summarize(rows)
    assert summary["n_cases"] == 5
    assert list(summary["classes"]) == ["Anterior", "Posterior"]
    for metric in ("dice", "jaccard", "hd95", "asd"):
        for name in ("Anterior", "Posterior"):
            values = np.array([r[metric] for r in rows if r["class"] == name])
            stats = summary["classes"][name][metric]
            assert stats["mean"] == pytest.approx(np.nanmean(values))
            assert stats["sd"] == pytest.approx(np.nanstd(values))
            assert stats["nan"] == int(np.isnan(values).sum())
        values = np.array([r[metric] for r in rows])
        assert summary["overall"][metric]["mean"] == pytest.approx(np.nanmean(values))
        assert summary["overall"][metric]["n"] == int((~np.isnan(values)).sum())
    assert summary["classes"]["Posterior"]["hd95"]["nan"] == 1
    assert summary["overall"]["asd"]["nan"] == 1
    assert summary["classes"]["Anterior"]["hd95"]["nan"] == 0


def test_markdown_summary_values_are_numpy_means():
    rows = _rows()
    text = markdown_summary(rows, "Hippocampus, fold 0", unit="mm")
    assert "### Hippocampus, fold 0" in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == ["Class", "Dice", "Jaccard", "HD95 (mm)", "ASD (mm)"]
    body = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])}
    assert list(body) == ["Anterior", "Posterior", "mean"]
    decimals = {"dice": 4, "jaccard": 4, "hd95": 2, "asd": 2}
    for label, selected in (("Anterior", "Anterior"), ("Posterior", "Posterior"), ("mean", None)):
        for cell, metric in zip(body[label], ("dice", "jaccard", "hd95", "asd")):
            match = re.fullmatch(r"(-?[\d.]+) ± ([\d.]+)", cell)
            assert match, cell
            values = np.array([r[metric] for r in rows if selected is None or r["class"] == selected])
            assert float(match[1]) == pytest.approx(round(float(np.nanmean(values)), decimals[metric]))
            assert float(match[2]) == pytest.approx(round(float(np.nanstd(values)), decimals[metric]))
    assert "HD95 1" in text and "ASD 1" in text and "of 10 rows" in text  # the skipped NaN are reported


def test_markdown_summary_all_undefined_shows_na():
    rows = [{"case": "a", "class": "1", "dice": 0.0, "jaccard": 0.0, "hd95": math.nan, "asd": math.nan}]
    text = markdown_summary(rows, "t")
    assert "| 1 | 0.0000 ± 0.0000 | 0.0000 ± 0.0000 | n/a | n/a |" in text


def test_write_csv_round_trip(tmp_path):
    rows = _rows()
    path = write_csv(rows, tmp_path / "metrics.csv")
    with open(path, newline="", encoding="utf-8") as handle:
        read = list(csv.DictReader(handle))
    assert list(read[0]) == ["case", "class", "dice", "jaccard", "hd95", "asd"]
    assert len(read) == len(rows)
    for original, row in zip(rows, read):
        assert row["case"] == original["case"] and row["class"] == original["class"]
        for metric in ("dice", "jaccard", "hd95", "asd"):
            value = float(row[metric])
            assert (math.isnan(value) and math.isnan(original[metric])) or value == original[metric]
    with pytest.raises(InputError, match="does not exist"):
        write_csv(rows, tmp_path / "missing" / "metrics.csv")


# --- evaluate_folders --------------------------------------------------------------------------


@pytest.fixture()
def folders(tmp_path, hippocampus_files):
    """Three hippocampus labels with an anisotropic spacing, and shifted "predictions" of them."""
    labels, predictions = tmp_path / "labels", tmp_path / "predictions"
    labels.mkdir()
    predictions.mkdir()
    geometry = Geometry(spacing=tuple(reversed(ANISOTROPIC)), origin=(1.0, -2.0, 3.0))
    arrays = {}
    for path in hippocampus_files[:3]:
        label = read_volume(path).array
        prediction = _shift(label, (1, 0, -1))
        name = path.name[: -len(".nii.gz")]
        write_volume(Volume(label, geometry), labels / path.name)
        # Another format on purpose: pairing is by name without the suffix.
        write_volume(Volume(prediction, geometry), predictions / f"{name}.nrrd")
        arrays[name] = (prediction, label)
    return predictions, labels, arrays


def test_evaluate_folders(folders):
    predictions, labels, arrays = folders
    rows = evaluate_folders(predictions, labels, {1: "Anterior", 2: "Posterior"})
    assert [(r["case"], r["class"]) for r in rows] == [
        (case, name) for case in sorted(arrays) for name in ("Anterior", "Posterior")
    ]
    for row in rows:
        prediction, label = arrays[row["case"]]
        class_id = 1 if row["class"] == "Anterior" else 2
        expected = binary_metrics(prediction == class_id, label == class_id, ANISOTROPIC)  # the label's spacing
        assert {k: row[k] for k in expected} == pytest.approx(expected)

    voxels = evaluate_folders(predictions, labels, None, voxel_units=True)
    assert sorted({r["class"] for r in voxels}) == ["1", "2"]  # found in the labels, background left out
    for row in voxels:
        prediction, label = arrays[row["case"]]
        class_id = int(row["class"])
        assert {k: row[k] for k in ("hd95", "asd")} == pytest.approx(
            {k: v for k, v in binary_metrics(prediction == class_id, label == class_id).items() if k in ("hd95", "asd")}
        )
    text = markdown_summary(rows, "folders", unit="mm")
    assert "| Anterior |" in text and "| mean |" in text


def test_evaluate_folders_unpaired_files(folders, tmp_path):
    predictions, labels, arrays = folders
    extra = Volume(np.zeros((4, 5, 6), np.uint8), Geometry())
    for i in range(7):
        write_volume(extra, predictions / f"stray_{i}.nii.gz")
    with pytest.raises(InputError) as info:
        evaluate_folders(predictions, labels, None)
    message = str(info.value)
    assert "\n" not in message
    assert "7 prediction(s) without a label" in message
    assert "stray_0, stray_1, stray_2, stray_3, stray_4 (and 2 more)" in message
    assert "stray_5" not in message

    for i in range(7):
        (predictions / f"stray_{i}.nii.gz").unlink()
    first = sorted(arrays)[0]
    (predictions / f"{first}.nrrd").unlink()
    with pytest.raises(InputError, match=rf"1 label\(s\) without a prediction .*: {first}$"):
        evaluate_folders(predictions, labels, None)


def test_evaluate_folders_grid_mismatch(folders):
    predictions, labels, arrays = folders
    case = sorted(arrays)[0]
    prediction, _ = arrays[case]
    write_volume(Volume(prediction[:-1], Geometry(spacing=tuple(reversed(ANISOTROPIC)))),
                 predictions / f"{case}.nrrd", overwrite=True)
    with pytest.raises(InputError, match=r"prediction shape \(\d+, \d+, \d+\) differs from its label's"):
        evaluate_folders(predictions, labels, None)


def test_evaluate_folders_missing_or_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="does not exist"):
        evaluate_folders(tmp_path / "nowhere", tmp_path / "empty", None)
    with pytest.raises(InputError, match="no prediction volumes"):
        evaluate_folders(tmp_path / "empty", tmp_path / "empty", None)


def test_metrics_module_imports_no_gui_or_medpy():
    import os
    import subprocess
    import sys

    forbidden = ("medpy", "napari", "magicgui", "PyQt5", "PyQt6", "PySide2", "PySide6", "qtpy")
    code = (
        "import sys, semiseg.metrics; "
        f"bad = [m for m in sys.modules if m.split('.')[0] in {forbidden!r}]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
