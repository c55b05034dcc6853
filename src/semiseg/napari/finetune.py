"""Fine-tuning on a correction (no Qt here): save the corrected mask first, then describe the short
training that continues from the current checkpoint with it as a labeled case plus a folder's scans.

The engine (`semiseg.config.TrainConfig`) takes the correction as a labeled case given by its
[image, label] paths and the starting weights and preprocessing plan from `initial_checkpoint`.
Which of the folder's scans train how:
- a folder of scans without labels: all of them train unlabeled;
- a dataset with labels and "use its labels" on: its labeled cases train labeled too (guarding
  against forgetting), except a case whose scan is the corrected one; the rest unlabeled;
- a dataset with labels and "use its labels" off: all its scans train unlabeled.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semiseg.config import TrainConfig
from semiseg.datasets import load_dataset, same_file
from semiseg.errors import InputError, OutputExistsError
from semiseg.io import Volume, is_dicom_folder, volume_suffix, write_volume
from semiseg.models import read_record

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


def check_labels(array: np.ndarray, class_names: dict[int, str], name: str) -> None:
    values = set(np.unique(array).tolist())
    unknown = sorted(values - set(class_names))
    if unknown:
        known = ", ".join(f"{k}={v}" for k, v in sorted(class_names.items()))
        raise InputError(f"'{name}' holds label value(s) {', '.join(map(str, unknown))} that the model does not know ({known})")


@dataclass
class FineTuneRequest:
    checkpoint: str
    folder: str
    output: str  # the run's folder (gets last/, best/, log.jsonl)
    image_path: str
    label_path: str
    method: str | None = None  # default: the checkpoint's
    iterations: int = 50
    lr: float = 0.01
    batch_size: int = 2
    device: str = "auto"
    use_folder_labels: bool = True
    seed: int = 0


def finetune_config(request: FineTuneRequest) -> TrainConfig:
    record = read_record(request.checkpoint)
    method = request.method or record.method
    dataset = load_dataset(request.folder)
    keep = [c.case_id for c in dataset.labeled if not same_file(c.image, request.image_path)] if request.use_folder_labels else []
    return TrainConfig(
        data=request.folder, output=str(request.output), method=method, network=record.network,
        network_options=dict(record.network_options),
        method_options=dict(record.method_options) if method == record.method else {},
        # The correction and the kept labeled cases train labeled; every other scan of the folder unlabeled.
        labeled=[*keep, [str(request.image_path), str(request.label_path)]], validation="0", iterations=request.iterations,
        batch_size=request.batch_size, lr=request.lr, validate_every=request.iterations + 1,
        log_every=1, seed=request.seed, device=request.device, workers=0, initial_checkpoint=str(request.checkpoint),
    )
