"""Fine-tuning a model on corrections, and the check that it helped (no Qt here).

A correction is a scan with its corrected label map, saved first (`save_correction`) so that
nothing that happens next can lose it. `finetune_config` describes the short training that
continues from a checkpoint (its weights and preprocessing plan) with the corrections as labeled
cases, as `semiseg finetune` and the plugin's Fine-tune widget run it. The recipe (the defaults of
`FineTuneRequest`) was chosen by measurement (benchmarks/results/finetune_recipes.md): the model's
own labeled cases replayed beside the corrections, the corrections drawn for half of the labeled
patches, 50 iterations at lr 0.003, batch-norm statistics kept. From a supervised VNet trained on 4
hippocampus cases, one perfect correction raised the mean Dice of 40 validation cases by +0.008 and
+0.013 with it, where the correction alone at lr 0.01 (the earlier default) lowered it (by 0.033 and
0.005); more training on the old cases alone changed it by -0.002, so the gain is the correction's.
Replaying at lr 0.01 gained a little more on that weak model but hurt a strong one more (the bundled
model: -0.017 vs -0.008 on its held-out case), and the share keeps a correction learned when the
model's own cases are many.

Which scans train how:
- the corrections train labeled, drawn for `correction_share` of the labeled patches;
- with `replay`, the model's own labeled training cases train labeled too (guarding against
  forgetting): the files its checkpoint records when they are all still there, else the folder's
  labeled scans (except a corrected scan);
- every other scan of the folder trains unlabeled (used by semi-supervised methods only).

`compare_before_after` scores the model before and after on the same held-out cases (those the
caller names, else the model's validation cases when still on disk) and says whether fine-tuning
helped (`BeforeAfter.worse`: keep the old model); `guard_cases` finds cases neither model trained on
(the validation cases, else a folder's labeled scans), as the Fine-tune widget's guard uses them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semiseg.config import CaseEntry, TrainConfig
from semiseg.datasets import Case, case_id_of, case_of_files, load_dataset, same_file
from semiseg.devices import resolve_device
from semiseg.errors import InputError, OutputExistsError, SemisegError
from semiseg.io import Volume, is_dicom_folder, volume_suffix, write_volume
from semiseg.metrics import case_metrics
from semiseg.models import ModelRecord, read_record

CORRECTIONS = "corrections"


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _safe(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return keep or "scan"


def save_new(volume: Volume, folder: Path, stem: str, suffix: str = ".nii.gz") -> Path:
    """Write a volume under a name never used before in `folder` (stem_YYYYmmdd-HHMMSS[_N])."""
    folder.mkdir(parents=True, exist_ok=True)
    base = f"{_safe(stem)}_{_stamp()}"
    for attempt in range(1, 1000):
        path = folder / (f"{base}{suffix}" if attempt == 1 else f"{base}_{attempt}{suffix}")
        if path.exists():
            continue
        try:
            return write_volume(volume, path, overwrite=False)
        except OutputExistsError:
            continue
    raise InputError(f"{folder}: cannot find a free file name for {stem}")


def save_correction(labels: Volume, output: str | os.PathLike, image_name: str) -> Path:
    """OUT/corrections/<image>_correction_<time>.nii.gz, on the scan's grid; never overwrites."""
    return save_new(labels, Path(output) / CORRECTIONS, f"{image_name}_correction")


def image_on_disk(image: Volume, source_path: str | None, output: str | os.PathLike, image_name: str) -> Path:
    """The scan as a file the trainer can read: its source if that still holds this very scan,
    else a copy written beside the corrections."""
    if source_path:
        source = Path(source_path)
        readable = (source.is_file() and volume_suffix(source) not in (None, ".h5")) or (source.is_dir() and is_dicom_folder(source))
        if readable:
            return source
    return save_new(image, Path(output) / CORRECTIONS, f"{image_name}_image")


@dataclass
class FineTuneRequest:
    """One fine-tuning: the model to start from, the corrections, the folder of scans, the recipe.
    The recipe's defaults are the measured one (see the module's docstring)."""

    checkpoint: str
    folder: str  # scans that train unlabeled; its labeled ones replay when the model's own cases are out of reach
    output: str  # the run's folder (gets last/, best/, log.jsonl)
    corrections: list[tuple[str, str]] = field(default_factory=list)  # (scan, corrected label map) file pairs
    image_path: str | None = None  # one more correction, given by its scan...
    label_path: str | None = None  # ...and its label map
    method: str | None = None  # default: the checkpoint's
    iterations: int = 50
    lr: float = 0.003
    replay: bool = True  # also train on the model's own labeled cases (else the folder's labeled scans)
    correction_share: float | None = 0.5  # of the labeled patches drawn from the corrections; None: as any case
    frozen_norm_statistics: bool = True  # keep the model's batch-norm statistics
    batch_size: int = 2
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False

    def correction_pairs(self) -> list[tuple[str, str]]:
        """Every correction as a (scan, label map) pair of existing files."""
        pairs = [(str(image), str(label)) for image, label in self.corrections]
        if self.image_path or self.label_path:
            if not (self.image_path and self.label_path):
                raise InputError("a correction needs both its scan and its corrected label map")
            pairs.append((str(self.image_path), str(self.label_path)))
        if not pairs:
            raise InputError("no correction given: fine-tuning needs at least one scan with its corrected label map")
        for image, label in pairs:
            for path, what in ((image, "scan"), (label, "corrected label map")):
                if not Path(path).exists():
                    raise InputError(f"{path}: no such {what}")
        return pairs


def finetune_config(request: FineTuneRequest) -> TrainConfig:
    """The training run of a fine-tuning request: it continues from the checkpoint's weights and plan."""
    record = read_record(request.checkpoint)
    method = request.method or record.method
    corrections = request.correction_pairs()
    replayed = replay_cases(record, request.folder, corrections) if request.replay else []
    copies = correction_copies(len(replayed), len(corrections), request.correction_share)
    return TrainConfig(
        data=request.folder, output=str(request.output), method=method, network=record.network,
        network_options=dict(record.network_options),
        method_options=dict(record.method_options) if method == record.method else {},
        # The patch sampler draws labeled cases uniformly: a correction listed k times is drawn k times as often.
        labeled=[*replayed, *[list(pair) for pair in corrections] * copies], validation="0", iterations=request.iterations,
        batch_size=request.batch_size, lr=request.lr, validate_every=request.iterations + 1, log_every=1, seed=request.seed,
        device=request.device, workers=0, initial_checkpoint=str(request.checkpoint), overwrite=request.overwrite,
        frozen_norm_statistics=request.frozen_norm_statistics,
    )


def correction_copies(replayed: int, corrections: int, share: float | None) -> int:
    """How many times to list each correction so that about `share` of the labeled draws are corrections."""
    if share is None or not replayed:
        return 1
    if not 0 < share < 1:
        raise InputError(f"correction share {share}: give a fraction between 0 and 1")
    return max(1, round(share * replayed / ((1 - share) * corrections)))


def replay_cases(record: ModelRecord, folder: str | os.PathLike, corrections: list[tuple[str, str]]) -> list[CaseEntry]:
    """The labeled cases that train beside the corrections: the model's own labeled training cases when
    they are all still on disk, else the folder's labeled scans; never a scan that was corrected. An own
    case whose id names another file of the folder (e.g. a copy of it) is left out: one id, one scan."""
    corrected = [image for image, _ in corrections]
    own = recorded_cases(record, record.split.labeled if record.split else [], "labeled")
    if own is not None:
        in_folder = {c.case_id: c.image for c in load_dataset(folder).cases}
        return [list(pair) for pair in own if not any(same_file(pair[0], image) for image in corrected)
                and same_file(in_folder.get(case_id_of(pair[1]), pair[0]), pair[0])]
    return [c.case_id for c in load_dataset(folder).labeled if not any(same_file(c.image, image) for image in corrected)]


def recorded_cases(record: ModelRecord, case_ids: list[str], role: str) -> list[tuple[str, str]] | None:
    """The (scan, label) files of some of a checkpoint's cases (`role`: "labeled" or "validation"), found
    as its training found them: given by their files, or cases of its data folder. None when there are
    none or one of them is out of reach."""
    if not case_ids or not record.data:
        return None
    given = (record.train_config or {}).get(role)
    by_files = {case_id_of(entry[1]): entry for entry in given if not isinstance(entry, str)} if isinstance(given, list) else {}
    in_folder: dict[str, Case] | None = None
    pairs = []
    for case_id in dict.fromkeys(case_ids):  # a correction listed several times is one case
        if case_id in by_files:
            image, label = by_files[case_id]
        else:
            if in_folder is None:
                try:
                    in_folder = {c.case_id: c for c in load_dataset(record.data).labeled}
                except InputError:
                    return None
            case = in_folder.get(case_id)
            if case is None:
                return None
            image, label = case.image, case.label
        if not (Path(image).exists() and Path(label).exists()):
            return None
        pairs.append((str(image), str(label)))
    return pairs


# The guard ---------------------------------------------------------------------------------------

# Mean Dice may drop this much (half a Dice point) before fine-tuning counts as harm.
DICE_TOLERANCE = 0.005


@dataclass
class BeforeAfter:
    """Each held-out case's Dice (mean over the foreground classes) before and after fine-tuning."""

    cases: list[str]
    before: list[float]
    after: list[float]
    tolerance: float = DICE_TOLERANCE

    @property
    def before_mean(self) -> float:
        return float(np.nanmean(self.before))

    @property
    def after_mean(self) -> float:
        return float(np.nanmean(self.after))

    @property
    def worse(self) -> bool:
        """Whether the fine-tuned model lost more than the tolerance: keep the old one."""
        return self.after_mean < self.before_mean - self.tolerance

    @property
    def cases_worse(self) -> int:
        return int(sum(a < b for a, b in zip(self.after, self.before)))

    def verdict(self) -> str:
        change = "worse: keep the model from before" if self.worse else ("better" if self.after_mean > self.before_mean else "no worse")
        return (f"Dice on {len(self.cases)} held-out case(s): {self.before_mean:.4f} before, {self.after_mean:.4f} after "
                f"({self.cases_worse} case(s) lower); {change}")


def held_out_cases(record: ModelRecord) -> list[tuple[str, str]] | None:
    """A checkpoint's validation cases as (scan, label) files, None when it has none or they are out of reach."""
    return recorded_cases(record, record.split.validation if record.split else [], "validation")


def case_dice(checkpoint: str | os.PathLike, cases: list[tuple[str, str]], device: str = "cpu",
              on_case: Callable[[], None] | None = None) -> list[float]:
    """A model's Dice on each (scan, label) case, on the scan's own grid, averaged over the foreground classes
    (`metrics.case_metrics`, as every evaluation: the plan's ignore label left out). `on_case` is called after
    each case (progress; it may raise to stop)."""
    import torch

    from semiseg.inference import predict_volume
    from semiseg.models import load_model
    from semiseg.preprocessing import read_case

    target = resolve_device(device)
    model = load_model(checkpoint, target)
    classes = [c for c in sorted(model.plan.class_names) if c != 0]
    scores = []
    with torch.no_grad():
        for image_path, label_path in cases:
            image, label = read_case(case_of_files(image_path, label_path))
            predicted = predict_volume(image, model.plan, model.predictors(), target, model.overlap,
                                       window_scale=model.window_scale).labels.array
            per_class = case_metrics(predicted, label.array, classes, ignore_label=model.plan.ignore_label)
            scores.append(float(np.mean([per_class[c]["dice"] for c in classes])))
            if on_case is not None:
                on_case()
    return scores


def known_held_out(record: ModelRecord) -> list[tuple[str, str]] | None:
    """The validation cases of a model, else of the model it was fine-tuned from (and so on back), while on disk."""
    seen: set[str] = set()
    while True:
        cases = held_out_cases(record)
        parent = (record.train_config or {}).get("initial_checkpoint")
        if cases or not parent or parent in seen:
            return cases
        seen.add(parent)
        try:
            record = read_record(parent)
        except SemisegError:
            return None


def guard_cases(before: str | os.PathLike, after: str | os.PathLike, folder: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """Labeled cases neither model trained on, to compare them on: the validation cases the model from
    before knows (its own or, after earlier rounds, those of the model it was fine-tuned from), else the
    labeled scans of `folder`; empty when none is left."""
    before_record, after_record = read_record(before), read_record(after)
    candidates = known_held_out(before_record)
    if candidates is None and folder is not None:
        try:
            candidates = [(c.image, c.label) for c in load_dataset(folder).labeled]
        except InputError:
            candidates = None
    trained_files = [entry[0] for record in (before_record, after_record)
                     for entry in (record.train_config or {}).get("labeled") or [] if not isinstance(entry, str)]
    # By case id too: a corrected scan may be a copy of a labeled one, under its name.
    trained_ids = {case for record in (before_record, after_record) if record.split for case in record.split.labeled}
    trained_ids |= {case_id_of(image) for image in trained_files}
    return [(image, label) for image, label in candidates or []
            if case_id_of(label) not in trained_ids and not any(same_file(image, other) for other in trained_files)]


def compare_before_after(before: str | os.PathLike, after: str | os.PathLike, cases: list[tuple[str, str]] | None = None,
                         device: str = "cpu", tolerance: float = DICE_TOLERANCE,
                         on_case: Callable[[], None] | None = None) -> BeforeAfter:
    """Score the models before and after fine-tuning on the same held-out cases: the ones named, else the
    validation cases the model from before records. Raise InputError when there are none to score on."""
    held_out = cases or held_out_cases(read_record(before))
    if not held_out:
        raise InputError(f"{before}: the model records no validation cases that are still on disk; "
                         "name held-out labeled cases to compare the models on")
    return BeforeAfter([case_id_of(label) for _, label in held_out], case_dice(before, held_out, device, on_case),
                       case_dice(after, held_out, device, on_case), tolerance)
