"""The `semiseg` command: train, predict, evaluate, methods, info."""

from __future__ import annotations

import argparse
import logging
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from semiseg.errors import CheckpointError, InputError, OutputExistsError, SemisegError, require
from semiseg.presets import PRESET_NAMES

LR_SCHEDULES = ("poly", "step", "constant")  # semiseg.training.LR_SCHEDULES, not imported to keep --help light
AUGMENTATIONS = ("default", "ua-mt")  # semiseg.sampling.AUGMENTATIONS, likewise

EPILOG = """examples:
  semiseg train --data resources/hippocampus --method mean-teacher --labeled 25% --iterations 300 --out runs/demo
  semiseg predict --checkpoint runs/demo/best resources/hippocampus/imagesTr --out runs/demo/predictions --uncertainty
  semiseg evaluate --predictions runs/demo/predictions --labels resources/hippocampus/labelsTr --out runs/demo/evaluation
  semiseg methods
  semiseg info runs/demo/best
  semiseg benchmark la --data /data/LA --method mean-teacher --labeled 8 --out runs/la-mt-8
"""


def key_value_option(text: str) -> tuple[str, Any]:
    """argparse type of --option/--network-option: KEY=VALUE, the value parsed as JSON when it is JSON."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"'{text}': expected KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semiseg",
        description="Semi-supervised 3D medical image segmentation: train on a few labeled and many unlabeled scans, predict with uncertainty, evaluate.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a method on a dataset folder", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Train on the labeled and unlabeled scans of a folder (MSD/nnU-Net imagesTr+labelsTr, images/+labels/, or LA h5 case folders). Writes OUT/last and OUT/best checkpoints (safetensors + JSON) and OUT/log.jsonl.")
    train.add_argument("--data", required=True, help="dataset folder")
    train.add_argument("--out", required=True, help="output folder for checkpoints and the log")
    train.add_argument("--method", default="mean-teacher", help="training method (see `semiseg methods`)")
    train.add_argument("--network", default="vnet", help="network: vnet (the papers' VNet), unet (MONAI BasicUNet), uxnet, residual-unet, ...; default: the method's paper's (vnet for most)")
    train.add_argument("--preset", choices=PRESET_NAMES, help="a method's published protocol (paper: its paper's optimizer, schedule, iterations, losses, augmentation, network options); flags given explicitly win")
    train.add_argument("--labeled", default="100%", help="labeled subset: a count (8), a percentage of the non-validation labeled cases (10%%), or a file listing case ids; other scans train unlabeled")
    train.add_argument("--validation", default="0", help="validation cases held out from the labeled ones: count, percentage or list file")
    train.add_argument("--unlabeled", action="append", default=[], metavar="DIR", help="extra folder of unlabeled scans (repeatable)")
    train.add_argument("--iterations", type=int, default=1000, help="training iterations")
    train.add_argument("--batch-size", type=int, default=2, help="labeled patches per iteration (as many unlabeled)")
    train.add_argument("--patch", type=int, nargs=3, metavar=("Z", "Y", "X"), help="patch size in voxels (default: from the data)")
    train.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="optimizer")
    train.add_argument("--lr", type=float, default=0.05, help="initial learning rate")
    train.add_argument("--lr-schedule", default="poly", choices=LR_SCHEDULES, help="learning-rate decay: poly, step (/10 every 2500 iterations, UA-MT) or constant")
    train.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True, help="Nesterov momentum for SGD")
    train.add_argument("--weight-decay", type=float, default=1e-4)
    train.add_argument("--augmentation", default="default", choices=AUGMENTATIONS, help="default (flips, quarter turns, affine, foreground oversampling) or ua-mt (UA-MT's random crop + rotation/flip)")
    train.add_argument("--validate-every", type=int, default=200, help="iterations between validations and last-checkpoint saves")
    train.add_argument("--log-every", type=int, default=10, help="iterations averaged into one log line")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    train.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    train.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision on CUDA (bf16 where supported)")
    train.add_argument("--channels-last", action="store_true", help="channels_last_3d memory format (faster convolutions on tensor-core GPUs)")
    train.add_argument("--compile", action="store_true", help="torch.compile the networks (slow first step, faster after; its time is logged)")
    train.add_argument("--option", type=key_value_option, action="append", default=[], metavar="KEY=VALUE", help="method option (see `semiseg methods`)")
    train.add_argument("--network-option", type=key_value_option, action="append", default=[], metavar="KEY=VALUE", help="network option, e.g. base_filters=8")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out")

    predict = commands.add_parser("predict", help="segment a scan or a folder of scans", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                  description="Predict label maps (NIfTI, on each scan's own grid) with a trained checkpoint.")
    predict.add_argument("input", help="a volume file, a DICOM folder, or a folder of volumes")
    predict.add_argument("--checkpoint", required=True, help="checkpoint folder (e.g. runs/demo/best)")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--uncertainty", action="store_true", help="also write CASE_entropy.nii.gz (and CASE_disagreement.nii.gz for two-network methods)")
    predict.add_argument("--probabilities", action="store_true", help="also write CASE_probabilities.nii.gz... one file per class")
    predict.add_argument("--tta", action="store_true", help="average over the 8 flips (8x slower)")
    predict.add_argument("--overlap", type=float, help="sliding-window overlap, 0..1 (default: the method's, 0.5 for most)")
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    predict.add_argument("--overwrite", action="store_true", help="replace existing output files")

    evaluate = commands.add_parser("evaluate", help="compare predictions with reference labels", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                   description="Per-case Dice, Jaccard, HD95 and ASD (medpy semantics) -> OUT/metrics.csv and OUT/summary.md (mean +- sd).")
    evaluate.add_argument("--predictions", required=True, help="folder of predicted label maps")
    evaluate.add_argument("--labels", required=True, help="folder of reference label maps (same file names)")
    evaluate.add_argument("--out", required=True, help="output folder")
    evaluate.add_argument("--checkpoint", help="take class names from this checkpoint")
    evaluate.add_argument("--voxel-units", action="store_true", help="distances in voxels instead of mm (as the LA tables report)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace existing output files")

    from semiseg.benchmark_cli import add_parser as add_benchmark_parser

    add_benchmark_parser(commands)
    commands.add_parser("methods", help="list the training methods and their options")
    info = commands.add_parser("info", help="describe a checkpoint")
    info.add_argument("checkpoint")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.explicit = explicit_arguments(argv)
    logging.basicConfig(format="semiseg: %(message)s", level=logging.WARNING)
    # File names that are not UTF-8 must print escaped, not stop the command.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    handler = {"train": _train, "predict": _predict, "evaluate": _evaluate, "methods": _methods, "info": _info, "benchmark": _benchmark}[args.command]
    try:
        return handler(args) or 0
    except SemisegError as error:
        print(f"semiseg: error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    except OSError as error:
        # Permission denied, disk full, a path that is a file...: the environment, not a bug.
        where = f"{error.filename}: " if error.filename else ""
        print(f"semiseg: error: {where}{_one_line(error.strerror or str(error))}", file=sys.stderr)
        return 2
    except MemoryError:
        print("semiseg: error: out of memory (lower --batch-size or --patch, or use smaller scans)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("semiseg: interrupted", file=sys.stderr)
        return 130


def explicit_arguments(argv: list[str] | None) -> set[str]:
    """The argument destinations the user typed (not argparse defaults): a preset fills the others."""
    parser = build_parser()
    _suppress_defaults(parser)
    return set(vars(parser.parse_args(argv)))


def _suppress_defaults(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _suppress_defaults(subparser)
        else:
            action.default = argparse.SUPPRESS


# Command-line destinations whose TrainConfig field has another name.
_FIELD_OF_ARGUMENT = {"out": "output", "patch": "patch_size", "option": "method_options", "network_option": "network_options"}


def resolve_training_settings(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig fields from the command line: the method's paper network unless --network is
    given, then --preset's settings for every field the user did not set explicitly."""
    from semiseg.methods import method_class
    from semiseg.presets import apply_preset, resolve_preset

    given = {_FIELD_OF_ARGUMENT.get(dest, dest) for dest in args.explicit}
    if "network" not in given:
        settings = {**settings, "network": method_class(settings["method"]).paper_network}
    if args.preset:
        settings = apply_preset({**settings, "preset": args.preset}, resolve_preset(settings["method"], args.preset), given)
    return settings


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or "unknown error"


def _out_of_gpu_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError)


# train ------------------------------------------------------------------------------------------

def _check_train_arguments(args: argparse.Namespace) -> None:
    checks = [
        (args.iterations >= 1, f"--iterations {args.iterations}: must be at least 1"),
        (args.batch_size >= 1, f"--batch-size {args.batch_size}: must be at least 1"),
        (args.validate_every >= 1, f"--validate-every {args.validate_every}: must be at least 1"),
        (args.log_every >= 1, f"--log-every {args.log_every}: must be at least 1"),
        (args.workers >= 0, f"--workers {args.workers}: must be 0 (load in the main process) or more"),
        (args.lr > 0, f"--lr {args.lr}: must be positive"),
        (args.weight_decay >= 0, f"--weight-decay {args.weight_decay}: must be 0 or more"),
        (not args.patch or min(args.patch) >= 1, f"--patch {' '.join(map(str, args.patch or []))}: sizes must be positive"),
        (not (args.resume and args.overwrite), "--resume and --overwrite contradict each other; give one"),
    ]
    require(checks)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder (give a folder for the run)")


def _remove_new_output(out: Path, before: set[str] | None) -> None:
    """After a failed start, remove what the run wrote (its log, the folder if it made it), unless
    it got as far as a checkpoint."""
    if not out.is_dir() or (out / "last").exists():
        return
    for entry in out.iterdir():
        if before is None or entry.name not in before:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    if before is None:
        try:
            out.rmdir()
        except OSError:
            pass


_RUN_ENTRIES = ("last", "best", "log.jsonl")


def _set_aside(out: Path) -> dict[Path, Path]:
    """Rename an existing run's checkpoints and log to hidden names; returns {original: hidden}."""
    if not ((out / "last").exists() or (out / "best").exists()):
        return {}
    moved = {}
    for name in _RUN_ENTRIES:
        original = out / name
        if original.exists():
            hidden = out / f".{name}.replaced-{os.getpid()}"
            os.replace(original, hidden)
            moved[original] = hidden
    return moved


def _restore_aside(moved: dict[Path, Path], keep_new: bool) -> None:
    """Delete the set-aside run once the new one exists, else put it back."""
    for original, hidden in moved.items():
        if keep_new or original.exists():
            shutil.rmtree(hidden, ignore_errors=True) if hidden.is_dir() else hidden.unlink(missing_ok=True)
        else:
            os.replace(hidden, original)


def _train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from semiseg.training import TrainConfig, train

    _check_train_arguments(args)

    config = TrainConfig(**resolve_training_settings(args, dict(
        data=args.data, output=args.out, method=args.method, network=args.network, labeled=args.labeled,
        validation=args.validation, unlabeled=args.unlabeled, iterations=args.iterations, batch_size=args.batch_size,
        patch_size=tuple(args.patch) if args.patch else None, optimizer=args.optimizer, lr=args.lr, lr_schedule=args.lr_schedule,
        nesterov=args.nesterov, weight_decay=args.weight_decay, augmentation=args.augmentation, validate_every=args.validate_every,
        log_every=args.log_every, seed=args.seed, device=args.device,
        workers=args.workers, amp=args.amp, channels_last=args.channels_last, compile=args.compile,
        method_options=dict(args.option),
        network_options=dict(args.network_option), resume=args.resume, overwrite=args.overwrite,
    )))
    stop = {"asked": False}

    def interrupt(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        tqdm.write("stopping after this iteration and saving the last checkpoint (Ctrl-C again to abort)")

    bars: dict[str, Any] = {}
    resumed_at = {"iteration": 0}

    def on_event(event: dict) -> None:
        kind = event["type"]
        if kind == "resume":
            resumed_at["iteration"] = event["iteration"]
        elif kind == "start":
            tqdm.write(f"device: {event['device']}")
        elif kind == "dataset":
            tqdm.write(f"{event['description']}\ntraining on {event['labeled']} labeled + {event['unlabeled']} unlabeled, validating on {event['validation']}; patch {tuple(event['patch_size'])}")
        elif kind == "prepare":
            bar = bars.get("prepare") or bars.setdefault("prepare", tqdm(total=event["total"], desc="preprocessing", unit="scan", leave=False))
            bar.update(1)
            if event["done"] == event["total"]:
                bars.pop("prepare").close()
        elif kind == "iteration":
            bar = bars.get("train") or bars.setdefault("train", tqdm(total=event["iterations"], initial=resumed_at["iteration"], desc="training", unit="it"))
            bar.update(event["iteration"] - bar.n)
            bar.set_postfix(loss=f"{event['loss']:.4f}")
        elif kind == "validation":
            tqdm.write(f"iteration {event['iteration']}: validation Dice {event['dice_mean']:.4f}" + (" (best)" if event["best"] else ""))
        elif kind in ("end", "cancelled"):
            if "train" in bars:
                bars.pop("train").close()
            tqdm.write(("cancelled" if kind == "cancelled" else "finished") + f" at iteration {event['iteration']}; model: {event['checkpoint']}")

    out = Path(args.out)
    # Under torchrun only rank 0 touches the output folder; the other ranks follow its decisions.
    owns_output = int(os.environ.get("RANK", "0")) == 0
    # --overwrite: keep the old run aside until the new one has written a checkpoint, so that a
    # new run failing at its start (bad data, bad option) does not cost the old one.
    replaced = _set_aside(out) if owns_output and args.overwrite and not args.resume else {}
    before = {entry.name for entry in out.iterdir()} if out.is_dir() else None
    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        train(config, on_event, lambda: stop["asked"])
    except BaseException as error:
        if owns_output:
            started = (out / "last").exists()
            _remove_new_output(out, before)
            _restore_aside(replaced, keep_new=started)
        if isinstance(error, RuntimeError) and _out_of_gpu_memory(error):
            raise InputError("out of GPU memory; lower --batch-size or --patch (or --network-option base_filters=8)") from None
        raise
    else:
        _restore_aside(replaced, keep_new=True)
    finally:
        for bar in bars.values():
            bar.close()
        signal.signal(signal.SIGINT, previous)
    return 0


# predict ----------------------------------------------------------------------------------------

def _predict_inputs(path: Path) -> list[Path]:
    from semiseg.io import is_dicom_folder, volume_suffix

    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file() or is_dicom_folder(path):
        return [path]
    inputs = [p for p in sorted(path.iterdir()) if not p.name.startswith(".") and ((p.is_file() and volume_suffix(p)) or is_dicom_folder(p))]
    if not inputs:
        raise InputError(f"{path}: no volumes found in this folder")
    return inputs


def _predict_targets(inputs: list[Path], out: Path, args: argparse.Namespace, model) -> list[dict[str, Path]]:
    """The files each input will produce; refuses clashes between them, with an input, or (without
    --overwrite) with files already there, before any prediction runs."""
    from semiseg.io import strip_suffix

    all_targets = []
    for path in inputs:
        name = strip_suffix(path)
        targets = {"labels": out / f"{name}.nii.gz"}
        if args.uncertainty:
            targets["entropy"] = out / f"{name}_entropy.nii.gz"
            if len(model.predictors()) == 2:
                targets["disagreement"] = out / f"{name}_disagreement.nii.gz"
        if args.probabilities:
            for index in sorted(model.plan.class_names):
                targets[f"p{index}"] = out / f"{name}_probability_{index}.nii.gz"
        all_targets.append(targets)
    sources = {path.resolve(): path for path in inputs}
    written: dict[Path, Path] = {}
    for path, targets in zip(inputs, all_targets):
        for target in targets.values():
            key = target.resolve()
            if key in sources:
                raise InputError(f"{target}: the output would replace the input scan {sources[key]}; choose another --out")
            if key in written:
                raise InputError(f"{written[key].name} and {path.name} would both be written to {target}; rename one")
            written[key] = path
    if not args.overwrite:
        existing = [target for targets in all_targets for target in targets.values() if target.exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise OutputExistsError(f"{existing[0]} exists{more}; refusing to overwrite it (use --overwrite)")
    return all_targets


def _predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from semiseg.devices import describe, resolve_device
    from semiseg.io import Volume, read_volume, write_volume
    from semiseg.models import load_model
    from semiseg.inference import predict_volume

    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise InputError(f"--overlap {args.overlap}: must be in [0, 1)")
    device = resolve_device(args.device)
    model = load_model(args.checkpoint, device)
    source = Path(args.input)
    inputs = _predict_inputs(source)
    single = len(inputs) == 1 and inputs[0] == source  # a file or a DICOM folder, not a folder of scans
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder (give an output folder)")
    all_targets = _predict_targets(inputs, out, args, model)
    created = not out.exists()
    tqdm.write(f"device: {describe(device)}; model: {model.meta['model']['method']} ({model.path})")
    failures: list[str] = []
    try:
        for path, targets in zip(tqdm(inputs, desc="predicting", unit="scan", disable=len(inputs) == 1), all_targets):
            try:
                volume = read_volume(path)
                try:
                    prediction = predict_volume(volume, model.plan, model.predictors(), device, model.overlap if args.overlap is None else args.overlap, args.tta)
                except RuntimeError as error:
                    if _out_of_gpu_memory(error):
                        raise InputError(f"{path}: out of GPU memory; use --device cpu or a smaller --overlap") from None
                    raise
                out.mkdir(parents=True, exist_ok=True)
                write_volume(prediction.labels, targets["labels"], overwrite=args.overwrite)
                if "entropy" in targets:
                    write_volume(prediction.entropy, targets["entropy"], overwrite=args.overwrite)
                if "disagreement" in targets and prediction.disagreement is not None:
                    write_volume(prediction.disagreement, targets["disagreement"], overwrite=args.overwrite)
                for index in model.plan.class_names:
                    if f"p{index}" in targets:
                        write_volume(Volume(prediction.probabilities[index], volume.geometry), targets[f"p{index}"], overwrite=args.overwrite)
                tqdm.write(f"{path.name}: {targets['labels']}  (uncertainty score {prediction.uncertainty_score():.4f})")
            except SemisegError as error:
                if single:
                    raise
                failures.append(f"{path.name}: {_one_line(str(error))}")
                tqdm.write(f"semiseg: failed: {_one_line(str(error))}", file=sys.stderr)
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # nothing was written: leave no empty output folder behind
    if failures:
        done = len(inputs) - len(failures)
        print(f"semiseg: {len(failures)} of {len(inputs)} scans failed ({done} written to {out}):\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1 if done else 2
    return 0


# evaluate ---------------------------------------------------------------------------------------

def _evaluate(args: argparse.Namespace) -> int:
    from semiseg.checkpoint import read_meta
    from semiseg.metrics import markdown_summary, write_csv

    class_names = None
    if args.checkpoint:
        meta = read_meta(args.checkpoint)
        if not isinstance(meta.get("class_names"), dict):
            raise CheckpointError(f"{args.checkpoint}: the checkpoint description names no classes")
        class_names = {int(k): v for k, v in meta["class_names"].items() if int(k) != 0}
    out = Path(args.out)
    csv_path, md_path = out / "metrics.csv", out / "summary.md"
    for path in (csv_path, md_path):
        if path.exists() and not args.overwrite:
            raise OutputExistsError(f"{path} exists; refusing to overwrite it (use --overwrite)")
    rows = _evaluate_ignoring_maps(Path(args.predictions), Path(args.labels), class_names, args.voxel_units)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, csv_path)
    summary = markdown_summary(rows, f"Evaluation of {args.predictions}", unit="voxels" if args.voxel_units else "mm")
    md_path.write_text(summary)
    print(summary)
    print(f"per-case metrics: {csv_path}\nsummary: {md_path}")
    return 0


_MAP_NAME = re.compile(r"^(?P<case>.+)_(entropy|disagreement|probability_\d+)$")


def _evaluate_ignoring_maps(predictions: Path, labels: Path, class_names, voxel_units: bool) -> list[dict]:
    """evaluate_folders, leaving out the uncertainty and probability maps `predict` writes beside
    its label maps (CASE_entropy, CASE_disagreement, CASE_probability_N) when CASE is a prediction
    or a label; a label named like a map still counts as a case."""
    from semiseg.io import strip_suffix, volume_suffix
    from semiseg.metrics import evaluate_folders

    if not predictions.is_dir() or not labels.is_dir():
        return evaluate_folders(predictions, labels, class_names, voxel_units=voxel_units)
    names = {strip_suffix(p): p for p in predictions.iterdir() if p.is_file() and volume_suffix(p)}
    label_names = {strip_suffix(p) for p in labels.iterdir() if p.is_file() and volume_suffix(p)}
    maps = {
        name for name in names
        if (match := _MAP_NAME.match(name)) and (match["case"] in names or match["case"] in label_names)
        and name not in label_names
    }
    if not maps:
        return evaluate_folders(predictions, labels, class_names, voxel_units=voxel_units)
    with tempfile.TemporaryDirectory(prefix="semiseg-evaluate-") as temporary:
        view = Path(temporary)
        for name, path in names.items():
            if name not in maps:
                try:
                    os.symlink(path.resolve(), view / path.name)
                except OSError:
                    shutil.copy2(path, view / path.name)
        try:
            return evaluate_folders(view, labels, class_names, voxel_units=voxel_units)
        except SemisegError as error:
            raise type(error)(str(error).replace(str(view), str(predictions))) from None


# benchmark --------------------------------------------------------------------------------------

def _benchmark(args: argparse.Namespace) -> int:
    from semiseg.benchmark_cli import run

    return run(args)


# methods, info ----------------------------------------------------------------------------------

def _methods(args: argparse.Namespace) -> int:
    from semiseg.methods import METHODS

    for name, method in sorted(METHODS.items()):
        options = ", ".join(f"{k}={v}" for k, v in method.defaults.items()) or "none"
        print(f"{name:18s} {method.summary}\n{'':18s} paper network: {method.paper_network}; options: {options}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from semiseg.checkpoint import read_meta

    meta = read_meta(args.checkpoint)
    model, plan, split = meta["model"], meta["plan"], meta["split"]
    best = meta.get("validation", {}).get("best_dice_mean")
    lines = [
        f"checkpoint: {args.checkpoint}",
        f"method: {model['method']}  options: {json.dumps(model['options'])}",
        f"network: {model['network']['name']}  options: {json.dumps(model['network']['options'])}",
        f"preset: {meta.get('train_config', {}).get('preset') or 'none'}",
        f"classes: {', '.join(f'{k}={v}' for k, v in meta['class_names'].items())}",
        f"patch: {tuple(plan['patch_size'])}  target spacing: {plan['target_spacing'] or 'as each scan'}  normalisation: {plan['normalization']}",
        f"data: {meta.get('data')}  labeled {len(split['labeled'])}, unlabeled {len(split['unlabeled'])}, validation {len(split['validation'])}, seed {split['seed']}",
        f"iteration: {meta['iteration']} of {meta['iterations']}  best validation Dice: {best if best is not None else 'n/a'}",
        f"written by: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
