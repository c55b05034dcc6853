"""The one prepared GPU check: run it when a GPU machine is lent, never in CI.

  python benchmarks/gpu_check.py --out $OUT/results [--budget 540] [--la-data DIR] [--resume-from DIR]
  python benchmarks/gpu_check.py --make-la-subset la-subset   # here, before: a subset small enough to travel

Within --budget seconds (default 9 minutes, the device tool's per-session allowance less start-up), in order:
1. the CUDA tests (`pytest -m gpu`: tests/test_gpu.py) -> gpu_tests.json;
2. training throughput of every method at the LA patch 112x112x80 (x,y,z), batch 2 labeled + 2 unlabeled, fp32
   and mixed precision (bf16 where the GPU has it), through benchmarks/throughput.py -> gpu_throughput.json;
3. as much of one LA protocol run (mean-teacher, 8 labeled, 6000 iterations, seed 0) as the time left allows,
   checkpointing `last` every 200 iterations, then its last checkpoint evaluated on the 20 test cases with the
   protocol's stride -> gpu_la.json and the run folder `la-run/` (bring it back and pass it as --resume-from
   to continue where it stopped).
Every phase writes its file as soon as it ends, so a run cut short still leaves what it measured. Without a
CUDA device the script refuses with one line and exit status 2 and writes nothing.

The device machine gets the repository only (64 MiB), not ../shared/data: `--make-la-subset DIR` copies the
first 16 train.list cases (8 labeled + 8 unlabeled) and 4 test.list cases with their lists (about 45 MB) into
DIR (keep it git-ignored and name it in the run's carry); the LA rows it gives say how many cases they saw.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LA_DATA = ROOT.parent / "shared" / "data" / "la"


def write(out: Path, name: str, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(data, indent=1))
    print(f"gpu_check: wrote {out / name}", flush=True)


def run_tests(out: Path, seconds: float) -> None:
    started = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(ROOT / "tests")]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds, cwd=ROOT)
        status, tail = done.returncode, (done.stdout + done.stderr)[-3000:]
    except subprocess.TimeoutExpired as expired:
        status, tail = "timeout", str(expired.stdout or "")[-3000:]
    write(out, "gpu_tests.json", {"command": " ".join(command), "returncode": status, "seconds": time.perf_counter() - started,
                                  "summary": tail.strip().splitlines()[-1] if tail.strip() else "", "output_tail": tail})


def run_throughput(out: Path, seconds: float) -> None:
    """throughput.py writes its results after every run, so whatever finished before the deadline is kept."""
    started = time.perf_counter()
    command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--table", "gpu-la", "--datasets", "la",
               "--variants", "no-amp", "default", "--repeats", "1", "--warmup", "3", "--iterations", "8",
               "--infer-volumes", "2", "--threads", "4", "--workers", "4",
               "--conditions", "GPU check: fp32 is variant no-amp, mixed precision (bf16 where supported) is variant default"]
    try:
        subprocess.run(command, timeout=seconds, cwd=ROOT)
        status = "done"
    except subprocess.TimeoutExpired:
        status = "cut at the time budget"
    results = ROOT / "benchmarks" / "results"
    table = json.loads((results / "throughput.json").read_text())["tables"].get("gpu-la", {})
    write(out, "gpu_throughput.json", {"status": status, "seconds": time.perf_counter() - started, "table": table})
    shutil.copy(results / "throughput.md", out / "gpu_throughput.md")


def make_la_subset(target: Path, train_cases: int = 16, test_cases: int = 4) -> None:
    """The LA folder layout with the first train.list and test.list cases, for a machine without ../shared."""
    from semiseg.benchmark_la import TEST_LIST, TRAIN_LIST, protocol_split

    split = protocol_split(LA_DATA, 8)
    chosen = {TRAIN_LIST: split.train_listed[:train_cases], TEST_LIST: split.test_listed[:test_cases]}
    for list_name, ids in chosen.items():
        for case_id in ids:
            source = Path(split.files[case_id])
            destination = target / source.parent.relative_to(LA_DATA)
            destination.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, destination / source.name)
        (target / list_name).write_text("".join(f"{case_id}\n" for case_id in ids))
    print(f"gpu_check: {target}: {len(chosen[TRAIN_LIST])} train and {len(chosen[TEST_LIST])} test cases", flush=True)


def run_la(out: Path, seconds: float, resume_from: Path | None, data: Path) -> None:
    from semiseg import benchmark_la as la

    run = out / "la-run"
    if resume_from is not None and resume_from.resolve() != run.resolve():
        shutil.copytree(resume_from, run, dirs_exist_ok=True)
    started = time.perf_counter()
    def show(event: dict) -> None:
        if event["type"] in ("validation", "selection", "outcome", "end", "cancelled", "resume"):
            print(json.dumps({k: v for k, v in event.items() if k != "cases"}, default=str), flush=True)

    result = la.run_protocol(data, run, {"method": "mean-teacher", "iterations": 6000, "device": "cuda", "overwrite": True},
                             labeled=8, seeds=[0], resume=True, time_limit=seconds, progress=show)
    write(out, "gpu_la.json", {"seconds": time.perf_counter() - started, "result": result})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for gpu_*.json and la-run/")
    parser.add_argument("--budget", type=float, default=540, help="seconds for all phases together (default 540)")
    parser.add_argument("--resume-from", type=Path, help="an la-run/ folder brought back from an earlier check")
    parser.add_argument("--la-data", type=Path, default=LA_DATA, help="the LA folder (train.list, test.list, case folders)")
    parser.add_argument("--make-la-subset", type=Path, metavar="DIR", help="copy a travelling LA subset to DIR and exit")
    args = parser.parse_args()
    if args.make_la_subset:
        make_la_subset(args.make_la_subset)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device here (torch.cuda.is_available() is False); run this on a GPU machine", file=sys.stderr)
        return 2
    deadline = time.perf_counter() + args.budget
    print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, budget {args.budget:.0f} s", flush=True)
    os.environ.setdefault("SEMISEG_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "semiseg-cache"))
    run_tests(args.out, min(120.0, deadline - time.perf_counter()))
    run_throughput(args.out, min(240.0, deadline - time.perf_counter()))
    left = deadline - time.perf_counter() - 20  # keep a margin for writing the results
    if left > 60:
        run_la(args.out, left, args.resume_from, args.la_data)
    else:
        print(f"gpu_check: {left:.0f} s left, the LA run is skipped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
