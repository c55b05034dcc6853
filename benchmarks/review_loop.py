"""The review loop, simulated (issue #18 part 2): does the model get better round after round?

Start: the supervised base model of finetune_recipes.py (N labeled cases of hippocampus_cpu.py's seeded
split). Each round picks one scan from a pool of the split's unlabeled training scans, "corrects" it with
its ground truth, fine-tunes the current model on it (`semiseg.finetuning`, engine path) and scores the
result on the 40 validation cases. Compared: picking the most uncertain scan as the review queue ranks
them (`Prediction.uncertainty_score`, predicted with the current model) vs a seeded random pick, and the
fine-tuning of before issue #18 ("today": the correction alone, 50 iterations, lr 0.01) vs the measured
recipe (FineTuneRequest's defaults: the model's own labeled cases, earlier corrections included, replayed).
`--retrain-at K` adds the upper bound: supervised training from scratch on the labeled cases plus the first K
rounds' corrections, at the base model's budget, with its wall-clock time. "guarded" is the new recipe with the
plugin's before/after check (`compare_before_after`) on 4 labeled scans outside the pool and the validation cases:
a round whose model scores worse there keeps the model from before, as the Fine-tune widget does.

Results: benchmarks/results/review_loop.json (rows replaced by strategy, recipe, labeled count and seed),
review_loop.md and review_loop.png (validation Dice vs round, one line per strategy and recipe; error bars
over seeds when there are several).

  python benchmarks/review_loop.py --labeled 4 --seeds 0 --rounds 4 --pool 40
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_recipes import BASE_SETTINGS, CANDIDATES, WORK, base_model, unlabeled_folder, validation_pairs  # noqa: E402
from hippocampus_cpu import DATA, RESULTS, seeded_split  # noqa: E402

NOTES_MARKER = "<!-- notes: text below this line is kept when the table is rendered again -->"
RECIPES = {"today": CANDIDATES["today"], "new": {}, "guarded": {}}  # {}: FineTuneRequest's defaults
GUARD_CASES = 4  # "guarded": the plugin's before/after check on this many labeled scans outside pool and validation
STRATEGIES = ("uncertainty", "random")


def pool_cases(count: int, seed: int, size: int, skip: int = 0) -> dict[str, tuple[str, str]]:
    """`size` unlabeled training cases (seeded), as (scan, label) files: the scans a reviewer could pick.
    `skip`: leave out the first that many of the seeded draw (the guard's cases are drawn after the pool)."""
    from semiseg.datasets import load_dataset

    labeled, validation = seeded_split(count, seed)
    cases = {c.case_id: c for c in load_dataset(DATA).labeled if c.case_id not in set(labeled) | set(validation)}
    chosen = sorted(cases)
    random.Random(2000 + seed).shuffle(chosen)
    return {i: (cases[i].image, cases[i].label) for i in sorted(chosen[skip:skip + size])}


def most_uncertain(checkpoint: Path, candidates: dict[str, tuple[str, str]]) -> str:
    """The scan the review queue would put first: the highest uncertainty score under the current model."""
    import torch

    from semiseg.inference import predict_volume
    from semiseg.io import read_volume
    from semiseg.models import load_model

    model = load_model(checkpoint)
    scores = {}
    with torch.no_grad():
        for case_id, (image, _) in candidates.items():
            prediction = predict_volume(read_volume(image), model.plan, model.predictors(), torch.device("cpu"), model.overlap)
            scores[case_id] = prediction.uncertainty_score()
    return max(scores, key=scores.get)


def one_loop(args: argparse.Namespace, seed: int, strategy: str, recipe: str) -> dict:
    from semiseg.finetuning import FineTuneRequest, case_dice, compare_before_after, finetune_config
    from semiseg.training import train

    base = base_model(args.labeled, seed, args.work)
    folder = unlabeled_folder(args.labeled, seed, args.work)
    validation = validation_pairs(args.labeled, seed)
    pool = pool_cases(args.labeled, seed, args.pool)
    guard = list(pool_cases(args.labeled, seed, GUARD_CASES, skip=args.pool).values()) if recipe == "guarded" else None
    picker = random.Random(3000 + seed)
    checkpoint, picked = base, []
    rounds = [{"round": 0, "dice": float(np.nanmean(case_dice(base, validation)))}]
    for number in range(1, args.rounds + 1):
        left = {i: pair for i, pair in pool.items() if i not in picked}
        tick = time.perf_counter()
        pick = most_uncertain(checkpoint, left) if strategy == "uncertainty" else picker.choice(sorted(left))
        pick_seconds = time.perf_counter() - tick
        picked.append(pick)
        out = args.work / "loop" / f"n{args.labeled}-s{seed}-{strategy}-{recipe}-r{number}"
        request = FineTuneRequest(checkpoint=str(checkpoint), folder=str(folder), output=str(out), corrections=[pool[pick]],
                                  device="cpu", seed=seed, overwrite=True, **RECIPES[recipe])
        tick = time.perf_counter()
        train(finetune_config(request))
        check = compare_before_after(checkpoint, out / "last", guard) if guard else None
        finetune_seconds = time.perf_counter() - tick
        kept = not (check and check.worse)  # the plugin keeps the model from before when the guard finds harm
        if kept:
            checkpoint = out / "last"
        dice = float(np.nanmean(case_dice(checkpoint, validation))) if kept else rounds[-1]["dice"]
        rounds.append({"round": number, "picked": pick, "dice": dice, "pick_seconds": pick_seconds, "finetune_seconds": finetune_seconds,
                       "kept": kept})
        print(f"n{args.labeled} s{seed} {strategy}/{recipe} round {number}: picked {pick}, Dice {dice:.4f}"
              f"{'' if kept else ' (guard: kept the model from before)'} "
              f"({finetune_seconds:.0f} s fine-tuning, {pick_seconds:.0f} s picking)", flush=True)
    row = {"labeled": args.labeled, "seed": seed, "strategy": strategy, "recipe": recipe, "pool": args.pool, "rounds": rounds,
           "retrain": [retrain(args, seed, picked[:count], validation) for count in args.retrain_at if count <= len(picked)]}
    return row


def retrains(row: dict) -> list[dict]:
    """A row's retraining bounds (rows from before --retrain-at hold one dict, for their last round)."""
    bounds = row.get("retrain", [])
    return [bounds] if isinstance(bounds, dict) else bounds


def carried_over(old: dict, new: dict) -> list[dict]:
    """The new row's bounds plus the old row's for corrections the new loop picked alike (same first picks)."""
    picks = lambda row: [r["picked"] for r in row["rounds"][1:]]  # noqa: E731
    done = {b["corrections"] for b in retrains(new)}
    same = [b for b in retrains(old) if b["corrections"] not in done and picks(old)[:b["corrections"]] == picks(new)[:b["corrections"]]]
    return sorted(retrains(new) + same, key=lambda b: b["corrections"])


def retrain(args: argparse.Namespace, seed: int, picked: list[str], validation: list[tuple[str, str]]) -> dict:
    """Supervised training from scratch on the labeled cases plus the corrections: the loop's upper bound."""
    from semiseg.finetuning import case_dice
    from semiseg.training import TrainConfig, train

    labeled, validation_ids = seeded_split(args.labeled, seed)
    out = args.work / "loop" / f"retrain-n{args.labeled}-s{seed}-{'-'.join(sorted(picked))}"
    timing = out / "retrain_seconds.json"  # a retraining already done (same corrections) is reused with its time
    if not (out / "last" / "model.json").exists() or not timing.exists():
        tick = time.perf_counter()
        train(TrainConfig(data=str(DATA), output=str(out), labeled=sorted(labeled + picked), validation=validation_ids,
                          validate_every=BASE_SETTINGS["iterations"] + 1, seed=seed, device="cpu", workers=0, overwrite=True,
                          **BASE_SETTINGS))
        timing.write_text(json.dumps(time.perf_counter() - tick))
    seconds = json.loads(timing.read_text())
    return {"dice": float(np.nanmean(case_dice(out / "last", validation))), "seconds": seconds, "corrections": len(picked)}


def render(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["labeled"], row["strategy"], row["recipe"]), []).append(row)
    lines = ["# The review loop, simulated (hippocampus, CPU)", "",
             "Start: supervised VNet on N labeled cases (seeded split of hippocampus_cpu.py). Each round: pick a scan from a",
             "pool of unlabeled training scans (most uncertain under the current model, or at random), correct it with its",
             "ground truth, fine-tune the current model on it, score on the 40 validation cases (mean Dice). Recipes: today",
             "(the correction alone, 50 iterations, lr 0.01) and new (FineTuneRequest's defaults). Dice: mean over seeds",
             "(± sd when several). Time per round: fine-tuning + picking, one thread on a shared 2-core CPU.",
             "Reproduce: `python benchmarks/review_loop.py` (see its docstring).", ""]
    most = max(len(r["rounds"]) for r in rows)
    lines += ["| labeled | strategy | recipe | seeds | " + " | ".join(f"round {i}" for i in range(most))
              + " | s/round | guard kept | retrain after k rounds: Dice (s) |", "|---" * (most + 7) + "|"]
    figure, axis = plt.subplots(figsize=(9, 5.5))
    for (count, strategy, recipe), group in sorted(groups.items()):
        length = max(len(row["rounds"]) for row in group)
        complete = [row for row in group if len(row["rounds"]) == length]
        per_seed = np.array([[r["dice"] for r in row["rounds"]] for row in complete])
        mean, sd = per_seed.mean(0), per_seed.std(0)
        cells = [f"{m:.4f}" + (f" ± {s:.4f}" if len(per_seed) > 1 else "") for m, s in zip(mean, sd)] + [""] * (most - length)
        per_round = np.mean([r["finetune_seconds"] + r["pick_seconds"] for row in complete for r in row["rounds"][1:]])
        kept = [r.get("kept", True) for row in complete for r in row["rounds"][1:]]
        guard = f"{sum(kept)}/{len(kept)}" if recipe == "guarded" else ""
        bounds: dict[int, list[dict]] = {}
        for row in complete:
            for bound in retrains(row):
                bounds.setdefault(bound["corrections"], []).append(bound)
        upper = "; ".join(f"k={k}: {np.mean([b['dice'] for b in bs]):.4f} ({np.mean([b['seconds'] for b in bs]):.0f})"
                          + (f" [{len(bs)} seeds]" if len(bs) != len(complete) else "") for k, bs in sorted(bounds.items()))
        lines.append(f"| {count} | {strategy} | {recipe} | {len(per_seed)} | " + " | ".join(cells) + f" | {per_round:.0f} | {guard} | {upper} |")
        axis.errorbar(np.arange(length) + 0.06 * STRATEGIES.index(strategy), mean, yerr=sd if len(per_seed) > 1 else None,
                      marker="o", capsize=3, linestyle={"new": "-", "guarded": ":", "today": "--"}[recipe],
                      label=f"n{count} {strategy}, {recipe} recipe")
    axis.set_xlabel("round (corrections so far)")
    axis.set_ylabel("validation Dice (40 cases)")
    axis.set_title("Review loop on hippocampus: Dice after each fine-tuned correction")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / "review_loop.png", dpi=120)
    lines += ["", "![validation Dice vs round](review_loop.png)", ""]
    page = RESULTS / "review_loop.md"
    notes = page.read_text().partition(NOTES_MARKER)[2] if page.exists() else ""
    page.write_text("\n".join(lines) + "\n" + NOTES_MARKER + (notes or "\n"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labeled", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--pool", type=int, default=40, help="unlabeled scans the picks are drawn from (ranking them all is slow)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--retrain-at", type=int, nargs="*", default=[], metavar="K",
                        help="also retrain from scratch with the first K rounds' corrections (the upper bound), for each K")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--retrain-only", action="store_true", help="only the --retrain-at bounds, for loops already in the results")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    path = RESULTS / "review_loop.json"
    if not args.render_only:
        import torch

        torch.set_num_threads(1)
        for seed in args.seeds:
            for recipe in args.recipes:
                for strategy in args.strategies:
                    key = (args.labeled, seed, strategy, recipe)
                    same = lambda r: (r["labeled"], r["seed"], r["strategy"], r["recipe"]) == key  # noqa: E731
                    if args.retrain_only:
                        done = [r for r in json.loads(path.read_text()) if same(r)] if path.exists() else []
                        if not done:
                            continue
                        picked = [r["picked"] for r in done[0]["rounds"][1:]]
                        row = dict(done[0], retrain=[retrain(args, seed, picked[:k], validation_pairs(args.labeled, seed))
                                                     for k in args.retrain_at if k <= len(picked)])
                    else:
                        row = one_loop(args, seed, strategy, recipe)
                    # Read again before writing: another invocation may have added rows meanwhile.
                    rows = json.loads(path.read_text()) if path.exists() else []
                    for old in filter(same, rows):
                        row["retrain"] = carried_over(old, row)
                    rows = [r for r in rows if not same(r)] + [row]
                    path.write_text(json.dumps(rows, indent=1) + "\n")
    render(json.loads(path.read_text()) if path.exists() else [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
