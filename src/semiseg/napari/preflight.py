"""Checks before a training or fine-tuning process starts (no Qt): a job that the form already
shows to be doomed is refused with the reason, before anything is written or launched."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from semiseg.datasets import Dataset, load_dataset, select_split
from semiseg.errors import InputError
from semiseg.models import read_record

if TYPE_CHECKING:
    from semiseg.config import TrainConfig


def check_training(config: TrainConfig) -> None:
    """The dataset exists and splits as the trainer will split it; a resumed run has iterations left."""
    dataset = load_dataset(config.data, config.unlabeled)
    select_split(dataset, config.labeled, config.validation, config.unlabeled_cases, config.seed)
    if config.resume:
        done = read_record(Path(config.output) / "last").iteration
        if config.iterations <= done:
            raise InputError(f"the run in {config.output} has done {done} iterations already; "
                             f"set Iterations above {done} to continue it")


def check_unlabeled_folder(folder: str | Path) -> Dataset:
    """The folder of scans a fine-tuning trains on: it exists and holds scans."""
    return load_dataset(Path(folder).expanduser())
