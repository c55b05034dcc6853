"""Text and names the widgets show (no Qt here)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path


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
