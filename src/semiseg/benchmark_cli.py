"""`semiseg benchmark la`: the papers' Left Atrium protocol in one command (see semiseg.benchmark_la)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from semiseg.config import add_arguments, check_arguments, from_arguments, resolve_settings
from semiseg.errors import InputError, OutputExistsError, require

DESCRIPTION = """\
Train a method with the Left Atrium protocol of the semi-supervised segmentation papers, evaluate it
on the 20 test.list cases, and write OUT/results.json and OUT/table.md (the papers' table: method,
labeled scans, unlabeled scans, Dice %, Jaccard %, 95HD and ASD in voxels), our rows above the
published ones (semiseg/data/la_literature.json).

Protocol: labeled = the FIRST N ids of train.list (as the UA-MT/MC-Net code), unlabeled = the rest
of train.list found on disk (the table header says how many of the expected ones were found);
training patch 112x112x80 in the papers' (x, y, z) order, i.e. (z, y, x) = (80, 112, 112) in
semiseg's arrays; batch 2 labeled + 2 unlabeled; SGD lr 0.01 with poly decay; evaluation by sliding
window (the training patch, stride 18x18x4, windows averaged), metrics in voxels.

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


# The training settings the protocol lets a user change: TrainConfig's arguments, with the protocol's defaults.
TRAINING_ARGUMENTS = ["method", "network", "preset", "method_options", "network_options", "iterations", "lr", "batch_size", "device",
                      "workers", "log_every", "amp", "overwrite"]


def add_parser(commands) -> None:
    from semiseg.benchmark_la import PRESETS, PROTOCOL_TRAINING

    benchmark = commands.add_parser("benchmark", help="run a paper benchmark protocol (la)",
                                    description="Paper benchmark protocols. `semiseg benchmark la --help` for the Left Atrium one.")
    protocols = benchmark.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    la = protocols.add_parser("la", help="the Left Atrium protocol (UA-MT split, 112x112x80, stride 18x18x4)",
                              description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    la.add_argument("--data", help="the LA folder: train.list, test.list and <case>/mri_norm2.h5 folders (UA-MT's data/LA)")
    la.add_argument("--out", help="output folder: seed-S/ runs, results.json, table.md")
    la.add_argument("--labeled", default="8", help="labeled scans: a count (8, 16) or a percentage of train.list (10%%, 20%%) (default: 8)")
    la.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED", help="one training run per seed (default: 0)")
    la.add_argument("--convention", choices=["last", "best-lcc", "both"], default="both", help="evaluation convention(s) (default: both)")
    la.add_argument("--fast-eval", action="store_true", help="evaluate with overlap 0.5 and Gaussian blending instead of stride 18x18x4 (faster, not the protocol; labeled 'fast eval')")
    la.add_argument("--select-from", type=int, default=800, help="best-lcc: first iteration checked on the test cases (default: 800)")
    la.add_argument("--select-every", type=int, default=200, help="best-lcc: iterations between checks; also the checkpoint interval (default: 200)")
    la.add_argument("--predictor", help="evaluate one of the method's predicting networks (e.g. student, as UA-MT) instead of their average")
    geometries = ", ".join(f"{name} {'x'.join(map(str, p.patch_xyz))} / {'x'.join(map(str, p.stride_xyz))}" for name, p in PRESETS.items())
    la.add_argument("--geometry", choices=list(PRESETS), default="la",
                    help=f"patch/stride of a benchmark (x,y,z): {geometries}; the data must be in the LA folder layout (default: la)")
    add_arguments(la, TRAINING_ARGUMENTS, defaults=PROTOCOL_TRAINING, helps={
        "network": "network (default: the method's paper's; vnet, the papers' VNet, for most)",
        "iterations": "training iterations (UA-MT/DTC: 6000)",
        "lr": "initial learning rate, poly decay unless --preset says otherwise (the papers': 0.01)",
        "overwrite": "replace the runs and results already in --out",
    })
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
        (args.select_every >= 1, f"--select-every {args.select_every}: must be at least 1"),
        (len(set(args.seeds)) == len(args.seeds), f"--seeds {' '.join(map(str, args.seeds))}: a seed is repeated"),
    ]
    require(checks)
    check_arguments(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if (out / "results.json").exists() and not args.overwrite:
        raise OutputExistsError(f"{out / 'results.json'} exists; refusing to overwrite it (use --overwrite, or another --out)")


def _benchmark(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from semiseg import benchmark_la as la

    _check(args)
    chosen = from_arguments(args, data=args.data, output=args.out).to_dict()
    training = {k: v for k, v in resolve_settings(chosen, args.explicit).items() if k not in ("data", "output")}
    bars: dict[int, Any] = {}

    def on_progress(event: dict) -> None:
        kind = event["type"]
        if kind == "protocol":
            split = event["split"]
            missing = len(split.unlabeled_missing)
            tqdm.write(f"LA protocol: {len(split.labeled)} labeled (first of train.list), {len(split.unlabeled)} unlabeled found of "
                       f"{split.unlabeled_expected}{f' ({missing} missing on disk)' if missing else ''}, {len(split.test)} test cases of "
                       f"{len(split.test_listed)}; patch {event['patch_xyz']} (x,y,z); evaluation {event['evaluation']}; device {event['device']}")
            if event["smoke"]:
                tqdm.write("SMOKE RUN: patch/stride overridden; the numbers are not the protocol's")
        elif kind == "iteration":
            bar = bars.get(event["seed"]) or bars.setdefault(event["seed"], tqdm(total=event["iterations"], desc=f"seed {event['seed']}", unit="it"))
            bar.update(event["iteration"] - bar.n)
            bar.set_postfix(loss=f"{event['loss']:.4f}")
        elif kind in ("end", "cancelled") and event["seed"] in bars:
            bars.pop(event["seed"]).close()
        elif kind == "selection":
            tqdm.write(f"seed {event['seed']}, iteration {event['iteration']}: test Dice {event['test_dice']:.4f}" + (" (best)" if event["best"] else ""))
        elif kind == "outcome":
            s = event["summary"]
            tqdm.write(f"seed {event['seed']} [{event['convention']}{', fast eval' if event['fast_eval'] else ''}] iteration {event['iteration']}: "
                       f"Dice {100 * s['dice']['mean']:.2f}%  Jaccard {100 * s['jaccard']['mean']:.2f}%  "
                       f"95HD {s['hd95']['mean']:.2f}  ASD {s['asd']['mean']:.2f} (voxels)")

    try:
        result = la.run_protocol(
            args.data, args.out, training, labeled=args.labeled, seeds=args.seeds,
            conventions=la.CONVENTIONS if args.convention == "both" else (args.convention,), geometry=args.geometry,
            fast_eval=args.fast_eval, predictor=args.predictor, select_from=args.select_from, select_every=args.select_every,
            smoke_patch=args.smoke_patch, smoke_stride=args.smoke_stride, progress=on_progress,
            label_options={**chosen["network_options"], **chosen["method_options"]},
        )
    finally:
        for bar in bars.values():
            bar.close()
    print(la.markdown_table([result], la.load_literature()))
    print(f"results: {Path(args.out) / 'results.json'}\ntable: {Path(args.out) / 'table.md'}")
    return 0
