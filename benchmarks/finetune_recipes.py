"""Fine-tuning recipes compared on hippocampus (issue #18): which one makes a model better, not worse,
after a reviewer's correction?

Setup: the seeded split of hippocampus_cpu.py (40 fixed validation cases; `--labeled N` training cases
drawn by `--seed`). A base supervised VNet (base_filters 8, SGD lr 0.05, 1000 iterations, one thread) is
trained on the labeled cases once and kept in --work. A perfect correction is simulated: the ground truth
of one unlabeled training case. Each candidate recipe fine-tunes the base model on it through the engine's
path (`semiseg.finetuning.finetune_config` + `semiseg.training.train`), with a folder holding the unlabeled
training scans (the user's "folder of unlabeled scans"); the fine-tuned model is scored on the 40
validation cases (`semiseg.finetuning.case_dice`) against the base model. Results: the Dice change per
corrected case, the validation cases that got worse, the fine-tuning time. Appended to
benchmarks/results/finetune_recipes.json (a row with the same base, candidate and corrected case
replaces the old one) and rendered to finetune_recipes.md.

  python benchmarks/finetune_recipes.py --labeled 4 --seed 0 --corrected 3 --candidates today replay ...
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
from hippocampus_cpu import DATA, RESULTS, seeded_split  # noqa: E402

WORK = Path("/tmp/semiseg-finetune-recipes")  # base models and fine-tuned runs, kept between invocations
BASE_SETTINGS = dict(method="supervised", network="vnet", network_options={"base_filters": 8}, iterations=1000, lr=0.05,
                     optimizer="sgd")
ENCODER = (".encoder.", ".down.")  # VNet's parameter names on the way down

# A candidate: FineTuneRequest fields, plus study-only knobs: "method_options" merged into the run's,
# "freeze" (parameter-name parts that get no update).
TODAY = dict(iterations=50, lr=0.01, replay=False, correction_share=None, frozen_norm_statistics=False)
CANDIDATES: dict[str, dict] = {
    "today": TODAY,
    "lr 0.001": {**TODAY, "lr": 0.001},
    "replay": {**TODAY, "replay": True},
    "replay, lr 0.003": {**TODAY, "replay": True, "lr": 0.003},
    "replay, share 0.5": {**TODAY, "replay": True, "correction_share": 0.5},
    "replay, share 0.5, lr 0.003": {**TODAY, "replay": True, "correction_share": 0.5, "lr": 0.003},
    "replay, share 0.5, 20 it": {**TODAY, "replay": True, "correction_share": 0.5, "iterations": 20},
    "replay, share 0.5, 100 it": {**TODAY, "replay": True, "correction_share": 0.5, "iterations": 100},
    "replay, share 0.5, frozen encoder": {**TODAY, "replay": True, "correction_share": 0.5, "freeze": ENCODER},
    # Mean teacher without consistency: the student fine-tunes, the EMA teacher predicts with it.
    "replay, share 0.5, EMA": {**TODAY, "replay": True, "correction_share": 0.5, "method": "mean-teacher",
                               "method_options": {"consistency": 0.0}},
    "replay, share 0.5, mean-teacher": {**TODAY, "replay": True, "correction_share": 0.5, "method": "mean-teacher"},
    # Control: the same training without new information (the "correction" is one of the model's own cases,
    # which replay then trains as before): what more iterations on the old cases do by themselves.
    "replay, no new case (control)": {**TODAY, "replay": True, "control": True},
    # The batch-norm statistics kept as the model had them (not re-estimated from fine-tuning patches).
    "replay, share 0.5, lr 0.003, frozen BN statistics": {**TODAY, "replay": True, "correction_share": 0.5, "lr": 0.003,
                                                          "frozen_norm_statistics": True},
}


def base_model(count: int, seed: int, work: Path) -> Path:
    """The supervised model the fine-tunings start from (trained once, then reused)."""
    from semiseg.training import TrainConfig, train

    out = work / f"base-n{count}-s{seed}"
    if (out / "last" / "model.json").exists():
        return out / "last"
    labeled, validation = seeded_split(count, seed)
    config = TrainConfig(data=str(DATA), output=str(out), labeled=labeled, validation=validation, validate_every=1000,
                         seed=seed, device="cpu", workers=0, overwrite=True, **BASE_SETTINGS)
    train(config)
    return out / "last"


def unlabeled_folder(count: int, seed: int, work: Path) -> Path:
    """A folder of the split's unlabeled training scans (links): what a user fine-tunes with."""
    from semiseg.datasets import choose_split, load_dataset

    labeled, validation = seeded_split(count, seed)
    dataset = load_dataset(DATA)
    folder = work / f"unlabeled-n{count}-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    for case in dataset.cases:
        link = folder / Path(case.image).name
        if case.case_id not in set(labeled) | set(validation) and not link.exists():
            link.symlink_to(case.image)
    assert choose_split(dataset, "100%", "40", 0).validation == validation
    return folder


def corrected_cases(count: int, seed: int, how_many: int) -> list[str]:
    """Unlabeled training cases whose ground truth plays the reviewer's correction (seeded draw)."""
    from semiseg.datasets import load_dataset

    labeled, validation = seeded_split(count, seed)
    pool = sorted(c.case_id for c in load_dataset(DATA).labeled if c.case_id not in set(labeled) | set(validation))
    random.Random(1000 + seed).shuffle(pool)
    return pool[:how_many]


def finetune(name: str, checkpoint: Path, folder: Path, case_id: str, out: Path, seed: int) -> float:
    """Fine-tune with candidate `name` on the ground truth of `case_id`; returns the training seconds."""
    from semiseg.datasets import load_dataset
    from semiseg.finetuning import FineTuneRequest, finetune_config
    from semiseg.models import read_record
    from semiseg.training import Trainer

    candidate = dict(CANDIDATES[name])
    method_options, freeze = candidate.pop("method_options", {}), candidate.pop("freeze", ())
    if candidate.pop("control", False):
        case_id = read_record(checkpoint).split.labeled[0]
    case = {c.case_id: c for c in load_dataset(DATA).cases}[case_id]
    request = FineTuneRequest(checkpoint=str(checkpoint), folder=str(folder), output=str(out), corrections=[(case.image, case.label)],
                              device="cpu", seed=seed, overwrite=True, **candidate)
    config = finetune_config(request).with_overrides({"method_options": method_options})

    class PartlyFrozen(Trainer):
        def _make_optimizers(self):
            for parameter_name, parameter in self.method.named_parameters():
                if any(part in parameter_name for part in freeze):
                    parameter.requires_grad_(False)
            return super()._make_optimizers()

    started = time.perf_counter()
    PartlyFrozen(config).run()
    return time.perf_counter() - started


def validation_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    from semiseg.datasets import load_dataset

    _, validation = seeded_split(count, seed)
    by_id = {c.case_id: c for c in load_dataset(DATA).cases}
    return [(by_id[i].image, by_id[i].label) for i in validation]


def run(args: argparse.Namespace) -> None:
    import torch

    from semiseg.finetuning import case_dice

    torch.set_num_threads(1)
    results_path = RESULTS / "finetune_recipes.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else []
    base = base_model(args.labeled, args.seed, args.work)
    folder = unlabeled_folder(args.labeled, args.seed, args.work)
    cases = validation_pairs(args.labeled, args.seed)
    before_file = args.work / f"base-n{args.labeled}-s{args.seed}.dice.json"
    if not before_file.exists():
        before_file.write_text(json.dumps(case_dice(base, cases)))
    before = json.loads(before_file.read_text())
    for index, case_id in enumerate(corrected_cases(args.labeled, args.seed, args.corrected)):
        for name in args.candidates:
            if CANDIDATES[name].get("control") and index:
                continue  # no correction: one run is all there is to measure
            key = (args.labeled, args.seed, args.finetune_seed, name, case_id)
            if not args.redo and any((r["labeled"], r["seed"], r["finetune_seed"], r["candidate"], r["corrected"]) == key for r in rows):
                continue
            out = args.work / "runs" / f"n{args.labeled}-s{args.seed}-{case_id}-{name.replace(' ', '').replace(',', '_')}"
            seconds = finetune(name, base, folder, case_id, out, args.finetune_seed)
            after = case_dice(out / "last", cases)
            row = {"labeled": args.labeled, "seed": args.seed, "finetune_seed": args.finetune_seed, "candidate": name,
                   "recipe": CANDIDATES[name], "corrected": case_id, "before": float(np.nanmean(before)),
                   "after": float(np.nanmean(after)), "cases_worse": int(sum(a < b for a, b in zip(after, before))),
                   "validation_cases": len(cases), "finetune_seconds": seconds, "per_case_after": after}
            print(f"n{args.labeled} s{args.seed} {case_id} {name}: {row['before']:.4f} -> {row['after']:.4f} "
                  f"({row['cases_worse']}/{len(cases)} worse, {seconds:.0f} s)", flush=True)
            rows = [r for r in rows if (r["labeled"], r["seed"], r["finetune_seed"], r["candidate"], r["corrected"]) != key] + [row]
            results_path.write_text(json.dumps(rows, indent=1) + "\n")
    render(rows)


def render(rows: list[dict]) -> None:
    """finetune_recipes.md: one line per base model and candidate, over its corrected cases."""
    lines = ["# Fine-tuning recipes after one perfect correction (hippocampus, CPU)", "",
             "A supervised VNet (base_filters 8, 1000 iterations) trained on N labeled cases of the seeded split is fine-tuned",
             "on the ground truth of one unlabeled training case (a perfect correction), through the engine's fine-tuning",
             "path, with a folder of the unlabeled training scans. Dice: mean over the 40 validation cases (mean of the two",
             "classes). Δ: after − before, mean (min … max) over the corrected cases; worse: validation cases whose Dice",
             "dropped, mean over the corrected cases; s: fine-tuning wall-clock, one thread on a shared 2-core CPU.",
             "Reproduce: `python benchmarks/finetune_recipes.py` (see its docstring).", "",
             "| labeled | seed | recipe | corrected cases | Dice before | Dice after | Δ mean (min … max) | worse (of 40) | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["labeled"], row["seed"], row["finetune_seed"], row["candidate"]), []).append(row)
    order = list(CANDIDATES)
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], order.index(k[3]) if k[3] in order else len(order))):
        group = groups[key]
        delta = [r["after"] - r["before"] for r in group]
        seed = f"{key[1]}" + (f" (fine-tune seed {key[2]})" if key[2] else "")
        lines.append(f"| {key[0]} | {seed} | {key[3]} | {len(group)} | {np.mean([r['before'] for r in group]):.4f} | "
                     f"{np.mean([r['after'] for r in group]):.4f} | {np.mean(delta):+.4f} ({min(delta):+.4f} … {max(delta):+.4f}) | "
                     f"{np.mean([r['cases_worse'] for r in group]):.1f} | {np.mean([r['finetune_seconds'] for r in group]):.0f} |")
    page = RESULTS / "finetune_recipes.md"
    marker = "<!-- notes: text below this line is kept when the table is rendered again -->"
    notes = page.read_text().partition(marker)[2] if page.exists() else ""
    page.write_text("\n".join(lines) + "\n\n" + marker + (notes or "\n"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labeled", type=int, default=4, help="labeled cases of the base model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the base model")
    parser.add_argument("--finetune-seed", type=int, default=0, help="seed of the fine-tuning (patch draws)")
    parser.add_argument("--corrected", type=int, default=3, help="how many unlabeled cases to correct, one at a time")
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES), metavar="NAME")
    parser.add_argument("--work", type=Path, default=WORK, help="where base models and runs are kept")
    parser.add_argument("--redo", action="store_true", help="run again the runs already in the results file")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    if args.render_only:
        render(json.loads((RESULTS / "finetune_recipes.json").read_text()))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
