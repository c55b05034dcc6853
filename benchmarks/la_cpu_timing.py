"""How long one Left Atrium protocol training iteration takes on this machine's CPU.

One iteration as the shared trainer runs it for mean-teacher: the papers' VNet (base_filters 16),
2 labeled + 2 unlabeled patches of 112x112x80 (x,y,z) = (80, 112, 112) in semiseg's (z, y, x),
the method's losses, one backward, an SGD step and the teacher's EMA update. The patches are cut
from real LA cases. Also timed: one evaluation window (a VNet-16 forward of one 112x112x80 patch),
the unit of the protocol's sliding-window evaluation. Writes benchmarks/results/la_cpu_timing.{json,md}.

  python benchmarks/la_cpu_timing.py --threads 1 2 --iterations 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LA = Path(os.environ.get("SEMISEG_LA", ROOT.parent / "shared" / "data" / "la"))
PATCH_ZYX = (80, 112, 112)


def real_patches(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [line.strip() for line in (LA / "train.list").read_text().splitlines() if line.strip()][:count]
    images, labels = [], []
    for case_id in ids:
        with h5py.File(next(LA.rglob(f"{case_id}/mri_norm2.h5")), "r") as handle:
            image, label = handle["image"][()].transpose(2, 1, 0), handle["label"][()].transpose(2, 1, 0)
        centre = np.argwhere(label > 0).mean(0).astype(int)
        start = [int(np.clip(c - p // 2, 0, n - p)) for c, p, n in zip(centre, PATCH_ZYX, image.shape)]
        box = tuple(slice(s, s + p) for s, p in zip(start, PATCH_ZYX))
        images.append(torch.from_numpy(np.ascontiguousarray(image[box], dtype=np.float32))[None])
        labels.append(torch.from_numpy(np.ascontiguousarray(label[box]).astype(np.int64))[None])
    return torch.stack(images), torch.stack(labels)


def time_training(threads: int, iterations: int, images, labels) -> list[float]:
    from semiseg.methods import build_method
    from semiseg.methods.base import NetworkSpec, StepInfo

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    method = build_method("mean-teacher", 1, 2, NetworkSpec("vnet", {"base_filters": 16}), {})
    method.train()
    optimizer = torch.optim.SGD([p for p in method.networks["student"].parameters()], lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True)
    labeled = {"image": images[:2], "label": labels[:2], "image_strong": images[:2]}
    unlabeled = {"image": images[2:], "image_strong": images[2:]}
    seconds = []
    for iteration in range(iterations + 1):  # the first one warms up
        started = time.perf_counter()
        step = StepInfo(iteration, 6000)
        optimizer.zero_grad(set_to_none=True)
        losses = method(labeled, unlabeled, step)
        sum(losses.values()).backward()
        optimizer.step()
        method.after_step(step)
        if iteration:
            seconds.append(time.perf_counter() - started)
    return seconds


@torch.no_grad()
def time_window(threads: int, repeats: int, images) -> list[float]:
    from semiseg.networks import build_network

    torch.set_num_threads(threads)
    net = build_network("vnet", 1, 2, base_filters=16).eval()
    net(images[:1])
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        net(images[:1])
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    images, labels = real_patches(4)
    load_before = os.getloadavg()
    runs = []
    for threads in args.threads:
        train = time_training(threads, args.iterations, images, labels)
        window = time_window(threads, args.iterations, images)
        runs.append({"threads": threads, "train_iteration_s": train, "window_forward_s": window})
        print(f"{threads} thread(s): training iteration {np.mean(train):.1f} s (each: {', '.join(f'{s:.1f}' for s in train)}); "
              f"one 112x112x80 window forward {np.mean(window):.2f} s", flush=True)
    record = {
        "what": "mean-teacher, VNet base_filters 16, 2 labeled + 2 unlabeled patches of 112x112x80, SGD + EMA; and one VNet-16 forward of a 112x112x80 window",
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "runs": runs,
        "command": "python benchmarks/la_cpu_timing.py " + " ".join(["--threads", *map(str, args.threads), "--iterations", str(args.iterations)]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "la_cpu_timing.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = ["# Left Atrium protocol on this CPU: one training iteration", "",
             f"Command: `{record['command']}` ({record['cores']} cores, torch {record['torch']}; load average before "
             f"{load_before[0]:.2f}, after {record['load_average_after'][0]:.2f} — other work was running on the machine).", "",
             "| torch threads | one training iteration (s) | one 112×112×80 window forward (s) | 6000 iterations (h) |",
             "|---:|---:|---:|---:|"]
    for run in runs:
        mean = float(np.mean(run["train_iteration_s"]))
        lines.append(f"| {run['threads']} | {mean:.1f} | {np.mean(run['window_forward_s']):.2f} | {mean * 6000 / 3600:.0f} |")
    (RESULTS / "la_cpu_timing.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
