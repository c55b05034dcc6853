"""Training and inference throughput of every method, through the real Trainer.

For each method (and each named variant of the training settings) one child process runs
`semiseg.training.Trainer` for WARMUP + ITERATIONS iterations. The trainer's step method is wrapped
on the instance so that the clock starts before step WARMUP and stops after the last step (with a
device synchronisation at both ends only, so nothing else in the loop is perturbed). The measured
window therefore includes everything the real loop does between steps: waiting for the data
loaders, host-to-device copies, loss accumulation. The host time spent outside the step (mostly
waiting for the loaders) is reported separately as "loader wait".

Reported per run: seconds per iteration, patches per second (labeled + unlabeled), the first step's
time (it includes torch.compile's compilation when --compile is on), peak host memory of the
training process (ru_maxrss; data-loader workers are separate processes and not included), peak
device memory on CUDA, and inference seconds per volume (`predict_volume` on the trained model,
first volume excluded as warm-up). Each configuration is repeated; tables show medians.

Settings: hippocampus (MSD Task04) on CPU with the plan's patch, and the LA patch 112x112x80
(z, y, x = 80, 112, 112) on CUDA, skipped with a message when no CUDA device is present.

  python benchmarks/throughput.py --table baseline                       # every method, defaults
  python benchmarks/throughput.py --table layout --variants default channels-last --methods supervised mean-teacher
  python benchmarks/throughput.py --check-cpu-bf16   # is torch's CPU bf16 conv3d weight gradient right on small maps?
  python benchmarks/throughput.py --table code --code before=/tmp/before/src --code after=src

--code LABEL=DIR runs the children with DIR first on PYTHONPATH (e.g. an exported older tree:
`git archive COMMIT src | tar -x -C /tmp/before`), interleaved with the other code versions.
Results are added to benchmarks/results/throughput.json (a run of the same table replaces its old
rows) and rendered to throughput.md; text below the notes marker in the .md is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT.parent / "shared" / "data"
NOTES_MARKER = "<!-- notes: text below this line is kept when the tables are rendered again -->"

METHODS = ["supervised", "mean-teacher", "cps", "bcp", "sscl", "3d-cps", "dual-subnet", "voxel-adversarial", "dk-uxnet"]

# Per dataset: data folder, labeled split, patch (None: the plan's), and per-method network settings.
# CPU-sized networks on hippocampus (as in hippocampus_cpu.py); the papers' sizes on LA.
SETTINGS = {
    "hippocampus": {
        "data": [SHARED / "hippocampus", ROOT / "resources" / "hippocampus"],
        "labeled": "10%", "patch": None, "device": "cpu",
        "networks": {
            "default": ("vnet", {"base_filters": 8}, {}),
            "3d-cps": ("residual-unet", {"base_filters": 8}, {}),
            "dk-uxnet": ("uxnet", {"base_filters": 12}, {"queries": 32, "query_dim": 64, "ffn_dim": 256, "heads": 4}),
        },
    },
    "la": {
        "data": [SHARED / "la", ROOT / "la-subset"],  # la-subset: gpu_check.py --make-la-subset, for a machine without ../shared
        "labeled": "8", "patch": (80, 112, 112), "device": "cuda",
        "networks": {
            "default": ("vnet", {}, {}),
            "3d-cps": ("residual-unet", {}, {}),
            "dk-uxnet": ("uxnet", {}, {}),
        },
    },
}

# Named TrainConfig overrides; fields a code version lacks make its child fail with a clear error.
VARIANTS: dict[str, dict] = {
    "default": {},
    "no-amp": {"amp": False},
    "channels-last": {"channels_last": True},
    "compile": {"compile": True},
    "workers0": {"workers": 0},
    "workers1": {"workers": 1},
}


# Child: one measured run ----------------------------------------------------------------------------

def child(spec: dict) -> dict:
    import resource
    import tempfile

    import torch

    import semiseg
    from semiseg.datasets import load_dataset
    from semiseg.inference import predict_volume
    from semiseg.models import load_model
    from semiseg.preprocessing import read_case
    from semiseg.training import TrainConfig, Trainer

    torch.set_num_threads(spec["threads"])
    warmup, measured = spec["warmup"], spec["iterations"]
    total = warmup + measured
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "run"
        settings = dict(
            data=spec["data"], output=str(out), method=spec["method"], network=spec["network"],
            network_options=spec["network_options"], method_options=spec["method_options"], labeled=spec["labeled"],
            validation="0", iterations=total, batch_size=spec["batch_size"], patch_size=spec["patch"],
            log_every=total, validate_every=10**9, seed=0, device=spec["device"], workers=spec["workers"],
        )
        settings.update(spec["overrides"])
        events: list[dict] = []
        trainer = Trainer(TrainConfig(**settings), events.append)
        clock = {"calls": 0, "wait": 0.0, "returned": None, "first": None}

        def synchronize() -> None:
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)

        original = trainer._step

        def timed_step(labeled, unlabeled):
            call = clock["calls"]
            now = time.perf_counter()
            if call > warmup:  # host time outside the step: loaders, copies, bookkeeping
                clock["wait"] += now - clock["returned"]
            if call == 0 and trainer.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(trainer.device)
            if call == warmup:
                synchronize()
                clock["start"] = time.perf_counter()
            losses = original(labeled, unlabeled)
            if call == 0:
                synchronize()
                clock["first"] = time.perf_counter() - now
            if call == total - 1:
                synchronize()
                clock["stop"] = time.perf_counter()
            clock["calls"] += 1
            clock["returned"] = time.perf_counter()
            return losses

        trainer._step = timed_step  # the loop calls self._step: the instance attribute wins
        trainer.run()
        peak_host_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        device = trainer.device
        peak_device_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        sec_per_iter = (clock["stop"] - clock["start"]) / measured
        patches = spec["batch_size"] * (2 if trainer.method.uses_unlabeled else 1)
        last_loss = next(e["loss"] for e in reversed(events) if e["type"] == "iteration")
        compile_events = [e for e in events if e["type"] == "compile"]

        model = load_model(out / "last", device)
        cases = load_dataset(spec["data"]).cases[: spec["infer_volumes"] + 1]
        seconds = []
        for case in cases:
            image, _ = read_case(case)
            synchronize()
            tick = time.perf_counter()
            predict_volume(image, model.plan, model.predictors(), device, model.overlap)
            synchronize()
            seconds.append(time.perf_counter() - tick)
    return {
        "sec_per_iter": sec_per_iter, "patches_per_sec": patches / sec_per_iter, "loader_wait_per_iter": clock["wait"] / measured,
        "first_step_s": clock["first"], "compile_s": compile_events[0]["seconds"] if compile_events else None,
        "peak_host_mb": peak_host_mb, "peak_device_mb": peak_device_mb,
        "infer_sec_per_volume": statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0],
        "infer_volumes": max(len(seconds) - 1, 1), "final_loss": last_loss, "patch": list(trainer.plan.patch_size),
        "device_name": _device_name(device), "semiseg_file": semiseg.__file__,
    }


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def loader_costs(datasets: list[str], samples: int, threads: int) -> list[dict]:
    """Host seconds per training patch (crop + augmentation, one process), with and without the
    strong view: what the loader workers must sustain to keep a device busy."""
    import numpy as np
    import torch

    from semiseg.datasets import choose_split, load_dataset
    from semiseg.networks import build_network, size_multiple
    from semiseg.preprocessing import cached_case, compute_plan
    from semiseg.sampling import PatchDataset, Volumes

    torch.set_num_threads(threads)
    rows = []
    for dataset in datasets:
        setting = SETTINGS[dataset]
        folder = next((p for p in setting["data"] if p.exists()), None)
        if folder is None:
            continue
        data = load_dataset(folder)
        split = choose_split(data, setting["labeled"], "0", 0)
        plan = compute_plan(data, split, size_multiple(build_network("vnet", 1, 2)), setting["patch"])
        by_id = {c.case_id: c for c in data.cases}
        images, labels = zip(*(cached_case(by_id[i], plan, True) for i in split.labeled[:8]))
        for labeled in (True, False):
            for strong in (True, False):
                patches = PatchDataset(Volumes(list(images), list(labels) if labeled else None), plan.patch_size, 0, strong_view=strong)
                seconds = []
                for index in range(samples):
                    tick = time.perf_counter()
                    patches[index]
                    seconds.append(time.perf_counter() - tick)
                rows.append({"dataset": dataset, "patch": list(plan.patch_size), "pool": "labeled" if labeled else "unlabeled",
                             "strong_view": strong, "median_s": statistics.median(seconds), "mean_s": float(np.mean(seconds)),
                             "samples": samples})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def check_cpu_bf16() -> int:
    """CPU bf16 autocast was considered for the trainer; this is why it is not offered: the conv3d
    weight gradient comes out wrong when a feature map is smaller than the kernel (a VNet's deepest
    level on hippocampus patches is 2x3x2), while the input gradient is fine."""
    import torch

    torch.manual_seed(0)
    print(f"torch {torch.__version__}; relative error of bf16 against float64 on the same bf16-rounded values")
    worst = 0.0
    for shape in [(2, 128, 2, 3, 2), (2, 32, 2, 3, 2), (2, 8, 2, 3, 2), (2, 128, 3, 3, 3), (2, 128, 4, 6, 4)]:
        channels = shape[1]
        x = torch.randn(shape).bfloat16()
        w = (torch.randn(channels, channels, 3, 3, 3) * 0.03).bfloat16()
        grad = torch.randn(shape).bfloat16()

        def backward(dtype):
            return torch.ops.aten.convolution_backward(grad.to(dtype), x.to(dtype), w.to(dtype), None, (1, 1, 1), (1, 1, 1),
                                                       (1, 1, 1), False, (0, 0, 0), 1, (True, True, False))[:2]

        reference, low = backward(torch.float64), backward(torch.bfloat16)
        errors = [float((a.double() - b).norm() / b.norm()) for a, b in zip(low, reference)]
        worst = max(worst, errors[1]) if errors[1] == errors[1] else float("inf")
        print(f"  input {shape}: grad_input {errors[0]:.3g}, grad_weight {errors[1]:.3g}")
    print("bf16 rounding alone gives ~2e-3; larger errors mean wrong gradients")
    return 0 if worst < 0.05 else 1


# Parent: the schedule, the machine, the tables --------------------------------------------------------

def machine() -> dict:
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_bf16": "avx512_bf16" in _cpu_flags() or "amx_bf16" in _cpu_flags(),
        "load_average_at_start": list(os.getloadavg()),
    }


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def run_child(spec: dict, source: str | None) -> dict:
    env = dict(os.environ)
    if source:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(source).resolve()), env.get("PYTHONPATH")) if p)
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr or done.stdout)[-1500:]}
    return json.loads(lines[-1][len("RESULT "):])


def median_rows(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["dataset"], run["method"], run["code"], run["variant"]), []).append(run)
    rows = []
    for (dataset, method, code, variant), members in groups.items():
        ok = [m for m in members if "error" not in m]
        row = {"dataset": dataset, "method": method, "code": code, "variant": variant, "n": len(ok), "failed": len(members) - len(ok)}
        for key in ("sec_per_iter", "patches_per_sec", "loader_wait_per_iter", "first_step_s", "compile_s", "peak_host_mb",
                    "peak_device_mb", "infer_sec_per_volume", "final_loss"):
            values = [m[key] for m in ok if m.get(key) is not None]
            row[key] = statistics.median(values) if values else None
            if key == "sec_per_iter" and values:
                row["sec_per_iter_range"] = (min(values), max(values))
        row["error"] = next((m["error"] for m in members if "error" in m), None)
        rows.append(row)
    return rows


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def render(data: dict) -> None:
    path = RESULTS / "throughput.md"
    kept = ""
    if path.exists() and NOTES_MARKER in path.read_text():
        kept = path.read_text().split(NOTES_MARKER, 1)[1].lstrip("\n")
    lines = [
        "# Throughput: training and inference speed per method",
        "",
        "Generated by `benchmarks/throughput.py` (the docstring explains the method): the real Trainer, warm-up",
        "iterations excluded, each configuration repeated in interleaved order, medians shown (s/iter range in brackets).",
        "Patches/s counts labeled + unlabeled patches. Peak host MB is the training process (loader workers excluded).",
        "",
    ]
    for name, table in data["tables"].items():
        m = table["machine"]
        lines += [f"## {name}", "", "```", *table["commands"], "```", "",
                  f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}, "
                  f"torch threads {table['threads']}, loader workers {table['workers']}; CUDA: {m['cuda'] or 'none'}; "
                  f"load average at start {', '.join(f'{v:.2f}' for v in m['load_average_at_start'])}.", ""]
        if table.get("conditions"):
            lines += [table["conditions"], ""]
        for note in table.get("skipped", []):
            lines += [f"- {note}"]
        if table.get("skipped"):
            lines += [""]
        rows = median_rows(table["runs"])
        if rows:
            lines += ["| dataset | method | code | variant | n | s/iter | patches/s | loader wait s/iter | first step s | peak host MB | peak device MB | infer s/vol | final loss |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                spread = r.get("sec_per_iter_range")
                cell = f"{_fmt(r['sec_per_iter'])} [{spread[0]:.3f}–{spread[1]:.3f}]" if spread else "–"
                if r["failed"]:
                    cell += f" ({r['failed']} failed)"
                lines.append(f"| {r['dataset']} | {r['method']} | {r['code']} | {r['variant']} | {r['n']} | {cell} | {_fmt(r['patches_per_sec'], 1)} | "
                             f"{_fmt(r['loader_wait_per_iter'])} | {_fmt(r['first_step_s'], 2)} | {_fmt(r['peak_host_mb'], 0)} | "
                             f"{_fmt(r['peak_device_mb'], 0)} | {_fmt(r['infer_sec_per_volume'])} | {_fmt(r['final_loss'], 4)} |")
            errors = [r for r in rows if r["error"]]
            for r in errors:
                lines += ["", f"{r['method']} ({r['code']}, {r['variant']}) failed: `{r['error'].strip().splitlines()[-1]}`"]
            lines += [""]
    if data.get("loader"):
        loader = data["loader"]
        m = loader["machine"]
        lines += ["## loader: host seconds per training patch", "", "```", *loader["commands"], "```", "",
                  f"One process, {loader['threads']} torch thread(s), {m['cpu']}, load average at start "
                  f"{', '.join(f'{v:.2f}' for v in m['load_average_at_start'])}. Crop + spatial augmentation, plus the strong "
                  "intensity view when on (only dk-uxnet reads it).", ""]
        if loader.get("conditions"):
            lines += [loader["conditions"], ""]
        lines += ["| dataset | patch (z,y,x) | pool | strong view | median s/patch | mean s/patch | samples |", "|---|---|---|---|---|---|---|"]
        for r in loader["rows"]:
            lines.append(f"| {r['dataset']} | {'×'.join(map(str, r['patch']))} | {r['pool']} | {'on' if r['strong_view'] else 'off'} | "
                         f"{r['median_s']:.4f} | {r['mean_s']:.4f} | {r['samples']} |")
        lines += [""]
    lines += [NOTES_MARKER, "", kept]
    path.write_text("\n".join(lines).rstrip() + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--table", default="baseline", help="name of this comparison in the results")
    parser.add_argument("--datasets", nargs="+", default=["hippocampus", "la"], choices=sorted(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
    parser.add_argument("--code", action="append", default=[], metavar="LABEL=DIR", help="code version on PYTHONPATH (repeatable)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="iterations run before the clock starts")
    parser.add_argument("--iterations", type=int, default=10, help="iterations timed")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)), help="torch intra-op threads")
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers (the trainer's default)")
    parser.add_argument("--infer-volumes", type=int, default=4)
    parser.add_argument("--conditions", default="", help="a line on the conditions (e.g. other load on the machine)")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--loader", action="store_true", help="measure the per-patch cost of the data pipeline (table 'loader')")
    parser.add_argument("--check-cpu-bf16", action="store_true", help="compare CPU bf16 conv3d gradients with float64 and exit")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    if args.check_cpu_bf16:
        return check_cpu_bf16()

    RESULTS.mkdir(parents=True, exist_ok=True)
    results_path = RESULTS / "throughput.json"
    data = json.loads(results_path.read_text()) if results_path.exists() else {"tables": {}}
    if args.render_only:
        render(data)
        return 0
    import torch

    if args.loader:
        data["loader"] = {"commands": ["python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])], "machine": machine(),
                          "threads": args.threads, "conditions": args.conditions,
                          "rows": loader_costs(args.datasets, 40, args.threads)}
        results_path.write_text(json.dumps(data, indent=1))
        render(data)
        return 0
    codes = [tuple(c.split("=", 1)) for c in args.code] or [("current", "")]
    table = {"commands": ["python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])], "machine": machine(),
             "threads": args.threads, "workers": args.workers, "conditions": args.conditions, "skipped": [], "runs": []}
    data["tables"][args.table] = table
    specs = []
    for dataset in args.datasets:
        setting = SETTINGS[dataset]
        if setting["device"] == "cuda" and not torch.cuda.is_available():
            message = (f"{dataset} (patch {setting['patch']} z,y,x) on GPU: skipped, no CUDA device was available in this "
                       "session; these rows are left for a run on a GPU machine.")
            print(message, flush=True)
            table["skipped"].append(message)
            continue
        folder = next((p for p in setting["data"] if p.exists()), None)
        if folder is None:
            message = f"{dataset}: skipped, no data at {', '.join(map(str, setting['data']))}"
            print(message, flush=True)
            table["skipped"].append(message)
            continue
        for method in args.methods:
            network, network_options, method_options = setting["networks"].get(method, setting["networks"]["default"])
            specs.append({"dataset": dataset, "data": str(folder), "method": method, "network": network,
                          "network_options": network_options, "method_options": method_options, "labeled": setting["labeled"],
                          "patch": setting["patch"], "device": setting["device"], "batch_size": args.batch_size,
                          "threads": args.threads, "workers": args.workers, "warmup": args.warmup,
                          "iterations": args.iterations, "infer_volumes": args.infer_volumes})
    for repeat in range(args.repeats):
        for spec in specs:
            for code, source in codes:
                for variant in args.variants:
                    run_spec = {**spec, "workers": VARIANTS[variant].get("workers", spec["workers"]),
                                "overrides": {k: v for k, v in VARIANTS[variant].items() if k != "workers"}}
                    started = time.time()
                    result = run_child(run_spec, source)
                    result.update({"dataset": spec["dataset"], "method": spec["method"], "code": code, "variant": variant,
                                   "repeat": repeat, "started": started, "load_average": list(os.getloadavg()),
                                   "network": spec["network"], "network_options": spec["network_options"]})
                    table["runs"].append(result)
                    brief = {k: result.get(k) for k in ("dataset", "method", "code", "variant", "repeat", "sec_per_iter",
                                                         "loader_wait_per_iter", "infer_sec_per_volume", "peak_host_mb")}
                    print(json.dumps(brief) if "error" not in result else f"{brief} FAILED: {result['error'][-400:]}", flush=True)
                    results_path.write_text(json.dumps(data, indent=1))
                    render(data)
    render(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
