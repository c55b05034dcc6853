"""CPU benchmark on the MSD hippocampus data: methods compared at a fixed seeded split and budget.

Split: 200 labeled cases -> 40 validation + 160 train (seeded); of the train part a fraction is
labeled and the rest is used unlabeled (its labels ignored). Every run trains for the same number of
iterations, then its last checkpoint is evaluated on the 40 validation cases on their own grids
(Dice, Jaccard, HD95, ASD in mm, medpy semantics). Each run is a child process so that its peak
memory is its own. Results are appended to benchmarks/results/hippocampus_cpu.json (a list of runs;
a run with the same method, network, labeled fraction, seed and variant replaces the old one) and rendered
to hippocampus_cpu.md and hippocampus_cpu_curves.png.

  python benchmarks/hippocampus_cpu.py --runs supervised:0.1 mean-teacher:0.1 cps:0.1 supervised:1.0

Seeded comparisons give the labeled budget as a count of cases: `--runs cps:n4 supervised:n16 --seeds 0 1 2`.
The 40 validation cases stay the same for every seed (the seed-0 draw, as in the fraction rows), and the
seed draws both which training cases are labeled and the training randomness, so a row's spread covers
the choice of labeled scans too. These runs record each validation case's Dice, so the rendered
comparison table pairs every method with supervised-only over the same cases (Wilcoxon signed-rank of the
seed-averaged per-case Dice) and gives the share of the supervised(n) -> supervised(all) gap it closes.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data" / "hippocampus"
EVIDENCE_THROUGHPUT_TABLE = "hippocampus-1-thread"  # throughput.py --table whose rows give the relative times
EVIDENCE = ROOT / "src" / "semiseg" / "data" / "method_evidence.json"  # package data read by semiseg.methods.evidence
TRAINING_CASES = 160  # of the 200, after the 40 validation cases
COMPARED_ITERATIONS = 1000  # the budget every method ran at; the recommended method is chosen there
NOTES_MARKER = "<!-- notes: text below this line is kept when the table is rendered again -->"


def run_one(spec: dict, queue) -> None:
    import torch

    from semiseg.datasets import load_dataset
    from semiseg.inference import predict_volume
    from semiseg.metrics import case_metrics
    from semiseg.models import load_model
    from semiseg.preprocessing import read_case
    from semiseg.training import TrainConfig, train

    torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "run"
        labeled, validation = "100%" if spec["labeled"] >= 1 else f"{spec['labeled'] * 100:g}%", "40"
        if spec.get("labeled_count"):
            labeled, validation = seeded_split(spec["labeled_count"], spec["seed"])
        config = TrainConfig(
            data=str(DATA), output=str(out), method=spec["method"], network=spec["network"],
            network_options=spec["network_options"], method_options=spec["options"], labeled=labeled,
            validation=validation, iterations=spec["iterations"], validate_every=spec["validate_every"],
            seed=spec["seed"], device="cpu", workers=spec["workers"], lr=spec["lr"], optimizer=spec["optimizer"],
        )
        events: list[dict] = []
        started = time.perf_counter()
        train(config, events.append)
        train_seconds = time.perf_counter() - started
        model = load_model(out / "last")
        dataset = {c.case_id: c for c in load_dataset(DATA).cases}
        classes = [c for c in sorted(model.plan.class_names) if c != 0]
        rows, infer_seconds = [], 0.0
        validation_ids = model.record.split.validation
        for case_id in validation_ids:
            image, label = read_case(dataset[case_id])
            tick = time.perf_counter()
            prediction = predict_volume(image, model.plan, model.predictors(), torch.device("cpu"), model.overlap)
            infer_seconds += time.perf_counter() - tick
            metrics = case_metrics(prediction.labels.array, label.array, classes, label.geometry.spacing_zyx)
            rows.append(metrics)
    curve = [(e["iteration"], e["dice_mean"]) for e in events if e["type"] == "validation"]
    iterations = [e for e in events if e["type"] == "iteration"]
    result = {
        "method": spec["method"], "variant": spec["variant"], "labeled": spec["labeled"], "seed": spec["seed"],
        "iterations": spec["iterations"], "threads": spec["threads"], "network": spec["network"], "network_options": spec["network_options"],
        "options": spec["options"], "optimizer": spec["optimizer"], "lr": spec["lr"],
        "labeled_cases": len(model.record.split.labeled), "unlabeled_cases": len(model.record.split.unlabeled),
        "validation_cases": len(rows),
        "parameters": int(sum(p.numel() for p in model.method.networks.parameters())),
        "sec_per_iter": iterations[-1]["sec_per_iter"], "train_seconds": train_seconds,
        "peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "infer_sec_per_volume": infer_seconds / len(rows), "curve": curve,
    }
    if spec.get("labeled_count"):
        result["labeled_count"] = spec["labeled_count"]
        result["per_case_dice"] = {case_id: [r[c]["dice"] for c in classes] for case_id, r in zip(validation_ids, rows)}
    names = model.plan.class_names
    for metric in ("dice", "jaccard", "hd95", "asd"):
        values = np.array([[r[c][metric] for c in classes] for r in rows], dtype=float)
        result[f"{metric}_mean"] = float(np.nanmean(values))
        result[f"{metric}_sd"] = float(np.nanstd(np.nanmean(values, axis=1)))
        result[f"{metric}_per_class"] = {names[c]: [float(np.nanmean(values[:, i])), float(np.nanstd(values[:, i]))] for i, c in enumerate(classes)}
    queue.put(result)


def labeled_text(run: dict) -> str:
    return f"{run['labeled_count']} cases" if run.get("labeled_count") else f"{run['labeled'] * 100:g}%"


def run_identity(run: dict) -> tuple:
    """A new result replaces an old one with the same identity; fraction rows and count rows never collide."""
    return (run["method"], run["network"], run["labeled"], run["seed"], run["variant"], run.get("labeled_count"),
            run["iterations"] if run.get("labeled_count") else None)


def seeded_split(count: int, seed: int) -> tuple[list[str], list[str]]:
    """A seeded comparison's cases: `count` labeled cases drawn by `seed` from the 160 training cases (every
    one when count reaches them all), and the fixed seed-0 validation cases; the rest train unlabeled."""
    import random

    from semiseg.datasets import choose_split, load_dataset

    fixed = choose_split(load_dataset(DATA), "100%", "40", 0)
    pool = sorted(fixed.labeled)
    random.Random(seed).shuffle(pool)
    if count > len(pool):
        raise SystemExit(f"n{count}: only {len(pool)} training cases")
    return sorted(pool[:count]), fixed.validation


def render(runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "# Hippocampus (MSD Task04) on CPU",
        "",
        "Fixed seeded split: 40 validation cases, 160 training cases of which the stated fraction is labeled and the",
        "rest unlabeled. Metrics on the 40 validation cases, on their own grids, last checkpoint, no post-processing:",
        "mean ± sd over cases (sd of the per-case class mean); HD95/ASD in mm. Reproduce with",
        "`python benchmarks/hippocampus_cpu.py` (see its docstring).",
        "",
        "| method | network | params | labeled | seed | iterations | Dice | Dice anterior | Dice posterior | Jaccard | HD95 (mm) | ASD (mm) | s/iter (threads) | peak MB | infer s/vol |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (r["labeled"], r["method"], r["variant"], r["seed"])):
        network = r["network"] + "".join(f" {k}={v}" for k, v in r["network_options"].items())
        per_class = list(r["dice_per_class"].values())
        name = r["method"] + (f" ({r['variant']})" if r["variant"] else "")
        lines.append(
            f"| {name} | {network} | {r['parameters'] / 1e6:.2f} M | {labeled_text(r)} | {r['seed']} | {r['iterations']} | {r['dice_mean']:.4f} ± {r['dice_sd']:.4f} | "
            f"{per_class[0][0]:.4f} | {per_class[1][0]:.4f} | {r['jaccard_mean']:.4f} ± {r['jaccard_sd']:.4f} | "
            f"{r['hd95_mean']:.2f} ± {r['hd95_sd']:.2f} | {r['asd_mean']:.2f} ± {r['asd_sd']:.2f} | "
            f"{r['sec_per_iter']:.3f} ({r.get('threads', 2)}) | {r['peak_mem_mb']:.0f} | {r['infer_sec_per_volume']:.3f} |"
        )
    lines += comparison_lines(runs)
    lines += budget_lines(runs)
    lines += equal_time_lines(runs)
    machines = sorted({r["machine"] for r in runs if r.get("machine")})
    lines += ["", "s/iter is the mean wall time per training iteration; runs that shared the CPU with other work are slower.",
              "", "Machine: " + "; ".join(machines), "", "![validation Dice vs iteration](hippocampus_cpu_curves.png)", "",
              "![validation Dice vs labeled fraction](hippocampus_cpu_fraction.png)", ""]
    page = RESULTS / "hippocampus_cpu.md"
    notes = page.read_text().partition(NOTES_MARKER)[2] if page.exists() else ""
    page.write_text("\n".join(lines) + "\n" + NOTES_MARKER + (notes or "\n"))
    figure, axis = plt.subplots(figsize=(8, 5))
    # ablation and seeded-comparison curves stay in the JSON: too many lines
    shown = [r for r in runs if r["curve"] and not r["variant"] and not r.get("labeled_count")]
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(shown), 1)))
    for index, r in enumerate(sorted(shown, key=lambda r: (r["labeled"], r["method"], r["network"], r["seed"]))):
        x, y = zip(*r["curve"])
        label = f"{r['method']} ({r['network']}) {r['labeled'] * 100:g}% s{r['seed']}"
        axis.plot(x, y, marker="o", markersize=3, color=colours[index], linestyle=("-", "--", ":")[index % 3], label=label)
    axis.set_xlabel("iteration")
    _finish_plot(figure, axis, "Hippocampus, CPU: validation Dice during training", "hippocampus_cpu_curves.png")
    plot_dice_vs_fraction(runs, plt)
    plot_dice_vs_count(runs, plt)
    write_method_evidence(runs)


def comparison_groups(runs: list[dict]) -> dict[tuple, list[dict]]:
    """Seeded count runs grouped by (network, iterations, labeled count, method, variant)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r.get("labeled_count"):
            key = (r["network"], r["iterations"], r["labeled_count"], r["method"], r["variant"])
            groups.setdefault(key, []).append(r)
    return groups


def seed_averaged_case_dice(group: list[dict], seeds: set[int]) -> dict[str, float]:
    """Each validation case's Dice (mean over classes), averaged over the given seeds."""
    chosen = [r for r in group if r["seed"] in seeds]
    return {case: float(np.mean([np.nanmean(r["per_case_dice"][case]) for r in chosen])) for case in chosen[0]["per_case_dice"]}


def paired_with_supervised(groups: dict[tuple, list[dict]], key: tuple, supervised_iterations: int | None = None) -> dict | None:
    """Against supervised-only with the same labeled count and network, trained for the same budget (or for
    `supervised_iterations`), over the seeds both have: Δ of the seed-averaged per-case Dice, Wilcoxon signed-rank
    p over the cases, cases better, and the share of the gap to supervised with every training case labeled that
    Δ closes (None without a ceiling)."""
    network, iterations, count, method, variant = key
    reference = groups.get((network, supervised_iterations or iterations, count, "supervised", ""))
    if not reference or (method, variant) == ("supervised", ""):
        return None
    paired = paired_difference(groups[key], reference)
    if not paired:
        return None
    ceiling = groups.get((network, iterations, TRAINING_CASES, "supervised", ""))
    gap = None
    if ceiling:
        shared = set(paired["shared_seeds"])
        gap = np.mean([r["dice_mean"] for r in ceiling]) - np.mean([r["dice_mean"] for r in reference if r["seed"] in shared])
    return {**paired, "gap_closed": float(paired["delta"] / gap) if gap and gap > 0 else None}


def seed_count(count: int) -> str:
    return f"{count} seed" + ("s" if count != 1 else "")


def paired_difference(ours: list[dict], reference: list[dict]) -> dict | None:
    """Two groups of seeded runs over the seeds both have: Δ of the seed-averaged per-case Dice, Wilcoxon
    signed-rank p over the cases and cases better; None when they share no seed."""
    from scipy.stats import wilcoxon

    shared = {r["seed"] for r in ours} & {r["seed"] for r in reference}
    if not shared:
        return None
    mine, theirs = seed_averaged_case_dice(ours, shared), seed_averaged_case_dice(reference, shared)
    difference = np.array([mine[c] - theirs[c] for c in sorted(mine)])
    return {"seeds": len(shared), "shared_seeds": sorted(shared), "delta": float(difference.mean()),
            "p_value": float(wilcoxon(difference).pvalue) if np.any(difference) else 1.0,
            "better_cases": f"{int((difference > 0).sum())}/{len(difference)}"}


def comparison_lines(runs: list[dict]) -> list[str]:
    """The seeded comparison table: mean ± sd over seeds, and the paired comparison with supervised-only."""
    groups = comparison_groups(runs)
    if not groups:
        return []
    lines = ["", "## Seeded comparison (labeled count, several seeds)", "",
             "Same 40 validation cases for every seed; the seed draws the labeled cases and the training randomness.",
             "Dice: mean ± sd over seeds of the validation mean. Δ: against supervised-only with the same labeled count,",
             "network and iterations, over the seeds both have; p: Wilcoxon signed-rank test over the 40 cases' seed-averaged",
             "Dice; better: cases where the method's seed-averaged Dice is higher; gap closed: Δ / (supervised with all 160",
             "labeled - supervised with n). Time: mean training wall-clock (runs shared the 2 cores, one thread each).", "",
             "| labeled | method | network | iterations | seeds | Dice | Δ vs supervised | p | better | gap closed | train min |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3] != "supervised", k[3], k[4])):
        network, iterations, count, method, variant = key
        group = groups[key]
        dice = [r["dice_mean"] for r in group]
        cells = ["", "", "", ""]
        paired = paired_with_supervised(groups, key)
        if paired:
            cells = [f"{paired['delta']:+.4f} ({seed_count(paired['seeds'])})", f"{paired['p_value']:.3g}", paired["better_cases"],
                     f"{paired['gap_closed']:.0%}" if paired["gap_closed"] is not None else ""]
        name = method + (f" ({variant})" if variant else "")
        lines.append(f"| {count} | {name} | {network} | {iterations} | {len(group)} | {np.mean(dice):.4f}{f' ± {np.std(dice):.4f}' if len(group) > 1 else ''} | "
                     + " | ".join(cells) + f" | {np.mean([r['train_seconds'] for r in group]) / 60:.1f} |")
    return lines + ["", "![Dice vs labeled count](hippocampus_cpu_counts.png)"]


def budget_lines(runs: list[dict], base: int = 1000) -> list[str]:
    """Each VNet method (no variant) run at more than one budget: Dice per budget, and each longer budget against
    the same method at `base` iterations, paired over the cases as in the seeded comparison."""
    groups = comparison_groups(runs)
    budgets = sorted({k[1] for k in groups if k[0] == "vnet" and not k[4]})
    lines = []
    for count, method in sorted({(k[2], k[3]) for k in groups if k[0] == "vnet" and not k[4]}, key=lambda c: (c[0], c[1] != "supervised", c[1])):
        runs_at = {b: groups[("vnet", b, count, method, "")] for b in budgets if ("vnet", b, count, method, "") in groups}
        if len(runs_at) < 2 or base not in runs_at:
            continue
        dice = [f"{np.mean([r['dice_mean'] for r in runs_at[b]]):.4f} ({len(runs_at[b])})" if b in runs_at else "" for b in budgets]
        longer = []
        for b in budgets:
            paired = paired_difference(runs_at[b], runs_at[base]) if b in runs_at and b != base else None
            if paired:
                longer.append(f"{b}: {paired['delta']:+.4f}, p {paired['p_value']:.2g}, {paired['better_cases']} ({seed_count(paired['seeds'])})")
        lines.append(f"| {count} | {method} | " + " | ".join(dice) + " | " + "; ".join(longer) + " |")
    if not lines:
        return []
    return ["", "## Training budget (the same method trained longer)", "",
            f"VNet base 8, default options. Dice: mean over seeds (seed count in brackets). Longer vs {base}: the same method",
            f"at each longer budget against itself at {base} iterations, paired over the 40 validation cases as above",
            "(Δ of the seed-averaged per-case Dice, Wilcoxon p, cases better, over the seeds both have).", "",
            "| labeled | method | " + " | ".join(f"{b} it" for b in budgets) + f" | longer vs {base} |",
            "|---|---|" + "---|" * len(budgets) + "---|", *lines]


def relative_times() -> dict[str, float]:
    """Each method's median seconds per iteration over supervised-only's, from throughput.py's one-thread
    hippocampus table (measured with nothing else running; supervised-only on the VNet base 8, every other method
    on its default network)."""
    throughput = ROOT / "benchmarks" / "results" / "throughput.json"
    table = json.loads(throughput.read_text())["tables"].get(EVIDENCE_THROUGHPUT_TABLE) if throughput.exists() else None
    seconds: dict[str, list[float]] = {}
    for run in table["runs"] if table else []:
        if run.get("dataset") == "hippocampus" and run.get("sec_per_iter"):
            seconds.setdefault(run["method"], []).append(run["sec_per_iter"])
    if "supervised" not in seconds:
        return {}
    reference = float(np.median(seconds["supervised"]))
    return {method: float(np.median(values)) / reference for method, values in seconds.items()}


def equal_time_budgets(groups: dict[tuple, list[dict]], key: tuple, times: dict[str, float]) -> tuple[int, int | None] | None:
    """For a VNet method's runs: the supervised budget that matches their training time (the method's relative
    time per iteration x its iterations) and supervised-only's best budget (mean Dice) among those run up to the
    smallest one at or above it: supervised may peak before the time runs out, and a user given that time would
    stop there (None: no budget that long was run yet). None for supervised itself and for methods on other
    networks: their supervised pair's time per iteration is not in the throughput table."""
    network, iterations, count, method, variant = key
    if variant or method == "supervised" or network != "vnet" or count >= TRAINING_CASES or method not in times:
        return None
    needed = math.ceil(times[method] * iterations)
    supervised = {k[1]: np.mean([r["dice_mean"] for r in group]) for k, group in groups.items()
                  if k[0] == network and k[2] == count and k[3] == "supervised" and not k[4]}
    long_enough = sorted(budget for budget in supervised if budget >= needed)
    if not long_enough:
        return needed, None
    return needed, max((budget for budget in supervised if budget <= long_enough[0]), key=lambda budget: (supervised[budget], budget))


def equal_time_lines(runs: list[dict]) -> list[str]:
    """Each VNet method, at each budget it was run at, against supervised-only at its best budget within the same training time."""
    groups, times = comparison_groups(runs), relative_times()
    lines = []
    for key in sorted(groups, key=lambda k: (k[1], k[2], k[3])):
        budgets = equal_time_budgets(groups, key, times)
        if budgets is None:
            continue
        (network, iterations, count, method, _), (needed, budget) = key, budgets
        paired = paired_with_supervised(groups, key, budget) if budget else None
        dice = np.mean([r["dice_mean"] for r in groups[key]])
        if paired:
            reference = groups[(network, budget, count, "supervised", "")]
            supervised = np.mean([r["dice_mean"] for r in reference if r["seed"] in {g["seed"] for g in groups[key]}])
            cells = [str(budget), f"{supervised:.4f}", f"{paired['delta']:+.4f} ({seed_count(paired['seeds'])})", f"{paired['p_value']:.3g}",
                     paired["better_cases"]]
        else:
            cells = [f"≥ {needed}: not run yet", "", "", "", ""]
        lines.append(f"| {count} | {method} | {iterations} | {times[method]:.1f}x | {dice:.4f} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    return ["", "## Against supervised-only given the same time (equal wall-clock)", "",
            "Each method against supervised-only on the same network and labeled count given the method's training",
            "time: the method's time per iteration relative to supervised-only (throughput.md,",
            f"`{EVIDENCE_THROUGHPUT_TABLE}`, one thread, nothing else running) times its iterations, rounded up to a",
            "supervised budget that was run; supervised-only at its best budget (mean Dice) up to that one, since it may",
            "peak earlier. Δ and p as above, over the seeds both have.", "",
            "| labeled | method | iterations | time/iter vs supervised | Dice | supervised iterations | supervised Dice | Δ vs supervised | p | better |",
            "|---|---|---|---|---|---|---|---|---|---|", *lines]


def write_method_evidence(runs: list[dict], target: Path = EVIDENCE, iterations: int = COMPARED_ITERATIONS) -> None:
    """semiseg/data/method_evidence.json: what `semiseg methods` and the Train widget show per method, from the
    seeded comparison, each method on the network it trains on by default (its paper's), with its pair trained as
    long as it where that was run, and from throughput.py's one-thread hippocampus table. `iterations` is the budget
    every method was compared at (the recommended method is chosen there); rows at longer budgets come along."""
    from semiseg.methods import method_class

    groups, times = comparison_groups(runs), relative_times()
    methods: dict[str, dict] = {}
    for key, group in sorted(groups.items()):
        if key[0] != method_class(key[3]).paper_network or key[4] or key[2] >= TRAINING_CASES:
            continue
        dice = [r["dice_mean"] for r in group]
        row = {"labeled": key[2], "iterations": key[1], "seeds": len(group), "dice": float(np.mean(dice)), "dice_sd": float(np.std(dice)),
               "network": key[0]}
        if group[0].get("options"):  # not the defaults a user gets: say so
            row["options"] = group[0]["options"]
        paired = paired_with_supervised(groups, key)
        if paired:
            row.update({k: paired[k] for k in ("delta", "p_value", "better_cases")})
        budgets = equal_time_budgets(groups, key, times)
        paired = paired_with_supervised(groups, key, budgets[1]) if budgets and budgets[1] else None
        if paired:
            row["equal_time"] = {"supervised_iterations": budgets[1], **{k: paired[k] for k in ("seeds", "delta", "p_value", "better_cases")}}
        methods.setdefault(key[3], {"rows": []})["rows"].append(row)
    for method, ratio in times.items():
        if method in methods:
            methods[method]["relative_time"] = ratio
    setting = (f"hippocampus benchmark (benchmarks/results/hippocampus_cpu.md): each method on its default network (vnet unless "
               f"said), base 8, {iterations} iterations unless said, 40 validation cases, labeled cases drawn per seed, the other "
               "training cases unlabeled; differences against supervised-only on the same network and budget")
    target.write_text(json.dumps({"setting": setting, "iterations": iterations, "methods": methods}, indent=1) + "\n")


def count_plot_panels(lines: dict[tuple, dict]) -> list[tuple[str, dict[tuple, dict]]]:
    """The Dice-vs-count plot's two panels from its lines keyed (method, network, iterations): every method at the
    compared budget, then every budget of the methods that ran at more than one."""
    budgets: dict[tuple, set[int]] = {}
    for method, network, iterations in lines:
        budgets.setdefault((method, network), set()).add(iterations)
    return [(f"every method, {COMPARED_ITERATIONS} iterations", {key: points for key, points in lines.items() if key[2] == COMPARED_ITERATIONS}),
            ("training budget", {key: points for key, points in lines.items() if len(budgets[key[:2]]) > 1})]


def plot_dice_vs_count(runs: list[dict], plt) -> None:
    """Mean Dice over seeds against the labeled count, seeds' sd as error bars. Left: every method at the budget all
    were compared at, one line per method and network; right: the methods run at several budgets, one line per
    method and budget. One figure with every line was unreadable."""
    lines: dict[tuple, dict[int, list[float]]] = {}
    for (network, iterations, count, method, variant), group in comparison_groups(runs).items():
        if not variant:
            lines.setdefault((method, network, iterations), {})[count] = [r["dice_mean"] for r in group]
    if not lines:
        return
    # One colour per method and network in both panels; supervised-only, the reference, black on the VNet, and on
    # another network the colour of the method that trains on it, with square markers (grey is left out of the
    # palette: it read as a supervised line).
    pairs = sorted({(method, network) for method, network, _ in lines if method != "supervised"})
    palette = [colour for index, colour in enumerate(plt.get_cmap("tab10").colors) if index != 7]
    colours = dict(zip(pairs, palette if len(pairs) <= len(palette) else plt.get_cmap("tab20").colors))
    for network in {network for method, network, _ in lines if method == "supervised"}:
        colours[("supervised", network)] = "black" if network == "vnet" else next(
            (colour for (method, on), colour in colours.items() if on == network and method != "supervised"), "grey")
    budgets = sorted({iterations for _, _, iterations in lines})
    # one line style and marker per budget, for up to seven budgets (six are measured)
    styles = dict(zip(budgets, ("-", "--", ":", "-.", (0, (6, 2)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)))))
    markers = dict(zip(budgets, "os^vDPX"))
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for axis, (title, shown) in zip(axes, count_plot_panels(lines)):
        for index, ((method, network, iterations), points) in enumerate(sorted(shown.items())):
            counts = sorted(points)
            nudge = 1 + 0.015 * (index - len(shown) / 2)  # lines nudged sideways so error bars stay apart
            x, y = [c * nudge for c in counts], [np.mean(points[c]) for c in counts]
            marker, colour = markers.get(iterations, "o"), colours[(method, network)]
            if method == "supervised" and network != "vnet":
                marker = "s"
            axis.errorbar(x, y, yerr=[np.std(points[c]) for c in counts], marker=marker, markersize=5, capsize=3, color=colour,
                          linestyle=styles.get(iterations, "-"), label=f"{method} ({network}, {iterations} it)")
            few = [i for i, c in enumerate(counts) if len(points[c]) < 3]  # hollow: a trial, not a comparison
            axis.plot([x[i] for i in few], [y[i] for i in few], linestyle="none", marker=marker, markersize=5,
                      markerfacecolor="white", markeredgecolor=colour, zorder=3)
        axis.set_xscale("log")
        ticks = sorted({c for points in shown.values() for c in points})
        axis.minorticks_off()  # a log axis would label minor ticks like 6x10^0
        axis.set_xticks(ticks, [str(c) for c in ticks])
        axis.set_xlabel("labeled training cases (of 160; the rest unlabeled)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    axes[0].set_ylabel("validation Dice (mean over classes)")
    figure.suptitle("Hippocampus, CPU: Dice vs labeled count (mean ± sd over 3 seeds; hollow marker: fewer seeds)")
    figure.tight_layout()
    figure.savefig(RESULTS / "hippocampus_cpu_counts.png", dpi=110)
    plt.close(figure)


def _finish_plot(figure, axis, title: str, file_name: str) -> None:
    axis.set_ylabel("validation Dice (mean over classes)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(RESULTS / file_name, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)  # rendered after every run: keep no figure open


def plot_dice_vs_fraction(runs: list[dict], plt) -> None:
    """Mean Dice against the labeled fraction, one line per method and network (ablation variants left out);
    with several seeds, the mean and the seeds' sd as error bars."""
    by_method: dict[tuple[str, str], dict[float, list[float]]] = {}
    for r in runs:
        if not r["variant"] and not r.get("labeled_count"):
            by_method.setdefault((r["method"], r["network"]), {}).setdefault(r["labeled"], []).append(r["dice_mean"])
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for (method, network), points in sorted(by_method.items()):
        fractions = sorted(points)
        means = [float(np.mean(points[f])) for f in fractions]
        spreads = [float(np.std(points[f])) for f in fractions]
        axis.errorbar([100 * f for f in fractions], means, yerr=spreads, marker="o", markersize=4, capsize=3, label=f"{method} ({network})")
    axis.set_xscale("log")
    axis.set_xticks([10, 20, 100], ["10%", "20%", "100%"])
    axis.set_xlabel("labeled fraction of the 160 training cases")
    _finish_plot(figure, axis, "Hippocampus, CPU: Dice vs labeled fraction (1000 iterations)", "hippocampus_cpu_fraction.png")


def parse_method_options(texts: list[str], runs: list[str]) -> dict[str, dict]:
    """OWNER.KEY=JSON options by owner (METHOD or METHOD:VARIANT). Option keys have no dots, variant
    names may ("weight-0.1"), so the key is what follows the last dot. An owner that names none of
    the runs is an error: its options would silently apply to nothing."""
    owners = {part for run in runs for part in (run.split(":")[0], ":".join(run.split(":")[::2]))}
    options: dict[str, dict] = {}
    for text in texts:
        target, value = text.split("=", 1)
        owner, key = target.rsplit(".", 1)
        if owner not in owners:
            raise SystemExit(f"--option {text}: '{owner}' is none of the runs' methods or METHOD:VARIANT names ({', '.join(sorted(owners))})")
        options.setdefault(owner, {})[key] = json.loads(value)
    return options


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["supervised:0.1", "mean-teacher:0.1", "cps:0.1", "supervised:1.0"],
                        help="METHOD:LABELED_FRACTION[:VARIANT] or METHOD:nCOUNT[:VARIANT] (a seeded comparison), VARIANT naming a set of --option values")
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--validate-every", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--network", default="vnet")
    parser.add_argument("--network-option", action="append", default=["base_filters=8"], help="KEY=VALUE (int)")
    parser.add_argument("--option", action="append", default=[], help="METHOD.KEY=JSON method option")
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    results_path = RESULTS / "hippocampus_cpu.json"
    runs = json.loads(results_path.read_text()) if results_path.exists() else []
    if not args.render_only:
        import platform
        import os

        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        network_options = {k: int(v) for k, v in (o.split("=", 1) for o in args.network_option)}
        method_options = parse_method_options(args.option, args.runs)
        for seed in args.seeds:
            for run in args.runs:
                method, budget, *variant = run.split(":")
                count = int(budget[1:]) if budget.startswith("n") else None
                options = {**method_options.get(method, {}), **(method_options.get(f"{method}:{variant[0]}", {}) if variant else {})}
                spec = {"method": method, "labeled": count / TRAINING_CASES if count else float(budget), "labeled_count": count,
                        "variant": variant[0] if variant else "", "seed": seed,
                        "iterations": args.iterations, "validate_every": args.validate_every, "network": args.network,
                        "network_options": network_options, "options": options, "optimizer": args.optimizer, "lr": args.lr,
                        "workers": args.workers, "threads": args.threads}
                context = multiprocessing.get_context("spawn")
                queue = context.Queue()
                child = context.Process(target=run_one, args=(spec, queue))
                child.start()
                result = queue.get()
                child.join()
                result["machine"] = machine
                print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
                runs = json.loads(results_path.read_text()) if results_path.exists() else []  # re-read: other runs may have finished meanwhile
                runs = [r for r in runs if run_identity(r) != run_identity(result)] + [result]
                results_path.write_text(json.dumps(runs, indent=1))
                render(runs)
    render(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
