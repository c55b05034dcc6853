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
from pathlib import Path
from typing import Any

from semiseg.config import TrainConfig, add_arguments, check_arguments, from_arguments, resolve_settings
from semiseg.errors import InputError, OutputExistsError, SemisegError

EPILOG = """examples:
  semiseg train --data resources/hippocampus --method mean-teacher --labeled 25% --iterations 300 --out runs/demo
  semiseg predict --checkpoint runs/demo/best resources/hippocampus/imagesTr --out runs/demo/predictions --uncertainty
  semiseg finetune --checkpoint runs/demo/best --corrections scan.nii.gz:scan_corrected.nii.gz --data resources/hippocampus/imagesTs --out runs/demo-ft
  semiseg evaluate --predictions runs/demo/predictions --labels resources/hippocampus/labelsTr --out runs/demo/evaluation
  semiseg methods
  semiseg info runs/demo/best
  semiseg benchmark la --data /data/LA --method mean-teacher --labeled 8 --out runs/la-mt-8
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semiseg",
        description="Semi-supervised 3D medical image segmentation: train on a few labeled and many unlabeled scans, predict with uncertainty, evaluate.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a method on a dataset folder",
                                description="Train on the labeled and unlabeled scans of a folder (MSD/nnU-Net imagesTr+labelsTr, images/+labels/, or LA h5 case folders). Writes OUT/last and OUT/best checkpoints (safetensors + JSON) and OUT/log.jsonl.")
    add_arguments(train)

    finetune = commands.add_parser(
        "finetune", help="fine-tune a model on corrected scans", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Continue training a checkpoint on corrected label maps (the plugin's Fine-tune, same recipe): the "
                    "corrections and the model's own labeled cases train labeled, the folder's other scans unlabeled. "
                    "Then both models are scored on held-out cases (the model's validation cases when still on disk, "
                    "or --held-out) and the verdict printed. Writes OUT/last, OUT/best and OUT/log.jsonl.")
    add_finetune_arguments(finetune)

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
    evaluate.add_argument("--checkpoint", help="take class names (and the ignore label) from this checkpoint")
    evaluate.add_argument("--ignore-label", type=int, metavar="VALUE",
                          help="label value of unannotated reference voxels, left out of the metrics (default: the checkpoint's)")
    evaluate.add_argument("--voxel-units", action="store_true", help="distances in voxels instead of mm (as the LA tables report)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace existing output files")

    from semiseg.benchmark_cli import add_parser as add_benchmark_parser

    add_benchmark_parser(commands)
    commands.add_parser("methods", help="list the training methods and their options")
    info = commands.add_parser("info", help="describe a checkpoint")
    info.add_argument("checkpoint")
    export = commands.add_parser("export-model", help="export a checkpoint as TorchScript or ONNX for use without semiseg",
                                 description="Write OUT/model.pt (TorchScript) or OUT/model.onnx, a module from an image patch to the class probabilities `predict` averages, and OUT/model.plan.json (preprocessing plan, classes, sliding window).")
    export.add_argument("checkpoint", help="checkpoint folder (e.g. runs/demo/best)")
    export.add_argument("--format", required=True, choices=["torchscript", "onnx"])
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    from semiseg.finetuning import FineTuneRequest

    defaults = FineTuneRequest(checkpoint="", folder="", output="")
    parser.add_argument("--checkpoint", required=True, help="the model to start from (e.g. runs/demo/best)")
    parser.add_argument("--corrections", required=True, nargs="+", type=image_label_pair, metavar="IMG:LABEL",
                        help="corrected scans: each a scan and its corrected label map, joined by ':'")
    parser.add_argument("--data", required=True, help="folder of scans to train with (unlabeled; a dataset's labeled scans "
                        "replay when the model's own labeled cases are no longer on disk)")
    parser.add_argument("--out", required=True, dest="output", help="output folder for the fine-tuned model")
    parser.add_argument("--method", help="training method (default: the checkpoint's)")
    parser.add_argument("--iterations", type=int, default=defaults.iterations, help="fine-tuning iterations")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="initial learning rate")
    parser.add_argument("--correction-share", type=float, default=defaults.correction_share,
                        help="share of the labeled patches drawn from the corrections")
    parser.add_argument("--no-replay", dest="replay", action="store_false",
                        help="train on the corrections alone, not also on the model's own labeled cases")
    parser.add_argument("--held-out", nargs="+", type=image_label_pair, metavar="IMG:LABEL", default=None,
                        help="labeled cases to compare the models on (default: the model's validation cases)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="labeled patches per iteration")
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the patch draws")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --out")


def image_label_pair(text: str) -> tuple[str, str]:
    """IMG:LABEL, split at the ':' where both sides are existing paths (paths may hold ':' themselves)."""
    splits = [(text[:i], text[i + 1:]) for i, char in enumerate(text) if char == ":"]
    for image, label in splits:
        if Path(image).exists() and Path(label).exists():
            return image, label
    if not splits:
        raise argparse.ArgumentTypeError(f"'{text}': give a scan and its label map joined by ':' (scan.nii.gz:label.nii.gz)")
    missing = [part for part in splits[-1] if not Path(part).exists()]
    raise argparse.ArgumentTypeError(f"'{text}': no such file {missing[0]!r}" if missing else f"'{text}': cannot split into scan:label")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.explicit = explicit_arguments(argv)
    logging.basicConfig(format="semiseg: %(message)s", level=logging.WARNING)
    # File names that are not UTF-8 must print escaped, not stop the command.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    handler = {"train": _train, "finetune": _finetune, "predict": _predict, "evaluate": _evaluate, "methods": _methods, "info": _info, "benchmark": _benchmark,
               "export-model": _export_model}[args.command]
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


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or "unknown error"


def _out_of_gpu_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError)


# train ------------------------------------------------------------------------------------------

def _check_train_arguments(args: argparse.Namespace) -> None:
    check_arguments(args)
    if args.resume and args.overwrite:
        raise InputError("--resume and --overwrite contradict each other; give one")
    out = Path(args.output)
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
    _check_train_arguments(args)
    config = TrainConfig.from_dict(resolve_settings(from_arguments(args).to_dict(), args.explicit))
    _run_training(config)
    return 0


def _run_training(config: TrainConfig) -> None:
    """Train with a progress bar; Ctrl-C stops after the iteration with a checkpoint. An existing run in the
    output folder is replaced (with `config.overwrite`) only once the new one has written a checkpoint."""
    from tqdm import tqdm

    from semiseg.training import train

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

    out = Path(config.output)
    # Under torchrun only rank 0 touches the output folder; the other ranks follow its decisions.
    owns_output = int(os.environ.get("RANK", "0")) == 0
    # --overwrite: keep the old run aside until the new one has written a checkpoint, so that a
    # new run failing at its start (bad data, bad option) does not cost the old one.
    replaced = _set_aside(out) if owns_output and config.overwrite and not config.resume else {}
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


# finetune ---------------------------------------------------------------------------------------

def _finetune(args: argparse.Namespace) -> int:
    from semiseg.finetuning import FineTuneRequest, compare_before_after, finetune_config, held_out_cases
    from semiseg.models import read_record

    if args.iterations < 1:
        raise InputError(f"--iterations {args.iterations}: must be at least 1")
    if args.lr <= 0:
        raise InputError(f"--lr {args.lr}: must be more than 0")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder (give a folder for the fine-tuned model)")
    request = FineTuneRequest(
        checkpoint=args.checkpoint, folder=args.data, output=args.output, corrections=args.corrections, method=args.method,
        iterations=args.iterations, lr=args.lr, replay=args.replay, correction_share=args.correction_share,
        batch_size=args.batch_size, device=args.device, seed=args.seed, overwrite=args.overwrite)
    config = finetune_config(request)
    held_out = args.held_out or held_out_cases(read_record(args.checkpoint))
    _run_training(config)
    if not held_out:
        print("no held-out cases to compare the models on (the model records none on disk): give --held-out IMG:LABEL ...")
        return 0
    comparison = compare_before_after(args.checkpoint, out / "last", held_out, args.device)
    print(comparison.verdict())
    return 0


# predict ----------------------------------------------------------------------------------------

def _predict_inputs(path: Path, channels: int) -> list[list[Path]]:
    """Each scan to predict as its files: one, or for a model of several channels one per channel
    (case_0000, case_0001, ... as in training; a 4D NIfTI is one file)."""
    from semiseg.datasets import channel_files, files_by_case
    from semiseg.io import is_dicom_folder, volume_suffix

    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file() or is_dicom_folder(path):
        return [channel_files(path) if channels > 1 else [path]]
    inputs = [p for p in sorted(path.iterdir()) if not p.name.startswith(".") and ((p.is_file() and volume_suffix(p)) or is_dicom_folder(p))]
    if not inputs:
        raise InputError(f"{path}: no volumes found in this folder")
    if channels > 1:
        return [files for _, files in sorted(files_by_case(inputs, path).items())]
    return [[p] for p in inputs]


def _scan_name(files: list[Path], channels: int) -> str:
    """The name a scan's outputs take: the file's, or the case id of a scan of several channels."""
    from semiseg.datasets import case_id_of
    from semiseg.io import strip_suffix

    return case_id_of(files[0]) if channels > 1 else strip_suffix(files[0])


def _predict_targets(inputs: list[list[Path]], out: Path, args: argparse.Namespace, model) -> list[dict[str, Path]]:
    """The files each input will produce; refuses clashes between them, with an input, or (without
    --overwrite) with files already there, before any prediction runs."""
    all_targets = []
    for files in inputs:
        name = _scan_name(files, model.plan.in_channels)
        targets = {"labels": out / f"{name}.nii.gz"}
        if args.uncertainty:
            targets["entropy"] = out / f"{name}_entropy.nii.gz"
            if len(model.predictors()) == 2:
                targets["disagreement"] = out / f"{name}_disagreement.nii.gz"
        if args.probabilities:
            for value in sorted(model.plan.class_names):
                targets[f"p{value}"] = out / f"{name}_probability_{value}.nii.gz"
        all_targets.append(targets)
    sources = {path.resolve(): path for files in inputs for path in files}
    written: dict[Path, Path] = {}
    for (path, *_), targets in zip(inputs, all_targets):
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

    from semiseg.compatibility import mismatch_warnings
    from semiseg.devices import available_memory, describe, resolve_device
    from semiseg.inference import estimate_inference, measure_window_cost, predict_volume
    from semiseg.io import Volume, read_scan, write_volume
    from semiseg.models import load_model

    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise InputError(f"--overlap {args.overlap}: must be in [0, 1)")
    device = resolve_device(args.device)
    model = load_model(args.checkpoint, device)
    source = Path(args.input)
    inputs = _predict_inputs(source, model.plan.in_channels)
    single = len(inputs) == 1 and inputs[0][0] == source  # a file or a DICOM folder, not a folder of scans
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder (give an output folder)")
    all_targets = _predict_targets(inputs, out, args, model)
    created = not out.exists()
    tqdm.write(f"device: {describe(device)}; model: {model.record.method} ({model.path})")
    failures: list[str] = []
    overlap = model.overlap if args.overlap is None else args.overlap
    cost = None
    try:
        for files, targets in zip(tqdm(inputs, desc="predicting", unit="scan", disable=len(inputs) == 1), all_targets):
            path = files[0]
            try:
                volume = read_scan(files)
                model.plan.check_channels(volume, ", ".join(str(f) for f in files))
                for warning in mismatch_warnings(volume, model.plan, source=path):
                    tqdm.write(f"semiseg: warning: {warning}", file=sys.stderr)
                if cost is None:  # measured once, on the first scan
                    cost = measure_window_cost(model.predictors(), model.plan.patch_size, device, in_channels=model.plan.in_channels)
                estimate = estimate_inference(volume, model.plan, len(model.predictors()), cost, overlap, args.tta,
                                              window_scale=model.window_scale)
                available = available_memory(device)
                tqdm.write(f"{path.name}: estimate {estimate.describe(available)}")
                if not estimate.fits(available):
                    tqdm.write(f"semiseg: warning: {path.name} may not fit in {device}'s free memory", file=sys.stderr)
                try:
                    prediction = predict_volume(volume, model.plan, model.predictors(), device, overlap, args.tta,
                                                window_scale=model.window_scale)
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
                for channel, value in enumerate(model.plan.channel_values):
                    if f"p{value}" in targets:
                        write_volume(Volume(prediction.probabilities[channel], volume.geometry), targets[f"p{value}"], overwrite=args.overwrite)
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
    from semiseg.metrics import markdown_summary, write_csv
    from semiseg.models import read_record

    class_names, ignore_label = None, args.ignore_label
    if args.checkpoint:
        record = read_record(args.checkpoint)
        class_names = {k: v for k, v in record.class_names.items() if k != 0}
        if ignore_label is None:
            ignore_label = record.plan.ignore_label
    out = Path(args.out)
    csv_path, md_path = out / "metrics.csv", out / "summary.md"
    for path in (csv_path, md_path):
        if path.exists() and not args.overwrite:
            raise OutputExistsError(f"{path} exists; refusing to overwrite it (use --overwrite)")
    rows = _evaluate_ignoring_maps(Path(args.predictions), Path(args.labels), class_names, args.voxel_units, ignore_label)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, csv_path)
    summary = markdown_summary(rows, f"Evaluation of {args.predictions}", unit="voxels" if args.voxel_units else "mm")
    md_path.write_text(summary)
    print(summary)
    print(f"per-case metrics: {csv_path}\nsummary: {md_path}")
    return 0


_MAP_NAME = re.compile(r"^(?P<case>.+)_(entropy|disagreement|probability_\d+)$")


def _evaluate_ignoring_maps(predictions: Path, labels: Path, class_names, voxel_units: bool, ignore_label: int | None) -> list[dict]:
    """evaluate_folders, leaving out the uncertainty and probability maps `predict` writes beside
    its label maps (CASE_entropy, CASE_disagreement, CASE_probability_N) when CASE is a prediction
    or a label; a label named like a map still counts as a case."""
    from semiseg.metrics import evaluate_pairs, pair_cases, volume_files

    predicted, references = volume_files(predictions, "prediction"), volume_files(labels, "label")
    maps = {
        name for name in predicted
        if (match := _MAP_NAME.match(name)) and (match["case"] in predicted or match["case"] in references)
        and name not in references
    }
    kept = {name: path for name, path in predicted.items() if name not in maps}
    return evaluate_pairs(pair_cases(kept, references, predictions, labels), class_names, voxel_units, ignore_label)


# benchmark --------------------------------------------------------------------------------------

def _benchmark(args: argparse.Namespace) -> int:
    from semiseg.benchmark_cli import run

    return run(args)


# methods, info ----------------------------------------------------------------------------------

def _methods(args: argparse.Namespace) -> int:
    from semiseg.config import default_of
    from semiseg.methods import METHODS, evidence

    for name, method in sorted(METHODS.items()):
        options = ", ".join(f"{k}={v}" for k, v in method.defaults.items()) or "none"
        default = " (the default)" if name == default_of("method") else ""
        print(f"{name:18s} {method.summary}{default}\n{'':18s} paper network: {method.paper_network}; options: {options}\n"
              f"{'':18s} measured: " + evidence.describe(name).replace("\n", "\n" + " " * 29))
    if evidence.benchmark_note():
        print(f"\nmeasured: {evidence.benchmark_note()}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from semiseg.models import read_record

    record = read_record(args.checkpoint)
    plan, split, best = record.plan, record.split, record.best_dice_mean
    lines = [
        f"checkpoint: {args.checkpoint}",
        f"method: {record.method}  options: {json.dumps(record.method_options)}",
        f"network: {record.network}  options: {json.dumps(record.network_options)}",
        f"preset: {(record.train_config or {}).get('preset') or 'none'}",
        f"classes: {', '.join(f'{k}={v}' for k, v in record.class_names.items())}",
        f"output channels -> label values: {_channel_mapping(plan)}  ignore label: {plan.ignore_label if plan.ignore_label is not None else 'none'}",
        f"patch: {tuple(plan.patch_size)}  " + plan.describe_channels(),
        plan.describe_geometry(),
        f"data: {record.data}  " + (f"labeled {len(split.labeled)}, unlabeled {len(split.unlabeled)}, validation {len(split.validation)}, seed {split.seed}" if split else "no split recorded"),
        f"iteration: {record.iteration} of {record.iterations}  best validation Dice: {best if best is not None else 'n/a'}",
        f"written by: {', '.join(f'{k} {v}' for k, v in record.versions.items())}",
    ]
    print("\n".join(lines))
    return 0


def _channel_mapping(plan) -> str:
    text = ", ".join(f"{channel}->{value}" for channel, value in enumerate(plan.channel_values))
    return text + ("" if plan.label_values is not None else " (channel i is label value i: a plan from before the mapping)")


# export-model -----------------------------------------------------------------------------------

def _export_model(args: argparse.Namespace) -> int:
    from semiseg.model_export import export_onnx, export_torchscript
    from semiseg.models import load_model

    model = load_model(args.checkpoint)
    export = export_onnx if args.format == "onnx" else export_torchscript
    model_path, plan_path = export(model, Path(args.out) / "model", overwrite=args.overwrite)
    print(f"model: {model_path}\nplan: {plan_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
