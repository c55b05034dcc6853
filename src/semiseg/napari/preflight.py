"""Checks before a training or fine-tuning process starts (no Qt): a job that the form already
shows to be doomed is refused with the reason, before anything is written or launched."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from semiseg.checkpoint import read_meta
from semiseg.datasets import Dataset, choose_split, load_dataset
from semiseg.errors import InputError

if TYPE_CHECKING:
    from semiseg.training import TrainConfig


def check_training(config: TrainConfig) -> None:
    """The dataset exists and splits as the trainer will split it; a resumed run has iterations left."""
    dataset = load_dataset(config.data, config.unlabeled)
    choose_split(dataset, config.labeled, config.validation, config.seed)
    if config.resume:
        done = int(read_meta(Path(config.output) / "last").get("iteration", 0))
        if config.iterations <= done:
            raise InputError(f"the run in {config.output} has done {done} iterations already; "
                             f"set Iterations above {done} to continue it")


def check_unlabeled_folder(folder: str | Path) -> Dataset:
    """The folder of scans a fine-tuning trains on: it exists and holds scans."""
    return load_dataset(Path(folder).expanduser())
