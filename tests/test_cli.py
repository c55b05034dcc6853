"""The `semiseg` command end to end: train -> info -> predict -> evaluate on the bundled sample,
resume and overwrite rules, and one test per kind of bad input (exit code, one-line message, no
traceback, nothing written)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from semiseg.cli import main
from semiseg.io import read_volume

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "resources" / "hippocampus"
TINY = ["--iterations", "4", "--network-option", "base_filters=4", "--workers", "0", "--device", "cpu"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str, phrase: str) -> str:
    """The one `semiseg: error:` line; no traceback anywhere."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("semiseg: error:")]
    assert len(lines) == 1, err
    assert phrase in lines[0], lines[0]
    return lines[0]


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# The happy path, trained once ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny mean-teacher run on a copy of the bundled sample, then a prediction and an evaluation."""
    base = tmp_path_factory.mktemp("cli")
    data = base / "hippocampus"
    shutil.copytree(SAMPLE, data)
    run = base / "run"

    def invoke(*argv) -> tuple[int, str, str]:
        # capsys is function-scoped: capture this module-scoped run by hand.
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
        return code, out.getvalue(), err.getvalue()

    train = invoke("train", "--data", data, "--out", run, "--method", "mean-teacher", "--labeled", "50%",
                   "--validation", "2", "--validate-every", "2", *TINY)
    predictions = base / "predictions"
    predict = invoke("predict", data / "imagesTr", "--checkpoint", run / "best", "--out", predictions,
                     "--uncertainty", "--device", "cpu")
    evaluation = base / "evaluation"
    evaluate = invoke("evaluate", "--predictions", predictions, "--labels", data / "labelsTr", "--out", evaluation)
    return {"base": base, "data": data, "run": run, "predictions": predictions, "evaluation": evaluation,
            "train": train, "predict": predict, "evaluate": evaluate}


def test_train_writes_checkpoints_and_log(trained):
    code, out, err = trained["train"]
    assert code == 0, err
    assert "Traceback" not in err
    assert "device: cpu" in out
    assert "12 labeled, 8 unlabeled" in out
    # 10 labeled left after 2 for validation: 50% of them labeled, the other 5 + the 8 imagesTs unlabeled.
    assert "training on 5 labeled + 13 unlabeled, validating on 2" in out
    run = trained["run"]
    for name in ("best", "last"):
        assert (run / name / "model.safetensors").is_file()
        assert (run / name / "model.json").is_file()
    assert (run / "last" / "training.safetensors").is_file()
    meta = json.loads((run / "best" / "model.json").read_text())
    assert meta["model"]["method"] == "mean-teacher"
    assert meta["class_names"] == {"0": "background", "1": "Anterior", "2": "Posterior"}
    assert len(meta["split"]["labeled"]) == 5 and len(meta["split"]["validation"]) == 2
    events = read_log(run)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert [e["iteration"] for e in events if e["type"] == "iteration"][-1] == 4
    validations = [e for e in events if e["type"] == "validation"]
    assert [e["iteration"] for e in validations] == [2, 4]
    assert all(0.0 <= e["dice_mean"] <= 1.0 for e in validations)
    assert events[-1]["iteration"] == 4


def test_info_describes_the_checkpoint(trained, capsys):
    code, out, err = run_cli(capsys, "info", trained["run"] / "best")
    assert code == 0, err
    assert "method: mean-teacher" in out
    assert "classes: 0=background, 1=Anterior, 2=Posterior" in out
    assert "network: vnet" in out and '"base_filters": 4' in out
    assert "labeled 5, unlabeled 13, validation 2, seed 0" in out


def test_predict_writes_labels_and_uncertainty_on_each_scans_grid(trained):
    code, out, err = trained["predict"]
    assert code == 0, err
    assert "device: cpu" in out
    assert out.count(": estimate about ") == len(list((trained["data"] / "imagesTr").glob("*.nii.gz")))
    predictions = trained["predictions"]
    scans = sorted((trained["data"] / "imagesTr").glob("*.nii.gz"))
    expected = sorted(f"{s.name[:-7]}{suffix}.nii.gz" for s in scans for suffix in ("", "_entropy", "_disagreement"))
    assert sorted(p.name for p in predictions.iterdir()) == expected
    for scan in scans:
        source = read_volume(scan)
        labels = read_volume(predictions / scan.name)
        assert labels.shape == source.shape
        assert labels.geometry.matches(source.geometry)
        assert set(np.unique(labels.array).tolist()) <= {0, 1, 2}
        for kind in ("entropy", "disagreement"):
            uncertainty = read_volume(predictions / f"{scan.name[:-7]}_{kind}.nii.gz")
            assert uncertainty.shape == source.shape
            assert uncertainty.geometry.matches(source.geometry)
            assert uncertainty.array.min() >= 0.0 and uncertainty.array.max() <= 1.0 + 1e-6


def test_evaluate_writes_metrics_per_case_and_class(trained):
    code, out, err = trained["evaluate"]
    assert code == 0, err
    with open(trained["evaluation"] / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    cases = sorted(p.name[:-7] for p in (trained["data"] / "labelsTr").glob("*.nii.gz"))
    assert len(rows) == len(cases) * 2
    assert sorted({r["case"] for r in rows}) == cases  # the _entropy/_disagreement maps are not cases
    assert {r["class"] for r in rows} == {"1", "2"}
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    summary = (trained["evaluation"] / "summary.md").read_text()
    assert summary in out
    assert "dice" in summary.lower()


def test_predict_and_evaluate_refuse_to_overwrite_without_the_flag(trained, capsys):
    data, predictions, evaluation = trained["data"], trained["predictions"], trained["evaluation"]
    before = {p.name: p.stat().st_mtime_ns for p in predictions.iterdir()}
    code, _, err = run_cli(capsys, "predict", data / "imagesTr", "--checkpoint", trained["run"] / "best",
                           "--out", predictions, "--uncertainty", "--device", "cpu")
    assert code == 2
    error_line(err, "exists")
    assert {p.name: p.stat().st_mtime_ns for p in predictions.iterdir()} == before

    code, _, err = run_cli(capsys, "evaluate", "--predictions", predictions, "--labels", data / "labelsTr", "--out", evaluation)
    assert code == 2
    error_line(err, "exists")

    one = data / "imagesTr" / "hippocampus_001.nii.gz"
    code, out, err = run_cli(capsys, "predict", one, "--checkpoint", trained["run"] / "best", "--out", predictions,
                             "--uncertainty", "--device", "cpu", "--overwrite")
    assert code == 0, err
    assert (predictions / "hippocampus_001.nii.gz").stat().st_mtime_ns > before["hippocampus_001.nii.gz"]

    code, out, err = run_cli(capsys, "evaluate", "--predictions", predictions, "--labels", data / "labelsTr",
                             "--out", evaluation, "--checkpoint", trained["run"] / "best", "--overwrite")
    assert code == 0, err
    with open(evaluation / "metrics.csv", newline="") as handle:
        assert {r["class"] for r in csv.DictReader(handle)} == {"Anterior", "Posterior"}


def test_train_refuses_an_existing_run_and_resumes_it(trained, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    args = ["train", "--data", trained["data"], "--out", run, "--method", "mean-teacher", "--labeled", "50%",
            "--validation", "2", "--validate-every", "2", "--network-option", "base_filters=4", "--workers", "0", "--device", "cpu"]
    log_before = (run / "log.jsonl").read_text()
    code, _, err = run_cli(capsys, *args, "--iterations", "4")
    assert code == 2
    error_line(err, "already holds a training run")
    assert (run / "log.jsonl").read_text() == log_before  # untouched

    # --overwrite with a bad option: the new run fails at its start and the old one is kept whole.
    best_weights = (run / "best" / "model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, *args, "--iterations", "4", "--overwrite", "--labeled", "half")
    assert code == 2
    error_line(err, "labeled 'half'")
    assert (run / "log.jsonl").read_text() == log_before
    assert (run / "best" / "model.safetensors").read_bytes() == best_weights
    assert sorted(p.name for p in run.iterdir()) == ["best", "last", "log.jsonl"]

    code, out, err = run_cli(capsys, *args, "--iterations", "6", "--resume")
    assert code == 0, err
    events = read_log(run)[len(log_before.splitlines()):]
    resume = [e for e in events if e["type"] == "resume"]
    assert len(resume) == 1 and resume[0]["iteration"] == 4
    assert [e["iteration"] for e in events if e["type"] == "validation"] == [6]
    assert events[-1]["type"] == "end" and events[-1]["iteration"] == 6
    assert json.loads((run / "last" / "model.json").read_text())["iteration"] == 6
    assert "finished at iteration 6" in out

    # A successful --overwrite replaces the run: a fresh log, no trace of the old one.
    code, out, err = run_cli(capsys, "train", "--data", trained["data"], "--out", run, "--method", "supervised",
                             "--iterations", "1", "--network-option", "base_filters=4", "--workers", "0",
                             "--device", "cpu", "--overwrite")
    assert code == 0, err
    events = read_log(run)
    assert [e["type"] for e in events].count("start") == 1 and events[-1]["iteration"] == 1
    assert json.loads((run / "best" / "model.json").read_text())["model"]["method"] == "supervised"
    assert sorted(p.name for p in run.iterdir()) == ["best", "last", "log.jsonl"]


def test_help_as_a_real_command():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    result = subprocess.run([sys.executable, "-m", "semiseg.cli", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("train", "predict", "evaluate", "methods", "info"):
        assert command in result.stdout


# Bad input -------------------------------------------------------------------------------------

def small_dataset(folder: Path, cases: int = 3, unlabeled: int = 0) -> Path:
    """A few labeled cases of the bundled sample in MSD layout, with its dataset.json (classes 0..2)."""
    images = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[:cases]
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    for image in images:
        shutil.copy(image, folder / "imagesTr" / image.name)
        shutil.copy(SAMPLE / "labelsTr" / image.name, folder / "labelsTr" / image.name)
    for image in sorted((SAMPLE / "imagesTs").glob("*.nii.gz"))[:unlabeled]:
        (folder / "imagesTs").mkdir(exist_ok=True)
        shutil.copy(image, folder / "imagesTs" / image.name)
    shutil.copy(SAMPLE / "dataset.json", folder / "dataset.json")
    return folder


def rewrite(path: Path, change) -> None:
    """Read a NIfTI with SimpleITK, let `change(array, image)` return a new image, write it back."""
    image = sitk.ReadImage(str(path))
    new = change(sitk.GetArrayFromImage(image), image)
    sitk.WriteImage(new, str(path))


def like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def truncated_copy(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def train_fails(capsys, tmp_path, data, phrase, *extra) -> str:
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", data, "--out", run, "--method", "supervised", "--labeled", "100%", *TINY, *extra)
    assert code == 2, err
    line = error_line(err, phrase)
    assert not run.exists(), files_under(run)  # no log, no folder left behind
    return line


def predict_fails(capsys, tmp_path, checkpoint, source, phrase, code_expected=2) -> str:
    out = tmp_path / "predictions"
    code, _, err = run_cli(capsys, "predict", source, "--checkpoint", checkpoint, "--out", out, "--device", "cpu")
    assert code == code_expected, err
    line = error_line(err, phrase)
    assert not out.exists(), files_under(out)
    return line


def test_missing_data_folder(capsys, tmp_path):
    train_fails(capsys, tmp_path, tmp_path / "nowhere", "not a folder")


def test_folder_with_no_images(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here")
    train_fails(capsys, tmp_path, tmp_path / "empty", "no images found")


def test_images_without_labels(capsys, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for image in sorted((SAMPLE / "imagesTs").glob("*.nii.gz"))[:2]:
        shutil.copy(image, data / image.name)
    train_fails(capsys, tmp_path, data, "no labeled case")


def test_label_shape_mismatch_names_the_file(capsys, tmp_path):
    data = small_dataset(tmp_path / "data")
    label = sorted((data / "labelsTr").iterdir())[1]
    rewrite(label, lambda array, image: like(array, image)[:, :, :-2])
    line = train_fails(capsys, tmp_path, data, "label shape")
    assert str(label) in line


def test_label_geometry_mismatch_names_the_file(capsys, tmp_path):
    data = small_dataset(tmp_path / "data")
    label = sorted((data / "labelsTr").iterdir())[0]

    def shift(array, image):
        moved = like(array, image)
        moved.SetOrigin(tuple(o + 5.0 for o in image.GetOrigin()))
        return moved

    rewrite(label, shift)
    line = train_fails(capsys, tmp_path, data, "geometry")
    assert str(label) in line


def test_label_values_outside_declared_classes(capsys, tmp_path):
    data = small_dataset(tmp_path / "data")
    label = sorted((data / "labelsTr").iterdir())[2]

    def add_five(array, image):
        array = array.copy()
        array[0, 0, 0] = 5
        return like(array, image)

    rewrite(label, add_five)
    line = train_fails(capsys, tmp_path, data, "label values [5] are outside the declared classes [0, 1, 2]")
    assert str(label) in line


def test_nan_intensities_in_training_data(capsys, tmp_path):
    data = small_dataset(tmp_path / "data")
    image = sorted((data / "imagesTr").iterdir())[0]

    def add_nan(array, reference):
        array = array.astype(np.float32)
        array[1, 2, 3] = np.nan
        return like(array, reference)

    rewrite(image, add_nan)
    line = train_fails(capsys, tmp_path, data, "NaN or infinite")
    assert str(image) in line


def test_unknown_method(capsys, tmp_path):
    train_fails(capsys, tmp_path, small_dataset(tmp_path / "data"), "unknown method 'nope'", "--method", "nope")


def test_unknown_network(capsys, tmp_path):
    line = train_fails(capsys, tmp_path, small_dataset(tmp_path / "data"), "unknown network 'no-such-net'", "--network", "no-such-net")
    assert "vnet" in line


def test_bad_labeled_spec(capsys, tmp_path):
    data = small_dataset(tmp_path / "data")
    train_fails(capsys, tmp_path, data, "labeled 'lots'", "--labeled", "lots")
    train_fails(capsys, tmp_path, data, "labeled '50'", "--labeled", "50")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_on_a_cpu_only_machine(capsys, tmp_path, trained):
    line = train_fails(capsys, tmp_path, small_dataset(tmp_path / "data"), "no CUDA GPU", "--device", "cuda")
    assert "--device cpu" in line
    out = tmp_path / "predictions"
    code, _, err = run_cli(capsys, "predict", SAMPLE / "imagesTs", "--checkpoint", trained["run"] / "best", "--out", out, "--device", "cuda")
    assert code == 2
    error_line(err, "no CUDA GPU")
    assert not out.exists()


def test_corrupt_nifti_given_to_predict(capsys, tmp_path, trained):
    broken = truncated_copy(SAMPLE / "imagesTs" / "hippocampus_036.nii.gz", tmp_path / "broken.nii.gz")
    line = predict_fails(capsys, tmp_path, trained["run"] / "best", broken, "truncated")
    assert str(broken) in line


def test_nan_image_given_to_predict(capsys, tmp_path, trained):
    source = tmp_path / "nan.nii.gz"
    shutil.copy(SAMPLE / "imagesTs" / "hippocampus_036.nii.gz", source)

    def add_nan(array, reference):
        array = array.astype(np.float32)
        array[0, 0, 0] = np.nan
        return like(array, reference)

    rewrite(source, add_nan)
    predict_fails(capsys, tmp_path, trained["run"] / "best", source, "1 voxels are NaN or infinite")


@pytest.mark.parametrize("shape, phrase", [((32, 32), "2D image of size (32, 32); expected a 3D volume"),
                                           ((2, 8, 8, 8), "2 channels, but this model takes 1")])
def test_image_that_is_not_3d_given_to_predict(capsys, tmp_path, trained, shape, phrase):
    """A 4D file is read as a scan of several channels (MSD's layout): refused by a one-channel model."""
    source = tmp_path / "scan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones(shape, np.float32), isVector=False), str(source))
    predict_fails(capsys, tmp_path, trained["run"] / "best", source, phrase)


def test_pickled_checkpoint_is_refused(capsys, tmp_path):
    pickled = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, pickled)
    predict_fails(capsys, tmp_path, pickled, SAMPLE / "imagesTs" / "hippocampus_036.nii.gz", "pickle")
    code, _, err = run_cli(capsys, "info", pickled)
    assert code == 2
    error_line(err, "never unpickles")


def test_modified_weights_fail_the_checksum(capsys, tmp_path, trained):
    checkpoint = tmp_path / "best"
    shutil.copytree(trained["run"] / "best", checkpoint)
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte in the last tensor
    weights.write_bytes(bytes(data))
    line = predict_fails(capsys, tmp_path, checkpoint, SAMPLE / "imagesTs" / "hippocampus_036.nii.gz", "checksum mismatch")
    assert str(weights) in line


def test_folder_prediction_with_one_corrupt_scan(capsys, tmp_path, trained):
    scans = tmp_path / "scans"
    scans.mkdir()
    good = sorted((SAMPLE / "imagesTs").glob("*.nii.gz"))[:2]
    for scan in good:
        shutil.copy(scan, scans / scan.name)
    truncated_copy(SAMPLE / "imagesTs" / "hippocampus_044.nii.gz", scans / "bad_scan.nii.gz")
    out = tmp_path / "predictions"
    code, out_text, err = run_cli(capsys, "predict", scans, "--checkpoint", trained["run"] / "best", "--out", out, "--device", "cpu")
    assert code == 1, err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == sorted(s.name for s in good)
    assert "1 of 3 scans failed" in err
    summary = err[err.index("1 of 3 scans failed"):]
    assert "bad_scan.nii.gz" in summary and "truncated" in summary
    for scan in good:
        assert read_volume(out / scan.name).geometry.matches(read_volume(scan).geometry)


def test_predict_refuses_to_write_over_its_input(capsys, tmp_path, trained):
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(SAMPLE / "imagesTs" / "hippocampus_036.nii.gz", scans / "hippocampus_036.nii.gz")
    before = (scans / "hippocampus_036.nii.gz").read_bytes()
    code, _, err = run_cli(capsys, "predict", scans, "--checkpoint", trained["run"] / "best", "--out", scans,
                           "--device", "cpu", "--overwrite")
    assert code == 2
    error_line(err, "would replace the input scan")
    assert sorted(p.name for p in scans.iterdir()) == ["hippocampus_036.nii.gz"]
    assert (scans / "hippocampus_036.nii.gz").read_bytes() == before


def test_evaluate_names_the_predictions_folder_when_a_case_is_missing(capsys, tmp_path, trained):
    predictions = tmp_path / "predictions"
    shutil.copytree(trained["predictions"], predictions)
    (predictions / "hippocampus_004.nii.gz").unlink()  # its _entropy/_disagreement maps stay
    out = tmp_path / "evaluation"
    code, _, err = run_cli(capsys, "evaluate", "--predictions", predictions, "--labels", trained["data"] / "labelsTr", "--out", out)
    assert code == 2
    line = error_line(err, "1 label(s) without a prediction")
    assert f"in {predictions}: hippocampus_004" in line
    assert "semiseg-evaluate-" not in line
    assert "without a label" not in line  # its uncertainty maps are not taken for cases
    assert not out.exists()
