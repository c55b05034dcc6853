"""The benchmark scripts' own logic: the hippocampus benchmark's --option parsing (a variant name with a dot
once sent its options nowhere), its seeded split and paired comparison, and the GPU check's refusal on a CPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.datasets import choose_split, load_dataset

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "hippocampus_cpu.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("hippocampus_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_options_reach_variants_whose_names_contain_dots():
    parse = _benchmark().parse_method_options
    runs = ["dual-subnet:0.1:weight-0.1", "dk-uxnet:0.1", "sscl:0.1:baseline"]
    options = parse(["dual-subnet:weight-0.1.unlabeled_weight=0.1", "dk-uxnet.queries=32", "sscl:baseline.spectral=false"], runs)
    assert options == {"dual-subnet:weight-0.1": {"unlabeled_weight": 0.1}, "dk-uxnet": {"queries": 32}, "sscl:baseline": {"spectral": False}}


def test_an_option_for_no_run_is_refused():
    with pytest.raises(SystemExit, match="dual-subnet:weight-0"):
        _benchmark().parse_method_options(["dual-subnet:weight-0.unlabeled_weight=0.1"], ["dual-subnet:0.1:weight-0.1"])


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus").is_dir(), reason="needs ../shared/data")
def test_seeded_split_keeps_the_validation_cases_and_draws_nested_labeled_sets():
    benchmark = _benchmark()
    drawn = {}
    for seed in (0, 1):
        for count in (4, 16):
            labeled, validation = benchmark.seeded_split(count, seed)
            drawn[seed, count] = set(labeled), validation
    earlier_rows = choose_split(load_dataset(benchmark.DATA), "10%", "40", 0).validation
    for (seed, count), (labeled, validation) in drawn.items():
        assert validation == earlier_rows and len(labeled) == count and not labeled & set(validation)
    assert drawn[0, 4][0] < drawn[0, 16][0] and drawn[1, 4][0] < drawn[1, 16][0]
    assert drawn[0, 16][0] != drawn[1, 16][0]


def _run(method: str, count: int, seed: int, per_case: list[float], iterations: int = 1000) -> dict:
    return {"method": method, "variant": "", "network": "vnet", "iterations": iterations, "labeled_count": count, "seed": seed,
            "labeled": count / 160, "dice_mean": float(np.mean(per_case)), "train_seconds": 60.0,
            "per_case_dice": {f"case{i}": [d, d] for i, d in enumerate(per_case)}}


def test_comparison_pairs_cases_over_the_seeds_both_methods_have():
    rng = np.random.default_rng(0)
    base = {seed: rng.uniform(0.6, 0.8, 30) for seed in (0, 1, 2)}
    runs = [_run("supervised", 4, seed, list(base[seed])) for seed in (0, 1, 2)]
    runs += [_run("cps", 4, seed, list(base[seed] + 0.05)) for seed in (0, 1)]  # seed 2 not run yet
    runs += [_run("supervised", 160, 0, list(np.full(30, 0.9)))]
    row = next(line for line in _benchmark().comparison_lines(runs) if line.startswith("| 4 | cps "))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[5].startswith("0.7") and cells[6] == "+0.0500 (2 seeds)"
    assert float(cells[7]) < 1e-5 and cells[8] == "30/30"
    expected_gap = 0.05 / (0.9 - np.mean([np.mean(base[s]) for s in (0, 1)]))
    assert cells[9] == f"{expected_gap:.0%}"
    ceiling = next(line for line in _benchmark().comparison_lines(runs) if line.startswith("| 160 | supervised "))
    assert ceiling.split("|")[6].strip() == "0.9000"  # one seed: no spread to show


def test_equal_time_pairs_each_method_with_supervised_at_its_best_budget_within_the_same_time(monkeypatch):
    benchmark = _benchmark()
    monkeypatch.setattr(benchmark, "relative_times", lambda: {"supervised": 1.0, "cps": 4.6, "mean-teacher": 2.6})
    rng = np.random.default_rng(3)
    base = {seed: rng.uniform(0.6, 0.8, 30) for seed in (0, 1, 2)}
    runs = [_run("supervised", 4, seed, list(base[seed])) for seed in (0, 1, 2)]
    runs += [_run("supervised", 4, seed, list(base[seed] + 0.03), iterations) for seed in (0, 1) for iterations in (3000, 6000)]
    runs += [_run(method, 4, seed, list(base[seed] + 0.02)) for seed in (0, 1, 2) for method in ("cps", "mean-teacher")]
    runs += [_run("cps", 4, seed, list(base[seed] + 0.04), 3000) for seed in (0, 1)]
    rows = {tuple(c.strip() for c in line.split("|")[2:4]): [c.strip() for c in line.strip("|").split("|")]
            for line in benchmark.equal_time_lines(runs) if line.startswith("| 4 |")}
    # cps needs 4600 supervised iterations: the 6000 runs; mean-teacher 2600: the 3000 runs; over the 2 seeds both have.
    assert rows["cps", "1000"][3:6] == ["4.6x", f"{np.mean([np.mean(base[s] + 0.02) for s in base]):.4f}", "6000"]
    assert rows["mean-teacher", "1000"][5] == "3000" and rows["mean-teacher", "1000"][7] == "-0.0100 (2 seeds)"
    assert rows["mean-teacher", "1000"][9] == "0/30"
    # Each longer budget gets its own row: cps at 3000 needs 13800, which was not run.
    assert "≥ 13800: not run yet" in rows["cps", "3000"] and ("supervised", "3000") not in rows
    # Once a budget that long was run, supervised-only at its best budget within that time: here it peaked at 6000.
    with_long = runs + [_run("supervised", 4, seed, list(base[seed] + 0.01), 14000) for seed in (0, 1)]
    [row] = [line for line in benchmark.equal_time_lines(with_long) if line.startswith("| 4 | cps | 3000 |")]
    assert [c.strip() for c in row.strip("|").split("|")][5:8] == ["6000", f"{np.mean([np.mean(base[s] + 0.03) for s in (0, 1)]):.4f}", "+0.0100 (2 seeds)"]
    runs = [r for r in runs if r["iterations"] != 6000]
    rows = {line.split("|")[2].strip(): line for line in benchmark.equal_time_lines(runs) if line.startswith("| 4 | cps | 1000") or
            line.startswith("| 4 | mean-teacher | 1000")}
    assert "≥ 4600: not run yet" in rows["cps"] and "3000" in rows["mean-teacher"]


def test_budget_table_pairs_each_longer_budget_with_the_same_method_at_the_base_budget():
    rng = np.random.default_rng(5)
    base = {seed: rng.uniform(0.6, 0.8, 30) for seed in (0, 1, 2)}
    runs = [_run(method, 16, seed, list(base[seed])) for seed in (0, 1, 2) for method in ("supervised", "cps")]
    runs += [_run("supervised", 16, seed, list(base[seed] + 0.01), 3000) for seed in (0, 1)]
    runs += [_run("cps", 16, seed, list(base[seed] - 0.02), 6000) for seed in (0, 1, 2)]
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in _benchmark().budget_lines(runs) if line.startswith("| 16 |")}
    supervised_3000 = np.mean([np.mean(base[s] + 0.01) for s in (0, 1)])
    # columns: labeled, method, 1000 it, 3000 it, 6000 it, longer vs 1000
    assert rows["supervised"][2:5] == [f"{np.mean([np.mean(base[s]) for s in base]):.4f} (3)", f"{supervised_3000:.4f} (2)", ""]
    assert rows["supervised"][5].startswith("3000: +0.0100, p ") and rows["supervised"][5].endswith("30/30 (2 seeds)")
    assert rows["cps"][3] == "" and rows["cps"][5].startswith("6000: -0.0200, p ") and rows["cps"][5].endswith("0/30 (3 seeds)")


def test_count_plot_shows_every_method_at_the_compared_budget_and_the_budget_study_apart():
    module = _benchmark()
    lines = {(method, "vnet", iterations): {4: [0.8], 16: [0.84]}
             for method, iterations in [("supervised", 1000), ("supervised", 3000), ("cps", 1000), ("cps", 6000), ("sscl", 1000)]}
    (_, every_method), (_, budget_study) = module.count_plot_panels(lines)
    assert set(every_method) == {("supervised", "vnet", 1000), ("cps", "vnet", 1000), ("sscl", "vnet", 1000)}
    assert set(budget_study) == set(lines) - {("sscl", "vnet", 1000)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_clearly_without_cuda_and_writes_nothing(tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--out", str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["gpu_check: error: no CUDA device here (torch.cuda.is_available() is False); run this on a GPU machine"]
    assert not (tmp_path / "results").exists()


def test_method_evidence_written_from_the_comparison_is_what_users_are_shown(tmp_path, monkeypatch):
    from semiseg.methods import evidence

    rng = np.random.default_rng(1)
    base = {seed: rng.uniform(0.6, 0.8, 30) for seed in (0, 1, 2)}
    runs = [_run("supervised", 4, seed, list(base[seed])) for seed in (0, 1, 2)]
    runs += [_run("cps", 4, seed, list(base[seed] + 0.02)) for seed in (0, 1, 2)]
    runs += [_run("supervised", 4, seed, list(base[seed] + 0.03), 6000) for seed in (0, 1)]  # as long as cps takes, 2 seeds
    benchmark = _benchmark()
    monkeypatch.setattr(benchmark, "relative_times", lambda: {"supervised": 1.0, "cps": 4.6})
    target = tmp_path / "method_evidence.json"
    benchmark.write_method_evidence(runs, target)
    monkeypatch.setattr(evidence, "_evidence", lambda: json.loads(target.read_text()))
    [row] = evidence.measured("cps")
    assert (row.labeled, row.seeds, row.better_cases) == (4, 3, "30/30") and abs(row.delta - 0.02) < 1e-9
    assert row.dice == pytest.approx(np.mean([np.mean(base[s] + 0.02) for s in base]))
    assert (row.equal_time["supervised_iterations"], row.equal_time["seeds"], row.equal_time["better_cases"]) == (6000, 2, "0/30")
    assert evidence.describe("cps").startswith(f"4 labeled: Dice {row.dice:.3f} ± {row.dice_sd:.3f} (3 seeds), +0.020 vs supervised (p=")
    assert ", -0.010 vs supervised given its time (6000 iterations, p=" in evidence.describe("cps")
    assert evidence.recommended_method() == "cps"  # 2 seeds given its time: not yet evidence against it
    assert evidence.measured("supervised")[0].equal_time is None
    assert evidence.describe("bcp") == "not benchmarked yet"
    assert [row[0] for row in evidence.overview()] == ["cps", "supervised"]  # best Dice at the fewest labels first
    assert evidence.overview()[0][1] == f"{row.dice:.3f} (+0.020) @4"


def test_the_recommended_method_must_beat_supervised_significantly_over_enough_seeds_and_trained_as_long(tmp_path, monkeypatch):
    from semiseg.methods import evidence

    rng = np.random.default_rng(2)
    base = {seed: rng.uniform(0.6, 0.8, 30) for seed in (0, 1, 2)}
    runs = [_run("supervised", 4, seed, list(base[seed])) for seed in (0, 1, 2)]
    runs += [_run("cps", 4, seed, list(base[seed] + 0.01)) for seed in (0, 1, 2)]
    runs += [_run("mean-teacher", 4, seed, list(base[seed] + 0.05)) for seed in (0, 1)]  # best, but 2 seeds only
    runs += [_run("bcp", 4, seed, list(base[seed] + rng.normal(0.004, 0.05, 30))) for seed in (0, 1, 2)]  # noise
    runs += [_run("sscl", 4, 0, list(base[0] + 0.08))]  # best of all, one seed: a trial
    target = tmp_path / "method_evidence.json"
    _benchmark().write_method_evidence(runs, target)
    monkeypatch.setattr(evidence, "_evidence", lambda: json.loads(target.read_text()))
    [trial] = evidence.measured("sscl")
    assert evidence.describe("sscl").startswith(f"4 labeled: Dice {trial.dice:.3f} (1 seed), +0.080 vs supervised (p=")
    assert evidence.measured("bcp")[0].p_value > evidence.SIGNIFICANCE
    assert evidence.recommended_method() == "cps"
    runs = [r for r in runs if r["method"] != "cps"]
    _benchmark().write_method_evidence(runs, target)
    assert evidence.recommended_method() == "supervised"
    # A method measured with other options than its defaults says so and is no evidence for its defaults.
    runs += [{**_run("voxel-adversarial", 4, seed, list(base[seed] + 0.05)), "options": {"alpha": 0.1}} for seed in (0, 1, 2)]
    _benchmark().write_method_evidence(runs, target)
    assert evidence.describe("voxel-adversarial").startswith("4 labeled with alpha=0.1: Dice ")
    assert evidence.recommended_method() == "supervised"
    # Where supervised-only was given the method's training time, the method must beat that too.
    benchmark = _benchmark()
    monkeypatch.setattr(benchmark, "relative_times", lambda: {"supervised": 1.0, "cps": 4.6})
    runs += [_run("cps", 4, seed, list(base[seed] + 0.01)) for seed in (0, 1, 2)]
    benchmark.write_method_evidence(runs, target)
    assert evidence.recommended_method() == "cps"
    runs += [_run("supervised", 4, seed, list(base[seed] + 0.02), 6000) for seed in (0, 1, 2)]
    benchmark.write_method_evidence(runs, target)
    assert evidence.measured("cps")[0].delta > 0 > evidence.measured("cps")[0].equal_time["delta"]
    assert evidence.recommended_method() == "supervised"


def test_the_default_method_is_the_one_the_shipped_evidence_recommends_and_the_readme_says_so():
    from semiseg.config import default_of
    from semiseg.methods import evidence

    chosen = evidence.recommended_method()
    assert default_of("method") == chosen
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"default method is `{chosen}`" in readme


def test_rows_at_longer_budgets_are_shown_but_the_default_method_is_chosen_where_every_method_was_compared(tmp_path, monkeypatch):
    from semiseg.methods import evidence

    rng = np.random.default_rng(2)
    base = {seed: rng.uniform(0.6, 0.8, 30) for seed in (0, 1, 2)}
    runs = [_run("supervised", 4, seed, list(base[seed]), iterations) for seed in (0, 1, 2) for iterations in (1000, 3000)]
    runs += [_run("cps", 4, seed, list(base[seed] + 0.02)) for seed in (0, 1, 2)]
    runs += [_run("mean-teacher", 4, seed, list(base[seed] + 0.01)) for seed in (0, 1, 2)]
    runs += [_run("mean-teacher", 4, seed, list(base[seed] + 0.05), 3000) for seed in (0, 1, 2)]  # best Dice, but at 3000 only
    runs += [_run("sscl", 16, seed, list(base[seed] + 0.1)) for seed in (0, 1, 2)]  # best Dice, but with 4x the labels
    benchmark = _benchmark()
    monkeypatch.setattr(benchmark, "relative_times", lambda: {"supervised": 1.0, "cps": 4.6, "mean-teacher": 2.6})
    target = tmp_path / "method_evidence.json"
    benchmark.write_method_evidence(runs, target)
    monkeypatch.setattr(evidence, "_evidence", lambda: json.loads(target.read_text()))
    assert [(row.labeled, row.iterations) for row in evidence.measured("mean-teacher")] == [(4, 1000), (4, 3000)]
    assert [row.iterations for row in evidence.measured("mean-teacher", 1000)] == [1000]
    assert evidence.recommended_method() == "cps"
    assert "\n4 labeled at 3000 iterations: Dice " in evidence.describe("mean-teacher")
    assert "+0.050 vs supervised (p=" in evidence.describe("mean-teacher").split("at 3000 iterations")[1]
    assert [method for method, _, _ in evidence.overview()] == ["cps", "mean-teacher", "supervised", "sscl"]
