"""`semiseg benchmark la` on real Left Atrium cases: the whole path (protocol split, training through
the shared trainer, selection on the test cases, both conventions, table), the evaluation pieces on
real labels (perfect prediction, largest connected component, voxel-unit HD95/ASD against medpy,
the exact 18x18x4 stride through MONAI), the published-numbers file, and bad input.

To stay fast on a 2-core CPU the cases are real LA scans cropped around the atrium (96x96x48
voxels), the network is a 4-filter VNet, and the patch/stride are overridden (the hidden
--smoke-patch/--smoke-stride flags, which mark the results as a smoke run)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from semiseg import benchmark_la as la
from semiseg.cli import main
from semiseg.metrics import binary_metrics
from semiseg.models import read_record

SHARED = Path(__file__).resolve().parents[2] / "shared"
LA_ROOT = SHARED / "data" / "la"
CASES = LA_ROOT / "2018LA_Seg_Training Set"
PAPERS = SHARED / "papers"
pytestmark = [pytest.mark.skipif(not (LA_ROOT / "train.list").is_file(), reason="the LA data set is not available here"),
              pytest.mark.usefixtures("one_thread")]

CROP_XYZ = (96, 96, 48)
TINY = ["--iterations", "4", "--select-from", "2", "--select-every", "2", "--network-option", "base_filters=4",
        "--workers", "0", "--device", "cpu", "--predictor", "student", "--smoke-patch", "16", "32", "32",
        "--smoke-stride", "8", "32", "32", "--log-every", "2"]


def _ids(name: str) -> list[str]:
    return [line.strip() for line in (LA_ROOT / name).read_text().splitlines() if line.strip()]


def _read_case(case_id: str) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(CASES / case_id / la.LA_FILE, "r") as handle:
        return handle["image"][()], handle["label"][()]


def _crop_around_label(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    centre = np.argwhere(label > 0).mean(0).round().astype(int)
    start = [int(np.clip(c - s // 2, 0, n - s)) for c, s, n in zip(centre, CROP_XYZ, label.shape)]
    box = tuple(slice(a, a + s) for a, s in zip(start, CROP_XYZ))
    return image[box], label[box]


@pytest.fixture(scope="module")
def la_tree(tmp_path_factory) -> Path:
    """An LA folder: train.list = 2 real cases with an id absent on disk between them, test.list = 1 real case."""
    root = tmp_path_factory.mktemp("la")
    train, test = _ids("train.list")[:2], _ids("test.list")[:1]
    for case_id in train + test:
        image, label = _crop_around_label(*_read_case(case_id))
        folder = root / "2018LA_Seg_Training Set" / case_id
        folder.mkdir(parents=True)
        with h5py.File(folder / la.LA_FILE, "w") as handle:
            handle["image"] = image.astype(np.float32)
            handle["label"] = label.astype(np.uint8)
    (root / "train.list").write_text("\n".join([train[0], "ABSENTCASE0000000001", train[1]]) + "\n")
    (root / "test.list").write_text("\n".join(test) + "\n")
    return root


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def finished(la_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "run"
    assert main(["benchmark", "la", "--data", str(la_tree), "--labeled", "1", "--out", str(out), *TINY]) == 0
    return out


# The whole path ---------------------------------------------------------------------------------

def test_benchmark_writes_results_and_table_for_both_conventions(finished):
    result = json.loads((finished / "results.json").read_text())
    assert result["benchmark"] == "semiseg-la" and result["smoke"] is True
    assert result["labeled"] == 1 and result["unlabeled"] == 1
    split = result["split"]
    assert split["labeled"] == _ids("train.list")[:1]  # the first N of train.list
    assert split["unlabeled_missing"] == ["ABSENTCASE0000000001"] and split["unlabeled_expected"] == 2
    run = result["runs"][0]
    assert run["seed"] == 0 and set(run["conventions"]) == {"last", "best-lcc"}
    last, best = run["conventions"]["last"], run["conventions"]["best-lcc"]
    assert last["iteration"] == 4 and last["post_processing"] == "none"
    assert best["post_processing"] == "largest connected component"
    assert [h["iteration"] for h in best["history"]] == [2, 4]  # checked at --select-from, every 2, and the end
    assert best["iteration"] in (2, 4) and (finished / "seed-0" / "best-on-test" / "model.json").is_file()
    for outcome in (last, best):
        assert len(outcome["cases"]) == 1 and 0.0 <= outcome["summary"]["dice"]["mean"] <= 1.0
    assert (finished / "seed-0" / "metrics_last.csv").is_file() and (finished / "seed-0" / "metrics_best-lcc.csv").is_file()
    # The trainer was given the training cases only, never the test case.
    trained_on = read_record(finished / "seed-0" / "last").split
    assert sorted(trained_on.labeled + trained_on.unlabeled) == sorted(_ids("train.list")[:2]) and trained_on.validation == []

    table = (finished / "table.md").read_text()
    assert la.TABLE_HEADER in table
    assert "1 unlabeled found of 2 (1 train.list cases missing on disk)" in table
    assert "SMOKE RUN" in table
    rows = [line for line in table.splitlines() if line.startswith("| mean-teacher")]
    assert len(rows) == 2 and {row.split("|")[8].strip() for row in rows} == {"last", "best-lcc"}


def test_paper_preset_is_recorded_in_results_and_table(la_tree, tmp_path):
    out = tmp_path / "paper"
    argv = ["benchmark", "la", "--data", str(la_tree), "--labeled", "1", "--out", str(out), "--preset", "paper", "--convention", "last"]
    assert main([*argv, *TINY]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["preset"] == "paper" and result["geometry"] == "LA" and result["iterations"] == 4  # --iterations won
    training = result["training"]
    assert (training["lr"], training["lr_schedule"], training["nesterov"], training["amp"], training["augmentation"]) == (0.01, "step", False, False, "ua-mt")
    assert training["network_options"] == {"dropout": True, "base_filters": 4} and training["method_options"]["predict_with"] == "student"
    assert read_record(out / "seed-0" / "last").train_config["preset"] == "paper"
    assert result["method_label"] == "mean-teacher (vnet, base_filters=4, preset paper)"
    assert "| mean-teacher (vnet, base_filters=4, preset paper) |" in (out / "table.md").read_text()


def test_table_over_runs_pools_seeds_and_adds_published_rows(finished, tmp_path, capsys):
    code, out, err = run_cli(capsys, "benchmark", "la", "--table", finished, finished, "--out", tmp_path / "table")
    assert code == 0, err
    table = (tmp_path / "table" / "table.md").read_text()
    assert la.TABLE_HEADER in table and "seeds 0, 0" in table  # the same run twice: two seeds pooled

    # The published rows for the labeled counts in the table, each with its convention and source.
    result = json.loads((finished / "results.json").read_text())
    result["labeled"] = 8
    text = la.markdown_table([result], la.load_literature())
    published = text.split("Published")[1]
    assert "| UA-MT | 8 | 72 | 84.25 | 73.48 | 13.84 | 3.36 | last |" in published
    assert "| 16 |" not in published


def test_fast_evaluation_runs_on_the_trained_model(la_tree, finished):
    split = la.protocol_split(la_tree, 1)
    fast = la.TestSet(split, la.eval_settings(la.PRESETS["la"], True, (16, 32, 32)), "cpu", "student")
    predictions, references, names = fast.predict(finished / "seed-0" / "last")
    assert fast.settings.mode == "gaussian" and fast.settings.overlap == (0.5, 0.5, 0.5)
    assert predictions[split.test[0]].shape == references[split.test[0]].shape
    assert len(fast.rows(predictions, references, names, lcc=True)) == 1


# Evaluation on real labels ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_label() -> np.ndarray:
    _, label = _read_case(_ids("test.list")[0])
    return label.transpose(2, 1, 0).astype(np.uint8)  # semiseg's (z, y, x)


def test_a_prediction_equal_to_the_label_is_perfect(real_label):
    (row,) = la.case_rows("case", real_label, real_label, {0: "background", 1: "left atrium"})
    assert (row["dice"], row["jaccard"], row["hd95"], row["asd"]) == (1.0, 1.0, 0.0, 0.0)


def test_selection_dice_is_the_metrics_dice_and_empty_counts_zero(real_label):
    shifted = np.roll(real_label, 2, axis=1)
    names = {0: "background", 1: "left atrium"}
    expected = binary_metrics(shifted, real_label)["dice"]
    assert la.mean_dice({"a": shifted}, {"a": real_label}, names) == pytest.approx(expected, abs=1e-12)
    assert la.mean_dice({"a": shifted, "b": np.zeros_like(real_label)}, {"a": real_label, "b": real_label}, names) == pytest.approx(expected / 2)


def test_largest_component_removes_a_detached_blob(real_label):
    prediction = real_label.copy()
    prediction[:4, :4, :4] = 1  # a corner blob, far from the atrium
    kept = la.largest_component(prediction)
    assert np.array_equal(kept, real_label)
    skimage = pytest.importorskip("skimage.measure")
    components = skimage.label(prediction)  # the papers' getLargestCC
    reference = components == np.argmax(np.bincount(components.flat)[1:]) + 1
    assert np.array_equal(kept.astype(bool), reference)
    assert not la.largest_component(np.zeros((4, 4, 4), np.uint8)).any()


def test_voxel_hd95_and_asd_equal_medpy_on_a_real_case(real_label):
    medpy = pytest.importorskip("medpy.metric.binary")
    prediction = np.roll(real_label, 3, axis=2)
    prediction[2:6, 2:6, 2:6] = 1
    ours = binary_metrics(prediction, real_label, spacing=None)
    assert ours["hd95"] == pytest.approx(medpy.hd95(prediction, real_label), abs=1e-9)
    assert ours["asd"] == pytest.approx(medpy.asd(prediction, real_label), abs=1e-9)
    assert ours["dice"] == pytest.approx(medpy.dc(prediction, real_label), abs=1e-12)


def test_protocol_stride_is_exactly_18x18x4_in_monai():
    from monai.inferers.utils import _get_scan_interval

    settings = la.eval_settings(la.PRESETS["la"], fast=False)
    assert settings.patch_zyx == (80, 112, 112) and settings.mode == "constant"
    image_zyx = (88, 140, 190)
    assert _get_scan_interval(image_zyx, settings.patch_zyx, 3, settings.overlap) == (4, 18, 18)
    for name, preset in la.PRESETS.items():
        patch, stride = preset.patch_zyx, preset.stride_zyx
        assert _get_scan_interval(tuple(p + 7 for p in patch), patch, 3, la.overlap_for_stride(patch, stride)) == stride, name


# Published numbers ------------------------------------------------------------------------------

def test_published_rows_cite_a_source_and_a_convention():
    literature = la.load_literature()
    assert set(literature["conventions"]) == {"last", "best-lcc", "unknown"}
    for row in literature["rows"]:
        assert row["source"] in literature["sources"] and row["table"]
        assert row["convention"] in literature["conventions"]
        assert 0 < row["jaccard"] < row["dice"] <= 100 and row["hd95"] > 0 and row["asd"] > 0
    if not PAPERS.is_dir():
        return
    for row in literature["rows"]:  # every number from a paper's text is printed in that text
        file = literature["sources"][row["source"]]["file"]
        if file is None:
            continue
        text = (PAPERS / file).read_text()
        fractions = row["source"] == "sscl"
        for key in ("dice", "jaccard", "hd95", "asd"):
            printed = f"{row[key] / 100:.3f}" if fractions and key in ("dice", "jaccard") else f"{row[key]:.2f}"
            assert printed in text, (row["method"], row["labeled"], key)


# Bad input --------------------------------------------------------------------------------------

def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("semiseg: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_data_without_the_lists_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "case" ).mkdir()
    code, out, err = run_cli(capsys, "benchmark", "la", "--data", tmp_path, "--out", tmp_path / "out")
    assert code == 2
    assert "train.list or test.list" in _one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_labeled_cases_missing_on_disk_and_bad_table_input(la_tree, tmp_path, capsys):
    code, _, err = run_cli(capsys, "benchmark", "la", "--data", la_tree, "--labeled", "2", "--out", tmp_path / "out")
    assert code == 2 and "missing on disk" in _one_error_line(err)
    code, _, err = run_cli(capsys, "benchmark", "la", "--data", la_tree, "--labeled", "150%", "--out", tmp_path / "out")
    assert code == 2 and "--labeled" in _one_error_line(err)
    code, _, err = run_cli(capsys, "benchmark", "la", "--table", tmp_path)
    assert code == 2 and "results.json" in _one_error_line(err)


# BCP's paper preset ------------------------------------------------------------------------------

def test_bcp_paper_preset_gives_its_published_la_run_and_explicit_options_win():
    from semiseg.config import resolve_settings
    from semiseg.methods import build_method
    from semiseg.methods.base import NetworkSpec, StepInfo

    settings = resolve_settings({"method": "bcp", "network": "vnet", "preset": "paper", "iterations": 6000,
                                 "method_options": {"alpha": 0.4}, "network_options": {}}, {"method", "method_options", "preset"})
    assert (settings["iterations"], settings["batch_size"], settings["lr_schedule"], settings["amp"]) == (17000, 4, "step", False)
    assert settings["method_options"]["alpha"] == 0.4 and settings["network_options"] == {"dropout": True}
    # The recorded options are ones the method and the network take, and give the code's 2000 pre-training iterations.
    method = build_method("bcp", 1, 2, NetworkSpec(settings["network"], settings["network_options"]), settings["method_options"])
    assert method.networks["student"].dropout.p == 0.5
    assert [method.pretraining(StepInfo(i, settings["iterations"])) for i in (1999, 2000)] == [True, False]
    assert method.split.__name__ == "halves"  # the code's pairs (the default, "shifted", is a deviation)


def test_a_run_stopped_at_its_time_limit_resumes_where_it_stopped(la_tree, tmp_path):
    """The GPU check trains in slices of its time budget: each call continues the last one's run."""
    training = {"method": "supervised", "iterations": 6, "network_options": {"base_filters": 4}, "workers": 0,
                "device": "cpu", "log_every": 1}
    common = dict(labeled=1, conventions=("last",), smoke_patch=(16, 32, 32), smoke_stride=(8, 32, 32), select_every=2)
    first = la.run_protocol(la_tree, tmp_path / "run", training, time_limit=0.0, **common)
    stopped_at = first["runs"][0]["conventions"]["last"]["iteration"]
    assert stopped_at < 6
    resumed = la.run_protocol(la_tree, tmp_path / "run", training, resume=True, **common)
    assert resumed["runs"][0]["conventions"]["last"]["iteration"] == 6
    log = [json.loads(line) for line in (tmp_path / "run" / "seed-0" / "log.jsonl").read_text().splitlines()]
    assert {"type": "resume", "iteration": stopped_at}.items() <= next(e for e in log if e["type"] == "resume").items()
