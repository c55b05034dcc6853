"""The Left Atrium benchmark protocol of the semi-supervised segmentation papers, run end to end.

Protocol (UA-MT, MICCAI 2019, and every LA comparison table since):
- data: the UA-MT LA folder, ``train.list`` (80 case ids) and ``test.list`` (20 case ids), one
  folder per case holding ``mri_norm2.h5``;
- labeled: the FIRST N ids of train.list (the UA-MT/MC-Net code takes indices 0..N-1), N = 8 (10%)
  or 16 (20%); unlabeled: the rest of train.list that is present on disk;
- training: patches of 112 x 112 x 80 in the h5 arrays' (x, y, z) order, batch 2 labeled + 2
  unlabeled. semiseg reads h5 arrays as (z, y, x), so the patch is (z, y, x) = (80, 112, 112);
- evaluation on the test.list cases: sliding window with the training patch and a stride of
  18 x 18 x 4 (x, y, z), i.e. (4, 18, 18) in (z, y, x), windows averaged with equal weights, then
  Dice, Jaccard, 95HD and ASD (medpy semantics) in voxels.

Two evaluation conventions coexist in the literature and every number here carries its own:
- ``last``: the last checkpoint, no post-processing (UA-MT, DTC);
- ``best-lcc``: the checkpoint with the best mean Dice on the 20 test cases (every 200 iterations
  from 800, and the last one), then only the largest connected component of the foreground is
  kept (MC-Net, MC-Net+, SS-Net, BCP, AD-MT).

A fast evaluation (``fast=True``) uses overlap 0.5 with Gaussian blending instead; its numbers are
labeled as such and are not the protocol's.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from semiseg.datasets import LA_FILE, Case
from semiseg.errors import InputError
from semiseg.metrics import METRICS, case_metrics, dice, mean_sd
from semiseg.postprocessing import largest_component

CONVENTIONS = ("last", "best-lcc")
TRAIN_LIST, TEST_LIST = "train.list", "test.list"


@dataclass(frozen=True)
class Preset:
    """A benchmark's patch and evaluation stride, given as the papers give them: (x, y, z)."""

    name: str
    patch_xyz: tuple[int, int, int]
    stride_xyz: tuple[int, int, int]
    train_cases: int  # size of the benchmark's train.list, for "N unlabeled found of M"

    @property
    def patch_zyx(self) -> tuple[int, int, int]:
        return tuple(reversed(self.patch_xyz))  # type: ignore[return-value]

    @property
    def stride_zyx(self) -> tuple[int, int, int]:
        return tuple(reversed(self.stride_xyz))  # type: ignore[return-value]


# Pancreas-CT (MC-Net+/BCP: 96^3, stride 16^3) and KiTS19 (128x128x64, stride 18x18x4) share the
# evaluation code; here they apply to data laid out as the LA folder (case/mri_norm2.h5 + lists).
PRESETS = {
    "la": Preset("LA", (112, 112, 80), (18, 18, 4), 80),
    "pancreas-ct": Preset("Pancreas-CT", (96, 96, 96), (16, 16, 16), 62),
    "kits19": Preset("KiTS19", (128, 128, 64), (18, 18, 4), 160),
}


def xyz(values: Sequence[int]) -> str:
    return "×".join(str(int(v)) for v in values)


# The split ---------------------------------------------------------------------------------------

@dataclass
class ProtocolSplit:
    root: str
    train_listed: list[str]
    test_listed: list[str]
    labeled: list[str]
    unlabeled: list[str]
    unlabeled_missing: list[str]
    test: list[str]
    test_missing: list[str]
    files: dict[str, str]  # case id -> mri_norm2.h5 path (present cases of both lists)

    @property
    def unlabeled_expected(self) -> int:
        return len(self.train_listed) - len(self.labeled)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("files")
        data["unlabeled_expected"] = self.unlabeled_expected
        return data


def _read_list(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text file of case ids, one a line") from None
    ids = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not ids:
        raise InputError(f"{path}: names no case")
    return ids


def labeled_count(spec: str | int, listed: int) -> int:
    """8 -> 8; "10%" -> 10% of the train.list ids (80 -> 8)."""
    text = str(spec).strip()
    try:
        count = round(listed * float(text[:-1]) / 100) if text.endswith("%") else int(text)
    except ValueError:
        raise InputError(f"--labeled '{spec}': give a count (8) or a percentage of train.list (10%)") from None
    if not 1 <= count < listed:
        raise InputError(f"--labeled '{spec}': {count} labeled of the {listed} train.list cases; give 1..{listed - 1}")
    return count


def protocol_split(data: str | os.PathLike, labeled: str | int) -> ProtocolSplit:
    """The protocol's cases from the LA folder: labeled = the first N ids of train.list."""
    root = Path(data)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder (give the LA benchmark folder with train.list and test.list)")
    absent = [name for name in (TRAIN_LIST, TEST_LIST) if not (root / name).is_file()]
    if absent:
        raise InputError(f"{root}: no {' or '.join(absent)} here; give the LA benchmark folder (UA-MT's data/LA: train.list, test.list and the case folders)")
    train_ids, test_ids = _read_list(root / TRAIN_LIST), _read_list(root / TEST_LIST)
    both = sorted(set(train_ids) & set(test_ids))
    if both:
        raise InputError(f"{root}: {len(both)} case ids are in both train.list and test.list ({', '.join(both[:3])})")
    files: dict[str, str] = {}
    for path in sorted(root.rglob(LA_FILE)):
        files.setdefault(path.parent.name, str(path))
    # rglob does not enter linked folders: look for a listed case as ROOT/<id>/ or ROOT/<any>/<id>/ too.
    subfolders = [p for p in sorted(root.iterdir()) if p.is_dir()]
    for case_id in train_ids + test_ids:
        if case_id not in files:
            for folder in (root, *subfolders):
                if (folder / case_id / LA_FILE).is_file():
                    files[case_id] = str(folder / case_id / LA_FILE)
                    break
    n = labeled_count(labeled, len(train_ids))
    labeled_ids = train_ids[:n]
    lost = [i for i in labeled_ids if i not in files]
    if lost:
        raise InputError(f"{root}: {len(lost)} of the first {n} train.list cases (the protocol's labeled ones) are missing on disk: {', '.join(lost[:3])}")
    rest = train_ids[n:]
    test_present = [i for i in test_ids if i in files]
    if not test_present:
        raise InputError(f"{root}: none of the {len(test_ids)} test.list cases is on disk (expected <case>/{LA_FILE})")
    return ProtocolSplit(
        str(root), train_ids, test_ids, labeled_ids,
        [i for i in rest if i in files], [i for i in rest if i not in files],
        test_present, [i for i in test_ids if i not in files],
        {i: files[i] for i in train_ids + test_ids if i in files},
    )


# Evaluation --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalSettings:
    patch_zyx: tuple[int, int, int]
    overlap: tuple[float, float, float]
    mode: str  # MONAI blending: "constant" (the papers' plain average) or "gaussian"
    name: str  # "protocol" or "fast"
    description: str


def overlap_for_stride(patch: Sequence[int], stride: Sequence[int]) -> tuple[float, ...]:
    """MONAI's overlap fractions giving exactly `stride` (MONAI steps int(patch * (1 - overlap)):
    aiming half a voxel above the stride keeps rounding from landing one voxel short)."""
    if any(s < 1 for s in stride):
        raise InputError(f"stride {tuple(stride)}: must be at least 1 voxel on every axis")
    return tuple(0.0 if s >= p else 1.0 - (s + 0.5) / p for p, s in zip(patch, stride))


def eval_settings(preset: Preset, fast: bool, patch_zyx: tuple[int, int, int] | None = None,
                  stride_zyx: tuple[int, int, int] | None = None) -> EvalSettings:
    patch = tuple(patch_zyx or preset.patch_zyx)
    if fast:
        return EvalSettings(patch, (0.5, 0.5, 0.5), "gaussian", "fast",  # type: ignore[arg-type]
                            f"fast: window {xyz(patch[::-1])} (x,y,z), overlap 0.5, Gaussian blending — not the papers' protocol")
    stride = tuple(stride_zyx or preset.stride_zyx)
    return EvalSettings(patch, overlap_for_stride(patch, stride), "constant", "protocol",  # type: ignore[arg-type]
                        f"protocol: window {xyz(patch[::-1])}, stride {xyz(stride[::-1])} (x,y,z), windows averaged")


def case_rows(case_id: str, prediction: np.ndarray, label: np.ndarray, class_names: dict[int, str]) -> list[dict]:
    """Per-class metrics in voxel units (the LA tables' units)."""
    ids = sorted(c for c in class_names if c != 0)
    return [{"case": case_id, "class": class_names[c], **values}
            for c, values in case_metrics(prediction, label, ids, spacing=None).items()]


def mean_dice(predictions: dict[str, np.ndarray], references: dict[str, np.ndarray], class_names: dict[int, str]) -> float:
    """Selection score: mean over the cases (and foreground classes) of the Dice before any
    post-processing; an empty prediction counts 0, as in the papers' var_all_case."""
    scores = []
    for case_id, prediction in predictions.items():
        reference = references[case_id]
        for c in sorted(class_names):
            if c == 0:
                continue
            scores.append(float(np.nan_to_num(dice(prediction == c, reference == c))))
    return float(np.mean(scores)) if scores else 0.0


class TestSet:
    """The test cases, predicted with one checkpoint at a time."""

    def __init__(self, split: ProtocolSplit, settings: EvalSettings, device, predictor: str | None = None):
        self.ids = list(split.test)
        self.cases = [Case(i, split.files[i], split.files[i]) for i in self.ids]
        self.settings = settings
        import torch

        self.device = torch.device(device)
        self.predictor = predictor
        self.seconds: list[float] = []  # wall time of each whole-test-set prediction

    def predict(self, checkpoint: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[int, str]]:
        """(predicted label maps, reference label maps, class names) of every test case."""
        import torch

        from semiseg.inference import predict_probabilities
        from semiseg.models import load_model
        from semiseg.preprocessing import cached_case

        # Called from inside a training run: building the model must not consume the run's RNG.
        python_state, numpy_state = random.getstate(), np.random.get_state()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            model = load_model(checkpoint, self.device)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        networks = model.method.predictors()
        if self.predictor is not None:
            if self.predictor not in networks:
                raise InputError(f"--predictor {self.predictor}: this method predicts with {', '.join(networks)}")
            networks = {self.predictor: networks[self.predictor]}
        predictors = list(networks.values())
        started = time.perf_counter()
        predictions, references = {}, {}
        for case in self.cases:
            image, label = cached_case(case, model.plan, True)
            probabilities = predict_probabilities(np.asarray(image), predictors, self.settings.patch_zyx, self.device,
                                                  self.settings.overlap, mode=self.settings.mode)  # type: ignore[arg-type]
            predictions[case.case_id] = probabilities.mean(0).argmax(0).astype(np.uint8)
            references[case.case_id] = np.asarray(label)
        self.seconds.append(time.perf_counter() - started)
        return predictions, references, dict(model.plan.class_names)

    def rows(self, predictions: dict[str, np.ndarray], references: dict[str, np.ndarray], class_names: dict[int, str],
             lcc: bool) -> list[dict]:
        rows = []
        for case_id in self.ids:
            prediction = largest_component(predictions[case_id]) if lcc else predictions[case_id]
            rows += case_rows(case_id, prediction, references[case_id], class_names)
        return rows


@dataclass
class Selection:
    """best-lcc: the checkpoint with the best test Dice (before post-processing), as MC-Net's code."""

    test: TestSet
    folder: Path  # where the selected checkpoint is saved
    best_dice: float = -1.0
    best_iteration: int = -1
    history: list[dict] = field(default_factory=list)
    best: tuple | None = None  # (predictions, references, class names) of the best checkpoint
    latest: tuple | None = None  # (iteration, predictions, references, class names)

    def consider(self, checkpoint: Path, iteration: int) -> tuple:
        if self.latest is not None and self.latest[0] == iteration:
            return self.latest[1:]
        predicted = self.test.predict(checkpoint)
        dice = mean_dice(*predicted)
        improved = dice > self.best_dice
        self.history.append({"iteration": iteration, "test_dice": dice, "best": improved})
        if improved:
            self.best_dice, self.best_iteration, self.best = dice, iteration, predicted
            _copy_checkpoint(checkpoint, self.folder, {"iteration": iteration, "test_dice": dice,
                                                        "rule": "best mean test Dice (no post-processing) over the checked iterations"})
        self.latest = (iteration, *predicted)
        return predicted


def _copy_checkpoint(source: Path, target: Path, selection: dict) -> None:
    """Save the weights of `source` as a model-only checkpoint at `target`, noting the selection."""
    from semiseg.checkpoint import load_weights, save_checkpoint
    from semiseg.models import read_record

    record = read_record(source)
    record.extra["benchmark_selection"] = selection
    save_checkpoint(target, load_weights(source, record.weights_sha256), record.to_dict())


# Results -----------------------------------------------------------------------------------------

def summarize_rows(rows: Sequence[dict]) -> dict[str, dict]:
    """Mean over the test cases of each metric (Dice/Jaccard as fractions, distances in voxels)."""
    return {metric: mean_sd([row[metric] for row in rows]) for metric in METRICS}


def combine_seeds(per_seed: Sequence[dict[str, dict]]) -> dict[str, dict]:
    """Mean ± sd over seeds of each seed's test-set mean."""
    return {metric: mean_sd([summary[metric]["mean"] for summary in per_seed]) for metric in METRICS}


def load_literature() -> dict:
    return json.loads(resources.files("semiseg").joinpath("data/la_literature.json").read_text(encoding="utf-8"))


def _cell(stats: dict, percent: bool) -> str:
    if not stats or stats.get("n", 0) == 0:
        return "n/a"
    scale = 100.0 if percent else 1.0
    text = f"{stats['mean'] * scale:.2f}"
    if stats.get("n", 1) > 1 and stats.get("sd") is not None and not math.isnan(stats["sd"]):
        text += f" ± {stats['sd'] * scale:.2f}"
    return text


def result_rows(results: Sequence[dict]) -> list[dict]:
    """Table rows from results.json documents: one per (method, labeled, convention, evaluation),
    the seeds of every document pooled (mean ± sd over seeds)."""
    groups: dict[tuple, dict] = {}
    for result in results:
        for run in result["runs"]:
            for convention, outcome in run["conventions"].items():
                key = (result["method_label"], result["labeled"], result["unlabeled"], convention, result["evaluation"]["name"])
                group = groups.setdefault(key, {"summaries": [], "seeds": [], "iterations": [], "result": result})
                group["summaries"].append(outcome["summary"])
                group["seeds"].append(run["seed"])
                group["iterations"].append(outcome["iteration"])
    rows = []
    for (method, labeled, unlabeled, convention, evaluation), group in groups.items():
        rows.append({"method": method, "labeled": labeled, "unlabeled": unlabeled, "convention": convention,
                     "evaluation": evaluation, "seeds": group["seeds"], "iterations": group["iterations"],
                     "metrics": combine_seeds(group["summaries"]), "result": group["result"]})
    return rows


TABLE_HEADER = "| Method | Labeled scans | Unlabeled scans | Dice (%) | Jaccard (%) | 95HD (voxel) | ASD (voxel) | Convention | Source |"


def markdown_table(results: Sequence[dict], literature: dict | None = None, title: str = "Left Atrium benchmark") -> str:
    """The papers' table: our runs (mean ± sd over seeds) above the published rows for the same
    labeled counts, every row labeled with its evaluation convention."""
    rows = result_rows(results)
    lines = [f"## {title}", ""]
    for result in results:
        split = result["split"]
        missing = len(split["unlabeled_missing"])
        found = f"{len(split['unlabeled'])} unlabeled found of {split['unlabeled_expected']}" + (
            f" ({missing} train.list cases missing on disk)" if missing else "")
        test = f"{len(split['test'])} test cases found of {len(split['test_listed'])}" + (
            f" ({len(split['test_missing'])} missing)" if split["test_missing"] else "")
        lines.append(f"- **{result['method_label']}**, {result['labeled']} labeled: the first {result['labeled']} ids of train.list; "
                     f"{found}; {test}; training patch {result['patch_xyz']} (x,y,z) = {result['patch_zyx']} (z,y,x), "
                     f"{result['iterations']} iterations, batch {result['batch_size']}+{result['batch_size']}; evaluation {result['evaluation']['description']}"
                     + (f"; seeds {', '.join(map(str, [r['seed'] for r in result['runs']]))}" if result["runs"] else ""))
        if result.get("smoke"):
            lines.append("  - SMOKE RUN: patch/stride overridden for a quick check; not the protocol, not comparable with the papers.")
    lines += ["", "Ours: mean over the test cases; with several seeds, mean ± sd over the seeds' means. "
              "Conventions: `last` = last checkpoint, no post-processing (UA-MT, DTC); `best-lcc` = checkpoint with the best test Dice, "
              "largest connected component kept (MC-Net, SS-Net, BCP, AD-MT). `fast` evaluation = overlap 0.5 with Gaussian blending, not the protocol.", ""]
    lines += [TABLE_HEADER, "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for row in sorted(rows, key=lambda r: (r["labeled"], r["method"], r["convention"], r["evaluation"])):
        m = row["metrics"]
        convention = row["convention"] + (" (fast eval)" if row["evaluation"] == "fast" else "")
        its = sorted(set(row["iterations"]))
        source = f"this run, seed{'s' if len(row['seeds']) > 1 else ''} {', '.join(map(str, row['seeds']))}; iteration {', '.join(map(str, its))}"
        lines.append(f"| {row['method']} | {row['labeled']} | {row['unlabeled']} | {_cell(m['dice'], True)} | {_cell(m['jaccard'], True)} | "
                     f"{_cell(m['hd95'], False)} | {_cell(m['asd'], False)} | {convention} | {source} |")
    if literature is not None:
        counts = sorted({row["labeled"] for row in rows})
        published = [r for r in literature["rows"] if r["labeled"] in counts]
        if published:
            lines += ["", "Published (from `semiseg/data/la_literature.json`; as printed by the cited source):", "", TABLE_HEADER,
                      "|---|---:|---:|---:|---:|---:|---:|---|---|"]
            for r in sorted(published, key=lambda r: (r["labeled"], r["source"])):
                source = literature["sources"][r["source"]]
                lines.append(f"| {r['method']} | {r['labeled']} | {r['unlabeled']} | {r['dice']:.2f} | {r['jaccard']:.2f} | {r['hd95']:.2f} | "
                             f"{r['asd']:.2f} | {r['convention']} | {source.get('short', source['title'])}, {r['table']} |")
    return "\n".join(lines) + "\n"


def read_results(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """results.json documents from benchmark output folders (or the files themselves)."""
    results = []
    for path in paths:
        path = Path(path)
        file = path / "results.json" if path.is_dir() else path
        if not file.is_file():
            raise InputError(f"{path}: no results.json (give the --out folder of a finished `semiseg benchmark la` run)")
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"{file}: not a benchmark results file ({error})") from None
        if not isinstance(data, dict) or data.get("benchmark") != "semiseg-la" or "runs" not in data:
            raise InputError(f"{file}: not a `semiseg benchmark la` results file")
        results.append(data)
    return results


def write_json(path: Path, data: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    os.replace(temporary, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


# The protocol's run -------------------------------------------------------------------------------

ProgressCallback = Callable[[dict[str, Any]], None]

# The papers' training settings (UA-MT/DTC), under the caller's own; any TrainConfig field may be given.
PROTOCOL_TRAINING: dict[str, Any] = {"method": "mean-teacher", "network": "vnet", "iterations": 6000, "lr": 0.01, "batch_size": 2}


def method_label(training: dict[str, Any], explicit_options: dict[str, Any] | None = None) -> str:
    """'method (network, options..., preset P)': the row name of a run in the tables; with a preset, only the
    options given besides it (`explicit_options`) are named."""
    shown = explicit_options if explicit_options is not None else {**training.get("network_options", {}), **training.get("method_options", {})}
    options = [f"{k}={v}" for k, v in shown.items()] + ([f"preset {training['preset']}"] if training.get("preset") else [])
    return f"{training['method']} ({training['network']}{', ' + ', '.join(options) if options else ''})"


def run_protocol(data: str | os.PathLike, out: str | os.PathLike, training: dict[str, Any] | None = None, *,
                 labeled: str | int = 8, seeds: Sequence[int] = (0,), conventions: Sequence[str] = CONVENTIONS,
                 geometry: str = "la", fast_eval: bool = False, predictor: str | None = None, select_from: int = 800,
                 select_every: int = 200, smoke_patch: tuple[int, int, int] | None = None,
                 smoke_stride: tuple[int, int, int] | None = None, progress: ProgressCallback | None = None,
                 label_options: dict[str, Any] | None = None, resume: bool = False,
                 time_limit: float | None = None) -> dict[str, Any]:
    """Train one run per seed with the protocol's split and patch, evaluate every convention on the
    test cases, and write OUT/seed-S/ runs, OUT/results.json and OUT/table.md (after each seed).

    `training` holds TrainConfig fields (method, network, options, iterations, lr, device, ...)
    over PROTOCOL_TRAINING. `progress` receives the trainers' events tagged with their "seed", and
    {"type": "protocol"} (what will run), {"type": "selection"} (a checkpoint checked on the test
    cases) and {"type": "outcome"} (a seed's result under one convention). Returns results.json's content.
    `geometry` names the patch/stride of PRESETS; `label_options` the options a row's name shows (default: all).
    `resume` continues each seed's run from its last checkpoint where there is one; `time_limit` (seconds)
    stops training then, with a resumable last checkpoint, and evaluates what was trained (a GPU check's budget).
    """
    from semiseg.config import TrainConfig
    from semiseg.devices import describe, resolve_device
    from semiseg.methods import method_class
    from semiseg.metrics import write_csv
    from semiseg.models import read_record
    from semiseg.training import train

    report = progress or (lambda event: None)
    if geometry not in PRESETS:
        raise InputError(f"geometry '{geometry}': choose from {', '.join(PRESETS)}")
    unknown = sorted(set(conventions) - set(CONVENTIONS))
    if unknown or not conventions:
        raise InputError(f"conventions {', '.join(unknown) or '(none)'}: choose from {', '.join(CONVENTIONS)}")
    training = {**PROTOCOL_TRAINING, **(training or {})}
    split = protocol_split(data, labeled)
    device = resolve_device(training.get("device", "auto"))
    smoke = bool(smoke_patch or smoke_stride)
    patch_zyx = tuple(smoke_patch) if smoke_patch else PRESETS[geometry].patch_zyx
    settings = eval_settings(PRESETS[geometry], fast_eval, patch_zyx, tuple(smoke_stride) if smoke_stride else None)  # type: ignore[arg-type]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "semiseg-la", "geometry": PRESETS[geometry].name, "preset": training.get("preset"), "smoke": smoke,
        "method": training["method"], "network": training["network"], "method_options": dict(training.get("method_options", {})),
        "network_options": dict(training.get("network_options", {})), "method_label": method_label(training, label_options),
        "labeled": len(split.labeled), "unlabeled": len(split.unlabeled) if method_class(training["method"]).uses_unlabeled else 0,
        "split": split.to_dict(), "patch_xyz": xyz(patch_zyx[::-1]), "patch_zyx": xyz(patch_zyx), "iterations": training["iterations"],
        "batch_size": training["batch_size"], "lr": training["lr"], "device": describe(device),
        "evaluation": {"name": settings.name, "description": settings.description, "patch_zyx": list(settings.patch_zyx),
                       "overlap_zyx": list(settings.overlap), "blending": settings.mode, "units": "voxels",
                       "predictor": predictor or "mean of the method's predictors"},
        "selection": {"from": select_from, "every": select_every, "on": "test.list cases, mean Dice without post-processing"},
        "training": TrainConfig.from_dict({**training, "data": str(data), "output": str(out)}).to_dict(),
        "runs": [],
    }
    report({"type": "protocol", "split": split, "patch_xyz": result["patch_xyz"], "evaluation": settings.description,
            "device": result["device"], "smoke": smoke})
    for seed in seeds:
        run_dir = out / f"seed-{seed}"
        test = TestSet(split, settings, device, predictor)
        selection = Selection(test, run_dir / "best-on-test") if "best-lcc" in conventions else None
        # The trainer is given the training cases themselves: it never sees the test cases.
        config = TrainConfig.from_dict({
            **training, "data": split.root, "output": str(run_dir), "seed": seed, "patch_size": patch_zyx,
            "labeled": [[split.files[i], split.files[i]] for i in split.labeled], "validation": "0",
            "unlabeled_cases": [split.files[i] for i in sorted(split.unlabeled)], "validate_every": select_every,
            "resume": resume and (run_dir / "last").exists(),
        })
        timing: dict[str, float] = {}

        def on_event(event: dict, seed: int = seed, selection: Selection | None = selection, timing: dict = timing) -> None:
            report({**event, "seed": seed})
            if event["type"] == "iteration":
                timing["sec_per_iter"] = event["sec_per_iter"]
            elif event["type"] == "checkpoint" and event["name"] == "last" and selection is not None:
                iteration = event["iteration"]
                if select_from <= iteration < config.iterations and iteration % select_every == 0:
                    selection.consider(Path(event["path"]), iteration)
                    report({"type": "selection", "seed": seed, **selection.history[-1]})

        started = time.perf_counter()
        deadline = None if time_limit is None else started + time_limit
        train(config, on_event, (lambda: time.perf_counter() > deadline) if deadline is not None else None)
        trained = time.perf_counter() - started
        last = run_dir / "last"
        iteration = read_record(last).iteration
        predicted = selection.consider(last, iteration) if selection is not None else test.predict(last)
        outcomes: dict[str, Any] = {}
        if "last" in conventions:
            rows = test.rows(*predicted, lcc=False)
            outcomes["last"] = {"iteration": iteration, "checkpoint": str(last), "post_processing": "none",
                                "summary": summarize_rows(rows), "cases": rows}
        if selection is not None:
            rows = test.rows(*selection.best, lcc=True)
            outcomes["best-lcc"] = {"iteration": selection.best_iteration, "checkpoint": str(selection.folder),
                                    "post_processing": "largest connected component", "selection_test_dice": selection.best_dice,
                                    "history": selection.history, "summary": summarize_rows(rows), "cases": rows}
        for convention, outcome in outcomes.items():
            write_csv(outcome["cases"], run_dir / f"metrics_{convention}.csv")
        result["runs"].append({"seed": seed, "conventions": outcomes, "train_seconds": trained,
                               "sec_per_iter": timing.get("sec_per_iter"), "eval_seconds": test.seconds})
        result["runs"].sort(key=lambda r: r["seed"])
        write_json(out / "results.json", result)
        (out / "table.md").write_text(markdown_table([result], load_literature()))
        for convention, outcome in outcomes.items():
            report({"type": "outcome", "seed": seed, "convention": convention, "fast_eval": settings.name == "fast",
                    "iteration": outcome["iteration"], "summary": outcome["summary"]})
    return result
