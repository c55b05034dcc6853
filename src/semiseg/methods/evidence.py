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
    iterations: int = 1000  # the training budget of these runs (and of their supervised-only pair)
    delta: float | None = None  # mean per-case Dice minus supervised-only's, over the seeds both have
    p_value: float | None = None  # Wilcoxon signed-rank over the validation cases
    better_cases: str | None = None  # e.g. "31/40"
    network: str = "vnet"  # the method's default network, on which it and its supervised-only pair ran
    options: dict | None = None  # method options the runs changed from the defaults (a smaller model, say); None: defaults
    # Against supervised-only trained at least as long in wall-clock (more iterations): supervised_iterations,
    # seeds, delta, p_value, better_cases; None where that supervised budget was not run.
    equal_time: dict | None = None


@lru_cache(maxsize=1)
def _evidence() -> dict:
    try:
        return json.loads(resources.files("semiseg.data").joinpath("method_evidence.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def benchmark_note() -> str:
    """Where the numbers come from, in one line."""
    return _evidence().get("setting", "")


def compared_budget() -> int:
    """The iteration budget every method was compared at; rows at other budgets are the budget study."""
    return _evidence().get("iterations", 1000)


def measured(method: str, iterations: int | None = None) -> list[Measured]:
    """The method's rows (only those at `iterations`, if given), fewest labels then shortest budget first; empty
    when it was not benchmarked."""
    rows = (Measured(**row) for row in _evidence().get("methods", {}).get(method, {}).get("rows", []))
    return sorted((row for row in rows if iterations in (None, row.iterations)), key=lambda row: (row.labeled, row.iterations))


def relative_time(method: str) -> float | None:
    """Seconds per training iteration relative to supervised-only, same patch and batch, each method on its default
    network (dk-uxnet's UX-Net, 3d-cps's residual U-Net, the VNet for the others) and options."""
    return _evidence().get("methods", {}).get(method, {}).get("relative_time")


# What "beats supervised-only" takes: a paired p-value below this, over at least this many seeds.
SIGNIFICANCE = 0.05
MIN_SEEDS = 3


def _beats(seeds: int, delta: float | None, p_value: float | None) -> bool:
    """Higher mean per-case Dice than supervised-only, p < SIGNIFICANCE, over MIN_SEEDS seeds or more."""
    return seeds >= MIN_SEEDS and delta is not None and delta > 0 and p_value is not None and p_value < SIGNIFICANCE


def recommended_method() -> str:
    """The default method, chosen by the evidence at the budget every method was compared at: at the scarcest
    labeled count measured for supervised-only, the method with the best mean Dice among those that beat
    supervised-only there (higher mean per-case Dice, p < SIGNIFICANCE, MIN_SEEDS seeds or more, at the method's
    default options) and, where supervised-only was also given the method's training time (over MIN_SEEDS
    seeds), beat that too; supervised-only when none does."""
    methods, budget = _evidence().get("methods", {}), compared_budget()
    scarce = min((row.labeled for row in measured("supervised", budget)), default=None)
    best, best_dice = "supervised", -1.0
    for name in methods:
        for row in measured(name, budget):
            significant = (row.labeled == scarce and not row.options and _beats(row.seeds, row.delta, row.p_value)
                           and (row.equal_time is None or row.equal_time["seeds"] < MIN_SEEDS or _beats(**{k: row.equal_time[k] for k in ("seeds", "delta", "p_value")})))
            if significant and row.dice > best_dice:
                best, best_dice = name, row.dice
    return best


def setting(row: Measured, budget: bool = True) -> str:
    """What a row was measured at beyond its labeled count: another budget (unless `budget` is False, for a table
    with its own budget column), network or options ('' for none)."""
    on = "" if row.iterations == compared_budget() or not budget else f" at {row.iterations} iterations"
    on += "" if row.network == "vnet" else f" on {row.network}"
    if row.options:
        on += " with " + ", ".join(f"{key}={value}" for key, value in row.options.items())
    return on


def spread(row: Measured, space: str = " ") -> str:
    """'± sd ' over the seeds, '' for one seed (which has no spread to show); `space` separates the parts."""
    return f"±{space}{row.dice_sd:.3f}{space}" if row.seeds > 1 else ""


def describe(method: str) -> str:
    """One line per measurement: Dice with the difference to supervised-only; then the relative time."""
    parts = []
    for row in measured(method):
        on = setting(row)
        text = f"{row.labeled} labeled{on}: Dice {row.dice:.3f} {spread(row)}({row.seeds} seed{'s' if row.seeds > 1 else ''})"
        if row.delta is not None and row.p_value is not None:
            text += f", {row.delta:+.3f} vs supervised (p={row.p_value:.2g})"
        if row.equal_time:
            text += (f", {row.equal_time['delta']:+.3f} vs supervised given its time "
                     f"({row.equal_time['supervised_iterations']} iterations, p={row.equal_time['p_value']:.2g})")
        parts.append(text)
    time = relative_time(method)
    if time is not None:
        parts.append(f"{time:.1f}x supervised's time per iteration")
    return "\n".join(parts) if parts else "not benchmarked yet"


def overview() -> list[tuple[str, str, str]]:
    """(method, Dice per labeled count with the difference to supervised-only, relative time) for every
    benchmarked method at the compared budget: the trade-off at one glance. The methods measured at the fewest
    labels come first, best Dice first among them (Dice at different labeled counts do not rank methods)."""
    rows = []
    for method in _evidence().get("methods", {}):
        measured_rows = measured(method, compared_budget())
        if not measured_rows:
            continue
        dice = ", ".join(f"{row.dice:.3f}" + (f" ({row.delta:+.3f})" if row.delta is not None else "") + f" @{row.labeled}"
                         for row in measured_rows)
        time = relative_time(method)
        rows.append(((measured_rows[0].labeled, -measured_rows[0].dice), method, dice, "" if time is None else f"{time:.1f}x"))
    return [(method, dice, time) for _, method, dice, time in sorted(rows, key=lambda row: row[0])]

