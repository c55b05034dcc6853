"""What the hippocampus benchmark measured for each method, for choosing one before training.

`benchmarks/hippocampus_cpu.py` writes `semiseg/data/method_evidence.json` from its seeded comparison
(several seeds per labeled count, paired against supervised-only over the same validation cases) and
from its throughput rows; `semiseg methods` and the Train widget show it next to each method.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources


@dataclass(frozen=True)
class Measured:
    """One method at one labeled count: Dice mean ± sd over seeds, and the paired test against supervised."""

    labeled: int
    seeds: int
    dice: float
    dice_sd: float
    delta: float | None = None  # mean per-case Dice minus supervised-only's, over the seeds both have
    p_value: float | None = None  # Wilcoxon signed-rank over the validation cases
    better_cases: str | None = None  # e.g. "31/40"


@lru_cache(maxsize=1)
def _evidence() -> dict:
    try:
        return json.loads(resources.files("semiseg.data").joinpath("method_evidence.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def benchmark_note() -> str:
    """Where the numbers come from, in one line."""
    return _evidence().get("setting", "")


def measured(method: str) -> list[Measured]:
    """The method's rows, fewest labels first; empty when it was not benchmarked."""
    rows = _evidence().get("methods", {}).get(method, {}).get("rows", [])
    return sorted((Measured(**row) for row in rows), key=lambda row: row.labeled)


def relative_time(method: str) -> float | None:
    """Seconds per training iteration relative to supervised-only (same network, patch and batch)."""
    return _evidence().get("methods", {}).get(method, {}).get("relative_time")


def describe(method: str) -> str:
    """One line: Dice per labeled count with the difference to supervised-only, and the relative time."""
    parts = []
    for row in measured(method):
        text = f"{row.labeled} labeled: Dice {row.dice:.3f} ± {row.dice_sd:.3f} ({row.seeds} seeds)"
        if row.delta is not None and row.p_value is not None:
            text += f", {row.delta:+.3f} vs supervised (p={row.p_value:.2g})"
        parts.append(text)
    time = relative_time(method)
    if time is not None:
        parts.append(f"{time:.1f}x supervised's time per iteration")
    return "; ".join(parts) if parts else "not benchmarked yet"
