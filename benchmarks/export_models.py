"""Exporting the bundled default model: export time, file sizes, and, on three test scans with one
thread, seconds per volume of `predict_volume` (the engine) against the exported TorchScript and
ONNX models through MONAI's sliding window, with the largest probability difference to the engine.

    python benchmarks/export_models.py --out benchmarks/results/export_models

Each volume is timed `--repeats` times after one warm-up volume per runner (TorchScript's profiling
executor optimises during its first calls) and the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from semiseg.inference import predict_volume
from semiseg.io import read_volume
from semiseg.model_export import export_onnx, export_torchscript, load_exported, predict_with_exported, read_spec
from semiseg.models import load_model

ROOT = Path(__file__).resolve().parents[1]
CASES = ["hippocampus_036", "hippocampus_037", "hippocampus_038"]


def seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "resources" / "models" / "default"))
    parser.add_argument("--out", required=True, help="results path without suffix (.json and .md are written)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = load_model(args.checkpoint)
    scans = {case: read_volume(ROOT / "resources" / "hippocampus" / "imagesTs" / f"{case}.nii.gz") for case in CASES}
    engine = {case: predict_volume(scan, model.plan, model.predictors(), torch.device("cpu"), model.overlap) for case, scan in scans.items()}
    results: dict = {"checkpoint": os.path.relpath(args.checkpoint, ROOT), "threads": 1, "repeats": args.repeats, "cases": CASES, "formats": {}}
    runners = {"engine": lambda scan: predict_volume(scan, model.plan, model.predictors(), torch.device("cpu"), model.overlap)}
    with tempfile.TemporaryDirectory() as folder:
        for name, export in (("torchscript", export_torchscript), ("onnx", export_onnx)):
            start = time.perf_counter()
            model_path, plan_path = export(model, Path(folder) / "model", overwrite=True)
            export_seconds = time.perf_counter() - start
            network, spec = load_exported(model_path), read_spec(plan_path)
            difference = max(float(np.abs(predict_with_exported(scan, network, spec) - engine[case].probabilities).max())
                             for case, scan in scans.items())
            results["formats"][name] = {"export_seconds": export_seconds, "bytes": model_path.stat().st_size,
                                        "max_abs_probability_difference": difference}
            runners[name] = lambda scan, network=network, spec=spec: predict_with_exported(scan, network, spec)
        for name, run in runners.items():
            run(scans[CASES[0]])  # warm-up
            results.setdefault("seconds_per_volume", {})[name] = {case: seconds(lambda: run(scan), args.repeats) for case, scan in scans.items()}

    results["load_average_1min"] = os.getloadavg()[0]  # other work on the machine slows every runner alike
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = [f"# Exported default model ({results['threads']} thread, median of {results['repeats']} runs per volume)", "",
             f"Machine load average at the end: {results['load_average_1min']:.1f}.", "",
             "| format | export (s) | file size (MB) | max abs difference in probabilities vs engine |", "|---|---|---|---|"]
    for name, row in results["formats"].items():
        lines.append(f"| {name} | {row['export_seconds']:.2f} | {row['bytes'] / 1e6:.2f} | {row['max_abs_probability_difference']:.2e} |")
    lines += ["", "| seconds per volume | " + " | ".join(results["cases"]) + " | mean |", "|---|" + "---|" * (len(results["cases"]) + 1)]
    for name, per_case in results["seconds_per_volume"].items():
        values = [per_case[case] for case in results["cases"]]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {statistics.mean(values):.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
