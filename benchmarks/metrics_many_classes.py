"""Per-class metrics with many classes: CPU seconds for one case before and after the per-class boxes.

A real CT (the 20-slice 512x512 DICOM series, and the 112-slice 3 mm abdominal CT) has its body
(HU > -300, largest component) cut into 50 regions by a 10 x 5 grid at the quantiles of the body's
x and y coordinates: the reference, 50 classes. The prediction is the same cut of a slightly
different body (HU > -200, moved by one voxel in y and x) with the grid lines moved two voxels:
misplaced borders everywhere, as a real prediction has. Timed: `semiseg.metrics.case_metrics` (each
class measured on its bounding box, boxes found in one pass) against the implementation before it
(each class's masks compared over the whole volume), which this script keeps for the comparison;
the largest difference between their Dice, Jaccard, HD95 and ASD is reported (must be <= 1e-6).
Writes benchmarks/results/metrics_many_classes.{json,md}.

  OMP_NUM_THREADS=1 python benchmarks/metrics_many_classes.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from semiseg.io import read_volume
from semiseg.metrics import METRICS, binary_metrics, case_metrics

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SAMPLES = Path(os.environ.get("SEMISEG_SAMPLES", ROOT.parent / "shared" / "data" / "samples"))
SCANS = {"DICOM CT series": SAMPLES / "example_ct_dicom", "abdominal CT": SAMPLES / "example_ct.nii.gz"}
GRID = (10, 5)  # cuts along x, along y: 50 regions


def body(image: np.ndarray, threshold: float) -> np.ndarray:
    components, count = ndimage.label(image > threshold)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    return components == sizes.argmax()


def grid_regions(mask: np.ndarray, cuts_x: np.ndarray, cuts_y: np.ndarray) -> np.ndarray:
    """Class 1 + (x cell) * len(y cells) + (y cell) inside the mask, 0 outside."""
    _, y, x = np.indices(mask.shape, sparse=True)
    cell = np.searchsorted(cuts_x, x) * (len(cuts_y) + 1) + np.searchsorted(cuts_y, y)
    return np.where(mask, cell + 1, 0).astype(np.uint8)


def split_case(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    reference_body = body(image, -300)
    _, y, x = np.nonzero(reference_body)
    cuts_x = np.quantile(x, np.linspace(0, 1, GRID[0] + 1)[1:-1])
    cuts_y = np.quantile(y, np.linspace(0, 1, GRID[1] + 1)[1:-1])
    reference = grid_regions(reference_body, cuts_x, cuts_y)
    predicted_body = np.roll(body(image, -200), (0, 1, 1), axis=(0, 1, 2))
    prediction = grid_regions(predicted_body, cuts_x + 2, cuts_y + 2)
    return prediction, reference


def whole_volume_metrics(prediction: np.ndarray, reference: np.ndarray, class_ids, spacing) -> dict[int, dict[str, float]]:
    """case_metrics as it was before the per-class boxes."""
    return {int(c): binary_metrics(prediction == c, reference == c, spacing) for c in class_ids}


def timed(function, repeats: int) -> tuple[float, dict]:
    best, result = float("inf"), {}
    for _ in range(repeats):
        start = time.process_time()  # CPU seconds: the machine is shared, its wall clock depends on the other jobs
        result = function()
        best = min(best, time.process_time() - start)
    return best, result


def largest_difference(first: dict, second: dict) -> float:
    differences = [abs(first[c][m] - second[c][m]) for c in first for m in METRICS if not np.isnan(first[c][m])]
    nan_mismatch = any(np.isnan(first[c][m]) != np.isnan(second[c][m]) for c in first for m in METRICS)
    return float("inf") if nan_mismatch else max(differences)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timings per implementation (the fastest is kept)")
    args = parser.parse_args()
    rows = []
    for name, path in SCANS.items():
        volume = read_volume(path)
        prediction, reference = split_case(volume.array)
        class_ids = list(range(1, GRID[0] * GRID[1] + 1))
        spacing = volume.geometry.spacing_zyx
        before, old = timed(lambda: whole_volume_metrics(prediction, reference, class_ids, spacing), args.repeats)
        after, new = timed(lambda: case_metrics(prediction, reference, class_ids, spacing), args.repeats)
        rows.append({"scan": name, "shape_zyx": list(volume.shape), "spacing_zyx_mm": [round(s, 4) for s in spacing],
                     "classes": len(class_ids), "classes_in_reference": int(len(np.unique(reference)) - 1),
                     "seconds_before": round(before, 3), "seconds_after": round(after, 3), "speedup": round(before / after, 1),
                     "largest_difference": largest_difference(old, new),
                     "mean_dice": round(float(np.mean([new[c]["dice"] for c in class_ids])), 4)})
        print(rows[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    environment = {"machine": platform.machine(), "processor": platform.processor() or "unknown", "cpus": os.cpu_count(),
                   "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "repeats": args.repeats}
    (RESULTS / "metrics_many_classes.json").write_text(json.dumps({"environment": environment, "rows": rows}, indent=2) + "\n")
    lines = ["# Per-class metrics with 50 classes: one case, before and after the per-class boxes", "",
             f"`python benchmarks/metrics_many_classes.py --repeats {args.repeats}`: CPU seconds of one case's Dice, Jaccard, HD95 "
             f"and ASD for every class (fastest of {args.repeats}; {environment['cpus']} CPUs, OMP_NUM_THREADS="
             f"{environment['omp_num_threads']}; CPU time because the machine is shared). Before: each class's masks over the "
             "whole volume (then cropped for the distances); after: each class on its box, the boxes from one pass. The "
             "distance transforms on the boxes, the same in both, are most of what remains. The largest difference is over "
             "every class and metric.", "",
             "| Scan | Shape (z, y, x) | Classes | Before (CPU s) | After (CPU s) | Speed-up | Largest difference | Mean Dice |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['scan']} | {' x '.join(map(str, row['shape_zyx']))} | {row['classes_in_reference']} | {row['seconds_before']} | "
                     f"{row['seconds_after']} | {row['speedup']}x | {row['largest_difference']:.1e} | {row['mean_dice']} |")
    (RESULTS / "metrics_many_classes.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
