"""`semiseg benchmark la`: the papers' Left Atrium protocol in one command (see semiseg.benchmark_la)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from semiseg.cli import key_value_option, resolve_training_settings
from semiseg.errors import InputError, OutputExistsError, require
from semiseg.presets import PRESET_NAMES

DESCRIPTION = """\
Train a method with the Left Atrium protocol of the semi-supervised segmentation papers, evaluate it
on the 20 test.list cases, and write OUT/results.json and OUT/table.md (the papers' table: method,
labeled scans, unlabeled scans, Dice %, Jaccard %, 95HD and ASD in voxels), our rows above the
published ones (semiseg/data/la_literature.json).

Protocol: labeled = the FIRST N ids of train.list (as the UA-MT/MC-Net code), unlabeled = the rest
of train.list found on disk (the table header says how many of the expected ones were found);
training patch 112x112x80 in the papers' (x, y, z) order, i.e. (z, y, x) = (80, 112, 112) in
semiseg's arrays; batch 2 labeled + 2 unlabeled; SGD lr 0.01 with poly decay; evaluation by sliding
window (the training patch, stride 18x18x4, windows averaged), metrics in voxels. The network is the
method's paper's unless --network says otherwise (uxnet for dk-uxnet, residual-unet for 3d-cps).

--preset paper: the method's published training protocol (semiseg.presets; e.g. for mean-teacher
UA-MT's: VNet dropout, SGD without Nesterov, lr/10 every 2500 iterations, 0.5 (CE + Dice), its
ramp-up, crop + rotation/flip, fp32, the student predicts); flags given explicitly win. It is
recorded in results.json and in the table's method label.

Conventions, both computed from one training run by default (--convention):
  last      the last checkpoint, no post-processing (UA-MT, DTC)
  best-lcc  the checkpoint with the best mean test Dice, checked every --select-every iterations
            from --select-from and at the end, then the largest connected component (MC-Net,
            SS-Net, BCP, AD-MT). It is selected ON THE TEST CASES, as those papers do.
"""

EPILOG = """\
examples:
  semiseg benchmark la --data /data/LA --method mean-teacher --labeled 8 --iterations 6000 --seeds 0 1 2 --out runs/la-mt-8
  semiseg benchmark la --data /data/LA --method mean-teacher --labeled 16 --out runs/la-mt-16 --fast-eval
  semiseg benchmark la --table runs/la-mt-8 runs/la-cps-8 --out runs/la-table

--table RUN_DIR...: one table over finished runs (their results.json); rows with the same method,
labeled count, convention and evaluation are pooled, mean ± sd over all their seeds. With --out,
the table is written to OUT/table.md as well as printed.

A 6000-iteration run of the papers' VNet is for a GPU: on a 2-core CPU one iteration takes
tens of seconds (docs/benchmark-la.md).
"""


GEOMETRY_NAMES = ("la", "pancreas-ct", "kits19")  # semiseg.benchmark_la.PRESETS, not imported to keep --help light


def add_parser(commands) -> None:
    benchmark = commands.add_parser("benchmark", help="run a paper benchmark protocol (la)",
                                    description="Paper benchmark protocols. `semiseg benchmark la --help` for the Left Atrium one.")
    protocols = benchmark.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    la = protocols.add_parser("la", help="the Left Atrium protocol (UA-MT split, 112x112x80, stride 18x18x4)",
                              description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    la.add_argument("--data", help="the LA folder: train.list, test.list and <case>/mri_norm2.h5 folders (UA-MT's data/LA)")
    la.add_argument("--out", help="output folder: seed-S/ runs, results.json, table.md")
    la.add_argument("--method", default="mean-teacher", help="training method (see `semiseg methods`) (default: mean-teacher)")
    la.add_argument("--network", default="vnet", help="network (default: the method's paper's; vnet, the papers' VNet, for most)")
    la.add_argument("--preset", choices=PRESET_NAMES, help="the method's published training protocol (paper); explicit flags win (default: none)")
    la.add_argument("--labeled", default="8", help="labeled scans: a count (8, 16) or a percentage of train.list (10%%, 20%%) (default: 8)")
    la.add_argument("--iterations", type=int, default=6000, help="training iterations (default: 6000, UA-MT/DTC)")
    la.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED", help="one training run per seed (default: 0)")
    la.add_argument("--convention", choices=["last", "best-lcc", "both"], default="both", help="evaluation convention(s) (default: both)")
    la.add_argument("--fast-eval", action="store_true", help="evaluate with overlap 0.5 and Gaussian blending instead of stride 18x18x4 (faster, not the protocol; labeled 'fast eval')")
    la.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    la.add_argument("--option", type=key_value_option, action="append", default=[], metavar="KEY=VALUE", help="method option (see `semiseg methods`)")
    la.add_argument("--network-option", type=key_value_option, action="append", default=[], metavar="KEY=VALUE", help="network option, e.g. base_filters=16")
    la.add_argument("--lr", type=float, default=0.01, help="initial learning rate, poly decay unless --preset says otherwise (default: 0.01, the papers')")
    la.add_argument("--batch-size", type=int, default=2, help="labeled patches per iteration, as many unlabeled (default: 2)")
    la.add_argument("--select-from", type=int, default=800, help="best-lcc: first iteration checked on the test cases (default: 800)")
    la.add_argument("--select-every", type=int, default=200, help="best-lcc: iterations between checks; also the checkpoint interval (default: 200)")
    la.add_argument("--predictor", help="evaluate one of the method's predicting networks (e.g. student, as UA-MT) instead of their average")
    la.add_argument("--geometry", choices=GEOMETRY_NAMES, default="la",
                    help="patch/stride of a benchmark: la 112x112x80 / 18x18x4, pancreas-ct 96x96x96 / 16x16x16, kits19 128x128x64 / 18x18x4 (x,y,z); the data must be in the LA folder layout (default: la)")
    la.add_argument("--workers", type=int, default=2, help="data-loading worker processes (default: 2)")
    la.add_argument("--log-every", type=int, default=10, help="iterations averaged into one log line (default: 10)")
    la.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision on CUDA (default: on; --preset paper: off)")
    la.add_argument("--overwrite", action="store_true", help="replace the runs and results already in --out")
    la.add_argument("--table", nargs="+", metavar="RUN_DIR", help="build one table from finished runs' results.json instead of training")
    la.add_argument("--smoke-patch", type=int, nargs=3, metavar=("Z", "Y", "X"), help=argparse.SUPPRESS)
    la.add_argument("--smoke-stride", type=int, nargs=3, metavar=("Z", "Y", "X"), help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.table:
        return _table(args)
    return _benchmark(args)


def _table(args: argparse.Namespace) -> int:
    from semiseg.benchmark_la import load_literature, markdown_table, read_results

    text = markdown_table(read_results(args.table), load_literature())
    if args.out:
        out = Path(args.out)
        target = out / "table.md"
        if target.exists() and not args.overwrite:
            raise OutputExistsError(f"{target} exists; refusing to overwrite it (use --overwrite)")
        out.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    print(text)
    if args.out:
        print(f"table: {Path(args.out) / 'table.md'}")
    return 0


def _check(args: argparse.Namespace) -> None:
    checks = [
        (args.data is not None, "--data is required (the LA folder with train.list and test.list), unless --table"),
        (args.out is not None, "--out is required (the folder for the runs, results.json and table.md)"),
        (args.iterations >= 1, f"--iterations {args.iterations}: must be at least 1"),
        (args.batch_size >= 1, f"--batch-size {args.batch_size}: must be at least 1"),
        (args.select_every >= 1, f"--select-every {args.select_every}: must be at least 1"),
        (args.log_every >= 1, f"--log-every {args.log_every}: must be at least 1"),
        (args.workers >= 0, f"--workers {args.workers}: must be 0 or more"),
        (args.lr > 0, f"--lr {args.lr}: must be positive"),
        (len(set(args.seeds)) == len(args.seeds), f"--seeds {' '.join(map(str, args.seeds))}: a seed is repeated"),
    ]
    require(checks)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if (out / "results.json").exists() and not args.overwrite:
        raise OutputExistsError(f"{out / 'results.json'} exists; refusing to overwrite it (use --overwrite, or another --out)")


def _method_label(args: argparse.Namespace, network: str) -> str:
    options = [f"{k}={v}" for k, v in args.network_option] + [f"{k}={v}" for k, v in args.option]
    options += [f"preset {args.preset}"] if args.preset else []
    return f"{args.method} ({network}{', ' + ', '.join(options) if options else ''})"


def _benchmark(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from semiseg import benchmark_la as la
    from semiseg.checkpoint import read_meta
    from semiseg.devices import describe, resolve_device
    from semiseg.methods import method_class
    from semiseg.metrics import write_csv
    from semiseg.training import TrainConfig, train

    _check(args)
    geometry = la.PRESETS[args.geometry]
    method_cls = method_class(args.method)
    split = la.protocol_split(args.data, args.labeled)
    device = resolve_device(args.device)
    conventions = la.CONVENTIONS if args.convention == "both" else (args.convention,)
    smoke = bool(args.smoke_patch or args.smoke_stride)
    patch_zyx = tuple(args.smoke_patch) if args.smoke_patch else geometry.patch_zyx
    settings = la.eval_settings(geometry, args.fast_eval, patch_zyx, tuple(args.smoke_stride) if args.smoke_stride else None)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    view = la.make_training_view(split, out / "training-cases")
    labeled_list = out / "labeled.list"
    labeled_list.write_text("".join(f"{case_id}\n" for case_id in split.labeled))
    unlabeled = len(split.unlabeled) if method_cls.uses_unlabeled else 0
    training_settings = resolve_training_settings(args, dict(
        data=str(view), method=args.method, network=args.network, labeled=str(labeled_list), validation="0",
        iterations=args.iterations, batch_size=args.batch_size, patch_size=patch_zyx, lr=args.lr,
        validate_every=args.select_every, log_every=args.log_every, device=args.device, workers=args.workers,
        amp=args.amp, method_options=dict(args.option), network_options=dict(args.network_option), overwrite=args.overwrite,
    ))
    training = asdict(TrainConfig(output="", **training_settings))
    result: dict[str, Any] = {
        "benchmark": "semiseg-la", "geometry": geometry.name, "preset": args.preset, "smoke": smoke,
        "method": args.method, "network": training["network"], "method_options": training["method_options"],
        "network_options": training["network_options"], "method_label": _method_label(args, training["network"]),
        "labeled": len(split.labeled), "unlabeled": unlabeled, "split": split.to_dict(),
        "patch_xyz": la.xyz(patch_zyx[::-1]), "patch_zyx": la.xyz(patch_zyx), "iterations": training["iterations"],
        "batch_size": training["batch_size"], "lr": training["lr"], "device": describe(device),
        "training": {k: v for k, v in training.items() if k not in ("data", "output", "seed", "labeled", "overwrite")},
        "evaluation": {"name": settings.name, "description": settings.description, "patch_zyx": list(settings.patch_zyx),
                       "overlap_zyx": list(settings.overlap), "blending": settings.mode, "units": "voxels",
                       "predictor": args.predictor or "mean of the method's predictors"},
        "selection": {"from": args.select_from, "every": args.select_every, "on": "test.list cases, mean Dice without post-processing"},
        "runs": [],
    }
    missing = len(split.unlabeled_missing)
    tqdm.write(f"LA protocol: {len(split.labeled)} labeled (first of train.list), {len(split.unlabeled)} unlabeled found of "
               f"{split.unlabeled_expected}{f' ({missing} missing on disk)' if missing else ''}, {len(split.test)} test cases of "
               f"{len(split.test_listed)}; patch {result['patch_xyz']} (x,y,z); evaluation {settings.description}; device {describe(device)}")
    if smoke:
        tqdm.write("SMOKE RUN: patch/stride overridden; the numbers are not the protocol's")

    for seed in args.seeds:
        run_dir = out / f"seed-{seed}"
        test = la.TestSet(split, settings, device, args.predictor)
        selection = la.Selection(test, run_dir / "best-on-test") if "best-lcc" in conventions else None
        config = TrainConfig(output=str(run_dir), seed=seed, **training_settings)
        bar: dict[str, Any] = {}
        timing: dict[str, float] = {}

        def on_event(event: dict, seed: int = seed, selection=selection, bar=bar, timing=timing) -> None:
            kind = event["type"]
            if kind == "iteration":
                progress = bar.get("bar") or bar.setdefault("bar", tqdm(total=event["iterations"], desc=f"seed {seed}", unit="it"))
                progress.update(event["iteration"] - progress.n)
                progress.set_postfix(loss=f"{event['loss']:.4f}")
                timing["sec_per_iter"] = event["sec_per_iter"]
            elif kind == "checkpoint" and event["name"] == "last" and selection is not None:
                iteration = event["iteration"]
                if args.select_from <= iteration < config.iterations and iteration % args.select_every == 0:
                    selection.consider(Path(event["path"]), iteration)
                    tqdm.write(f"seed {seed}, iteration {iteration}: test Dice {selection.history[-1]['test_dice']:.4f}"
                               + (" (best)" if selection.history[-1]["best"] else ""))

        started = time.perf_counter()
        try:
            train(config, on_event)
        finally:
            if "bar" in bar:
                bar["bar"].close()
        trained = time.perf_counter() - started
        last = run_dir / "last"
        iteration = int(read_meta(last)["iteration"])
        predicted = selection.consider(last, iteration) if selection is not None else test.predict(last)
        outcomes: dict[str, Any] = {}
        if "last" in conventions:
            rows = test.rows(*predicted, lcc=False)
            outcomes["last"] = {"iteration": iteration, "checkpoint": str(last), "post_processing": "none",
                                "summary": la.summarize_rows(rows), "cases": rows}
        if selection is not None:
            rows = test.rows(*selection.best, lcc=True)
            outcomes["best-lcc"] = {"iteration": selection.best_iteration, "checkpoint": str(selection.folder),
                                    "post_processing": "largest connected component", "selection_test_dice": selection.best_dice,
                                    "history": selection.history, "summary": la.summarize_rows(rows), "cases": rows}
        for convention, outcome in outcomes.items():
            write_csv(outcome["cases"], run_dir / f"metrics_{convention}.csv")
        result["runs"].append({"seed": seed, "conventions": outcomes, "train_seconds": trained,
                               "sec_per_iter": timing.get("sec_per_iter"), "eval_seconds": test.seconds})
        result["runs"].sort(key=lambda r: r["seed"])
        la.write_json(out / "results.json", result)
        (out / "table.md").write_text(la.markdown_table([result], la.load_literature()))
        for convention, outcome in outcomes.items():
            s = outcome["summary"]
            tqdm.write(f"seed {seed} [{convention}{', fast eval' if settings.name == 'fast' else ''}] iteration {outcome['iteration']}: "
                       f"Dice {100 * s['dice']['mean']:.2f}%  Jaccard {100 * s['jaccard']['mean']:.2f}%  "
                       f"95HD {s['hd95']['mean']:.2f}  ASD {s['asd']['mean']:.2f} (voxels)")
    print(la.markdown_table([result], la.load_literature()))
    print(f"results: {out / 'results.json'}\ntable: {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    from semiseg.cli import main

    sys.exit(main(["benchmark", *sys.argv[1:]]))
