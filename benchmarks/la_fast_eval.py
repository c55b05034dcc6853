"""Fast evaluation against the protocol's on real Left Atrium test cases, with one trained checkpoint.

Protocol: window 112x112x80 (x,y,z), stride 18x18x4, windows averaged (MONAI "constant").
Fast:     the same window, overlap 0.5, Gaussian blending (MONAI "gaussian").
Both predict the same test.list cases with the same checkpoint; the script reports the metrics
(voxels) of each, with and without the largest-connected-component step, their per-case
differences, and the wall time. Writes benchmarks/results/la_fast_eval.{json,md}.

  python benchmarks/la_fast_eval.py --checkpoint runs/la-short/last --data ../shared/data/la --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    from semiseg import benchmark_la as la
    from semiseg.models import read_record

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="the LA folder (train.list, test.list, case folders)")
    parser.add_argument("--cases", type=int, help="only the first N test.list cases (default: all present)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--predictor", help="one predicting network (default: the mean of the method's)")
    parser.add_argument("--train-command", default="", help="the command that trained the checkpoint, for the record")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    split = la.protocol_split(args.data, 8)
    if args.cases:
        split.test = split.test[: args.cases]
    record = read_record(args.checkpoint)
    preset = la.PRESETS["la"]
    report: dict = {"checkpoint": str(args.checkpoint), "iteration": record.iteration, "method": record.method,
                    "network": {"name": record.network, "options": record.network_options}, "cases": split.test, "threads": args.threads,
                    "load_average_before": os.getloadavg(), "evaluations": {}}
    predictions = {}
    protocol_settings, fast_settings = la.eval_settings(preset, False), la.eval_settings(preset, True)
    # The fast stride with the protocol's plain averaging separates the two changes (stride, blending).
    plain = la.EvalSettings(fast_settings.patch_zyx, fast_settings.overlap, "constant", "fast-stride-plain-average",
                            "overlap 0.5, windows averaged (the fast stride with the protocol's blending)")
    for settings in (protocol_settings, fast_settings, plain):
        test = la.TestSet(split, settings, "cpu", args.predictor)
        predicted = test.predict(args.checkpoint)
        predictions[settings.name] = predicted
        entry = {"description": settings.description, "seconds": test.seconds[0], "seconds_per_case": test.seconds[0] / len(split.test)}
        for lcc in (False, True):
            rows = test.rows(*predicted, lcc=lcc)
            entry["lcc" if lcc else "raw"] = {"summary": la.summarize_rows(rows), "cases": rows}
        report["evaluations"][settings.name] = entry
        print(f"{settings.name}: {entry['seconds']:.0f} s for {len(split.test)} cases; Dice {entry['raw']['summary']['dice']['mean']:.4f}", flush=True)
    report["load_average_after"] = os.getloadavg()
    protocol, fast = report["evaluations"]["protocol"], report["evaluations"]["fast"]
    differences = {}
    for variant in ("raw", "lcc"):
        differences[variant] = {}
        for metric in ("dice", "jaccard", "hd95", "asd"):
            a = np.array([row[metric] for row in protocol[variant]["cases"]], dtype=float)
            b = np.array([row[metric] for row in fast[variant]["cases"]], dtype=float)
            diff = b - a
            differences[variant][metric] = {"mean_abs": float(np.nanmean(np.abs(diff))), "max_abs": float(np.nanmax(np.abs(diff))),
                                            "mean_of_fast_minus_protocol": float(np.nanmean(diff))}
    voxels = [float(np.mean(predictions["protocol"][0][c] != predictions["fast"][0][c])) for c in split.test]
    report["differences"] = differences
    report["label_voxels_differing_mean_fraction"] = float(np.mean(voxels))
    report["speedup"] = protocol["seconds"] / fast["seconds"]
    argv = sys.argv[1:]
    if "--train-command" in argv:
        at = argv.index("--train-command")
        argv = argv[:at] + argv[at + 2:]
    report["commands"] = [c for c in (args.train_command, "python " + " ".join([Path(sys.argv[0]).as_posix(), *argv])) if c]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "la_fast_eval.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (RESULTS / "la_fast_eval.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = ["# Fast evaluation vs the LA protocol's stride", "",
             f"Checkpoint: `{report['checkpoint']}` ({report['method']}, {report['network']['name']} {json.dumps(report['network']['options'])}, "
             f"iteration {report['iteration']}); {len(report['cases'])} real LA test.list cases; CPU, {report['threads']} torch thread(s); "
             f"load average {report['load_average_before'][0]:.2f} before, {report['load_average_after'][0]:.2f} after (other work was running).", "",
             "Commands:", ""] + [f"    {c}" for c in report["commands"]] + ["",
             "| evaluation | post-processing | Dice (%) | Jaccard (%) | 95HD (voxel) | ASD (voxel) | seconds per case |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for entry in report["evaluations"].values():
        for variant, label in (("raw", "none"), ("lcc", "largest component")):
            s = entry[variant]["summary"]
            lines.append(f"| {entry['description']} | {label} | {100 * s['dice']['mean']:.2f} | {100 * s['jaccard']['mean']:.2f} | "
                         f"{s['hd95']['mean']:.2f} | {s['asd']['mean']:.2f} | {entry['seconds_per_case']:.1f} |")
    d = report["differences"]
    lines += ["", f"Speed-up of the fast evaluation: {report['speedup']:.2f}x. Voxels whose label differs between the two: "
              f"{100 * report['label_voxels_differing_mean_fraction']:.3f}% on average.", "",
              "Per-case |fast − protocol| (mean / max over the cases):", "",
              "| post-processing | Dice (points %) | Jaccard (points %) | 95HD (voxel) | ASD (voxel) |", "|---|---:|---:|---:|---:|"]
    for variant, label in (("raw", "none"), ("lcc", "largest component")):
        cells = []
        for metric in ("dice", "jaccard", "hd95", "asd"):
            scale = 100 if metric in ("dice", "jaccard") else 1
            cells.append(f"{scale * d[variant][metric]['mean_abs']:.3f} / {scale * d[variant][metric]['max_abs']:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
