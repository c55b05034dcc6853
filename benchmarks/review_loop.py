"""The review loop, simulated (issue #18 part 2): does the model get better round after round?

Start: the supervised base model of finetune_recipes.py (N labeled cases of hippocampus_cpu.py's seeded
split). Each round picks one scan from a pool of the split's unlabeled training scans, "corrects" it with
its ground truth, fine-tunes the current model on it (`semiseg.finetuning`, engine path) and scores the
result on the 40 validation cases. Compared: picking the most uncertain scan as the review queue ranks
them (`Prediction.uncertainty_score`, predicted with the current model) vs a seeded random pick, and the
fine-tuning of before issue #18 ("today": the correction alone, 50 iterations, lr 0.01) vs the measured
recipe (FineTuneRequest's defaults: the model's own labeled cases, earlier corrections included, replayed).
`--retrain` adds the upper bound: supervised training from scratch on the labeled cases plus every
correction of the last round, at the base model's budget, with its wall-clock time.

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
RECIPES = {"today": CANDIDATES["today"], "new": {}}  # {}: FineTuneRequest's defaults
STRATEGIES = ("uncertainty", "random")


def pool_cases(count: int, seed: int, size: int) -> dict[str, tuple[str, str]]:
    """`size` unlabeled training cases (seeded), as (scan, label) files: the scans a reviewer could pick."""
    from semiseg.datasets import load_dataset

    labeled, validation = seeded_split(count, seed)
    cases = {c.case_id: c for c in load_dataset(DATA).labeled if c.case_id not in set(labeled) | set(validation)}
    chosen = sorted(cases)
    random.Random(2000 + seed).shuffle(chosen)
    return {i: (cases[i].image, cases[i].label) for i in sorted(chosen[:size])}


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
    from semiseg.finetuning import FineTuneRequest, case_dice, finetune_config
    from semiseg.training import train

    base = base_model(args.labeled, seed, args.work)
    folder = unlabeled_folder(args.labeled, seed, args.work)
    validation = validation_pairs(args.labeled, seed)
    pool = pool_cases(args.labeled, seed, args.pool)
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
        finetune_seconds = time.perf_counter() - tick
        checkpoint = out / "last"
        dice = float(np.nanmean(case_dice(checkpoint, validation)))
        rounds.append({"round": number, "picked": pick, "dice": dice, "pick_seconds": pick_seconds, "finetune_seconds": finetune_seconds})
        print(f"n{args.labeled} s{seed} {strategy}/{recipe} round {number}: picked {pick}, Dice {dice:.4f} "
              f"({finetune_seconds:.0f} s fine-tuning, {pick_seconds:.0f} s picking)", flush=True)
    row = {"labeled": args.labeled, "seed": seed, "strategy": strategy, "recipe": recipe, "pool": args.pool, "rounds": rounds}
    if args.retrain:
        row["retrain"] = retrain(args, seed, picked, validation)
    return row


def retrain(args: argparse.Namespace, seed: int, picked: list[str], validation: list[tuple[str, str]]) -> dict:
    """Supervised training from scratch on the labeled cases plus every correction: the loop's upper bound."""
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
    lines += ["| labeled | strategy | recipe | seeds | " + " | ".join(f"round {i}" for i in range(most)) + " | s/round | retrain (s) |",
              "|---" * (most + 6) + "|"]
    figure, axis = plt.subplots(figsize=(8, 5))
    for (count, strategy, recipe), group in sorted(groups.items()):
        per_seed = np.array([[r["dice"] for r in row["rounds"]] for row in group if len(row["rounds"]) == most])
        if not len(per_seed):
            continue
        mean, sd = per_seed.mean(0), per_seed.std(0)
        cells = [f"{m:.4f}" + (f" ± {s:.4f}" if len(per_seed) > 1 else "") for m, s in zip(mean, sd)]
        per_round = np.mean([r["finetune_seconds"] + r["pick_seconds"] for row in group for r in row["rounds"][1:]])
        retrained = [row["retrain"] for row in group if "retrain" in row]
        upper = f"{np.mean([r['dice'] for r in retrained]):.4f} ({np.mean([r['seconds'] for r in retrained]):.0f})" if retrained else ""
        lines.append(f"| {count} | {strategy} | {recipe} | {len(per_seed)} | " + " | ".join(cells) + f" | {per_round:.0f} | {upper} |")
        axis.errorbar(range(most), mean, yerr=sd if len(per_seed) > 1 else None, marker="o", capsize=3,
                      linestyle="-" if recipe == "new" else "--", label=f"n{count} {strategy}, {recipe} recipe")
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
    parser.add_argument("--retrain", action="store_true", help="also retrain from scratch with the last round's corrections")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    path = RESULTS / "review_loop.json"
    if not args.render_only:
        import torch

        torch.set_num_threads(1)
        for seed in args.seeds:
            for recipe in args.recipes:
                for strategy in args.strategies:
                    row = one_loop(args, seed, strategy, recipe)
                    key = (row["labeled"], row["seed"], row["strategy"], row["recipe"])
                    # Read again before writing: another invocation may have added rows meanwhile.
                    rows = json.loads(path.read_text()) if path.exists() else []
                    rows = [r for r in rows if (r["labeled"], r["seed"], r["strategy"], r["recipe"]) != key] + [row]
                    path.write_text(json.dumps(rows, indent=1) + "\n")
    render(json.loads(path.read_text()) if path.exists() else [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
