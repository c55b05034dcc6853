"""Text and names the widgets show (no Qt here)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path

from semiseg.datasets import case_id_of
from semiseg.napari.checkpoints import read_record_or_none


def one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def default_runs() -> Path:
    return Path.home() / "semiseg-runs"



def millilitres(value: float) -> str:
    return f"{value:,.1f}" if value >= 100 else f"{value:.3f}"


def volume_rows(columns: Mapping[str, Mapping[int, float]], class_names: Mapping[int, str]) -> list[tuple[int, list[str]]]:
    """(class id, [class name, volume per column in mL]) for every foreground class in any column."""
    classes = sorted({k for volumes in columns.values() for k in volumes} - {0})
    return [(k, [class_names.get(k, f"class {k}")] + [millilitres(volumes[k]) if k in volumes else "" for volumes in columns.values()])
            for k in classes]


def score_note(checkpoint: str, source_path: str | None) -> str | None:
    """What the metrics against a reference mean when the scan is one the model met in training."""
    record = read_record_or_none(checkpoint)
    if record is None or not source_path:
        return None
    case_id = case_id_of(source_path)
    role = record.case_role(case_id)
    if role in ("labeled", "unlabeled"):
        return f"{case_id} is one of this model's {role} training cases: these metrics are not a held-out score."
    if role == "validation":
        return f"{case_id} is one of this model's validation cases (held out from training)."
    return None

