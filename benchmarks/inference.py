"""Inference before and after cropping to the body and larger windows (issue #17 part 3).

"before": the sliding window over the whole scan in training-patch windows (`predict_volume(crop=False,
window_scale=1)`), or with `--before-src` the code of an earlier checkout (its `src` folder) as it was;
"after": over the scan's body box (`inference.inference_box`)
in windows of up to `Model.window_scale` patches per axis (`inference.sliding_window`), as `semiseg
predict` and the plugin now run. Each (dataset, mode) runs in a child process, alternating before and
after, so that its peak resident memory is its own and a busy machine slows both alike.

Datasets: the bundled model's 20 held-out hippocampus cases (with their labels: Dice of both modes),
the 20x512x512 DICOM CT series and the 112x101x122 NIfTI CT of ../shared/data/samples (no reference: the
share of voxels whose label changed), and `la`: the 20 LA test.list cases with their labels, given a
model trained on LA (`--checkpoint`, e.g. `semiseg benchmark la ... --out RUN` then RUN/seed-0/last);
the script also reports for how many LA cases the two modes' windows differ at all (they do not when
the body box is the whole volume and no axis holds two patches).

  python benchmarks/inference.py [--checkpoint resources/models/default] [--threads 1] [--repeats 2] [--before-src DIR/src]
  python benchmarks/inference.py --datasets la --checkpoint RUN/seed-0/last

Results: benchmarks/results/inference.json and inference.md; a run replaces the rows of the datasets it
ran and keeps the others (each row records its model and the machine's load).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "data" / "samples"
LA = ROOT.parent / "shared" / "data" / "la"
RESULTS = ROOT / "benchmarks" / "results"
MODES = {"before": {"crop": False, "window_scale": 1}, "after": {"crop": True, "window_scale": None}}  # None: the model's


def cases(dataset: str, checkpoint: str) -> list[tuple[str, str | None]]:
    from semiseg.finetuning import held_out_cases
    from semiseg.models import read_record

    if dataset == "hippocampus":
        return [(image, label) for image, label in held_out_cases(read_record(checkpoint)) or []]
    if dataset == "la":
        files = [next((LA / "2018LA_Seg_Training Set" / case).glob("*.h5")) for case in (LA / "test.list").read_text().split()]
        return [(str(h5), str(h5)) for h5 in files]  # an LA h5 file holds the image and its label
    return [(str(SAMPLES / {"dicom-ct": "example_ct_dicom", "nifti-ct": "example_ct.nii.gz"}[dataset]), None)]


def child(args: argparse.Namespace) -> int:
    """One dataset in one mode: per case seconds, Dice (when labeled) and labels (for the comparison)."""
    import torch

    from semiseg.inference import predict_volume
    from semiseg.io import read_volume
    from semiseg.metrics import case_metrics
    from semiseg.models import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint)
    options = dict(MODES[args.mode])
    options["window_scale"] = options["window_scale"] or getattr(model, "window_scale", 1)
    if "crop" not in inspect.signature(predict_volume).parameters:  # an earlier checkout (--before-src): as it was
        options = {}
    rows = []
    for image, label in cases(args.dataset, args.checkpoint):
        volume = read_volume(image)
        started = time.perf_counter()
        with torch.inference_mode():
            prediction = predict_volume(volume, model.plan, model.predictors(), torch.device("cpu"), model.overlap, **options)
        row = {"case": Path(image).name, "seconds": time.perf_counter() - started, "shape": list(volume.shape)}
        if label is not None:
            reference = read_volume(label, "label") if label.endswith(".h5") else read_volume(label)
            metrics = case_metrics(prediction.labels.array, reference.array, [c for c in model.plan.class_names if c])
            row["dice"] = float(np.mean([m["dice"] for m in metrics.values()]))
        np.save(Path(args.labels_dir) / f"{args.dataset}-{args.mode}-{len(rows)}.npy", prediction.labels.array)
        rows.append(row)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": rows, "peak_rss_mb": peak_mb, "window_scale": options.get("window_scale", 1)}))
    return 0


def la_windows(checkpoint_patch: tuple[int, int, int] = (80, 112, 112)) -> dict:
    """Whether crop and larger windows change the LA test cases' sliding window at the LA protocol's patch."""
    from semiseg.inference import inference_box, sliding_window, windows_per_pass
    from semiseg.io import read_volume
    from semiseg.preprocessing import Plan

    plan = Plan(class_names={0: "background", 1: "left atrium"}, patch_size=checkpoint_patch, target_spacing=None, normalization="zscore")
    ids = (LA / "test.list").read_text().split()
    changed, shapes = 0, []
    for case in ids:
        volume = read_volume(next((LA / "2018LA_Seg_Training Set" / case).glob("*.h5")))
        box = inference_box(volume, plan)
        covered = tuple(s.stop - s.start for s in box)
        window, overlaps = sliding_window(covered, plan.patch_size, 0.5, 2)
        before = windows_per_pass(volume.shape, plan.patch_size, 0.5)
        changed += covered != volume.shape or window != plan.patch_size or windows_per_pass(covered, window, overlaps) != before
        shapes.append(list(volume.shape))
    return {"cases": len(ids), "changed": changed, "patch": list(checkpoint_patch), "shapes": shapes}


def model_description(checkpoint: str) -> str:
    """What the model is, for a row whose checkpoint is not in the repository."""
    from semiseg.models import read_record

    record = read_record(checkpoint)
    options = " ".join(f"{key}={value}" for key, value in sorted(record.network_options.items()))
    return f"{record.method}, {record.network} {options}, {record.iteration} iterations".replace("  ", " ")


def run_child(args: argparse.Namespace, dataset: str, mode: str, labels_dir: Path) -> dict:
    command = [sys.executable, __file__, "--child", "--dataset", dataset, "--mode", mode, "--checkpoint", args.checkpoint,
               "--threads", str(args.threads), "--labels-dir", str(labels_dir)]
    source = args.before_src if mode == "before" and args.before_src else str(ROOT / "src")
    done = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": source})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "resources" / "models" / "default"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each (dataset, mode), alternating")
    parser.add_argument("--datasets", nargs="+", default=["hippocampus", "dicom-ct", "nifti-ct"])
    parser.add_argument("--before-src", help="the src folder of an earlier checkout, to time 'before' as that code ran")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--labels-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    import tempfile

    before_commit = subprocess.run(["git", "-C", args.before_src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() \
        if args.before_src else None
    run = {"checkpoint": str(Path(args.checkpoint).resolve().relative_to(ROOT)) if Path(args.checkpoint).resolve().is_relative_to(ROOT)
           else args.checkpoint, "model": model_description(args.checkpoint), "threads": args.threads, "repeats": args.repeats, "before_commit": before_commit,
           "load_before": os.getloadavg()[0]}
    path = RESULTS / "inference.json"
    results = json.loads(path.read_text()) if path.exists() else {"datasets": {}}
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
               "datasets": results["datasets"], **({"la_windows": results["la_windows"]} if "la_windows" in results else {})}
    with tempfile.TemporaryDirectory() as scratch:
        for dataset in args.datasets:
            runs: dict[str, list[dict]] = {"before": [], "after": []}
            for _ in range(args.repeats):
                for mode in ("before", "after"):
                    runs[mode].append(run_child(args, dataset, mode, Path(scratch)))
                    print(f"{dataset} {mode}: {sum(r['seconds'] for r in runs[mode][-1]['rows']):.1f} s", flush=True)
            count = len(runs["before"][0]["rows"])
            differ = [float(np.mean(np.load(Path(scratch) / f"{dataset}-before-{i}.npy") != np.load(Path(scratch) / f"{dataset}-after-{i}.npy")))
                      for i in range(count)]
            summary = {}
            for mode, repeats in runs.items():
                seconds = [float(np.median([r["rows"][i]["seconds"] for r in repeats])) for i in range(count)]
                summary[mode] = {"seconds_per_volume": float(np.mean(seconds)), "peak_rss_mb": max(r["peak_rss_mb"] for r in repeats),
                                 "window_scale": repeats[0]["window_scale"]}
                if "dice" in repeats[0]["rows"][0]:
                    summary[mode]["dice"] = float(np.mean([row["dice"] for row in repeats[0]["rows"]]))
                    summary[mode]["per_case_dice"] = [row["dice"] for row in repeats[0]["rows"]]
            summary["cases"] = count
            summary["shape"] = runs["before"][0]["rows"][0]["shape"]
            summary["voxels_changed"] = float(np.mean(differ))
            summary["speedup"] = summary["before"]["seconds_per_volume"] / summary["after"]["seconds_per_volume"]
            summary["run"] = {**run, "load_after": os.getloadavg()[0]}
            results["datasets"][dataset] = summary
    if (LA / "test.list").exists():
        results["la_windows"] = la_windows()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    render(results)
    return 0


def render(results: dict) -> None:
    lines = ["# Inference before and after cropping to the body and larger windows", "",
             f"CPU; {results['machine']}; per row its model, torch threads and the machine's load average before and after "
             "(other work was running when it is above 0); median of the alternating runs per volume.", "",
             "Before: windows of the training patch over the whole scan (with a commit: run by that commit's code). After: over "
             "the body box, windows of up to `Model.window_scale` patches per axis with the same overlap in voxels. Reproduce: "
             "`python benchmarks/inference.py` (see its docstring).", "",
             "| data | model | cases | shape (first) | s/volume before | s/volume after | speed-up | peak RSS MB before | after | "
             "Dice before | Dice after | voxels changed | threads, runs | load |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, data in results["datasets"].items():
        before, after, run = data["before"], data["after"], data["run"]
        dice = (f"{before['dice']:.4f} | {after['dice']:.4f}" if "dice" in before else "no reference | no reference")
        model = f"`{run['checkpoint']}`" + (f" ({run['model']})" if run.get("model") else "") \
            + (f" (before: commit {run['before_commit']})" if run.get("before_commit") else "")
        lines.append(f"| {name} | {model} | {data['cases']} | {'x'.join(map(str, data['shape']))} | {before['seconds_per_volume']:.2f} | "
                     f"{after['seconds_per_volume']:.2f} | {data['speedup']:.2f}x | {before['peak_rss_mb']:.0f} | {after['peak_rss_mb']:.0f} | "
                     f"{dice} | {100 * data['voxels_changed']:.3f}% | {run['threads']}, {run['repeats']} | "
                     f"{run['load_before']:.2f} -> {run['load_after']:.2f} |")
    la = results.get("la_windows")
    if la:
        timed = "timed in the table" if "la" in results["datasets"] else "not timed: no LA model"
        lines += ["", f"LA test cases ({la['cases']}, patch {'x'.join(map(str, la['patch']))}): the sliding window changes for "
                  f"{la['changed']} of them ({timed})."]
    (RESULTS / "inference.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
