"""Exported models (TorchScript, ONNX) reproduce `semiseg predict` on a real scan through MONAI's
sliding window and the plan file; the plan file round-trips; nothing is overwritten without asking;
the README's snippet runs as written."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.cli import main
from semiseg.errors import InputError, OutputExistsError
from semiseg.inference import predict_volume
from semiseg.io import read_volume
from semiseg.methods import build_method
from semiseg.methods.base import NetworkSpec
from semiseg.model_export import export_onnx, export_torchscript, load_exported, predict_with_exported, read_plan, read_spec
from semiseg.models import Model, load_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "resources" / "models" / "default"
SCAN = ROOT / "resources" / "hippocampus" / "imagesTs" / "hippocampus_036.nii.gz"
EXPORTERS = {"torchscript": export_torchscript, "onnx": export_onnx}


@pytest.fixture(scope="module")
def model() -> Model:
    return load_model(DEFAULT_MODEL)


def engine_probabilities(model: Model, scan) -> np.ndarray:
    return predict_volume(scan, model.plan, model.predictors(), torch.device("cpu"), model.overlap).probabilities


@pytest.mark.parametrize("resampled", [False, True], ids=["plan-as-trained", "plan-resampling"])
@pytest.mark.parametrize("export_format", ["torchscript", "onnx"])
def test_exported_model_reproduces_predict(model, export_format, resampled, tmp_path, one_thread):
    if export_format == "onnx":
        pytest.importorskip("onnxruntime")
    if resampled:  # the bundled plan keeps each scan's grid; this one resamples there and back
        model = dataclasses.replace(model, plan=dataclasses.replace(model.plan, target_spacing=(1.3, 1.2, 1.1)))
    model_path, plan_path = EXPORTERS[export_format](model, tmp_path / "model")
    scan = read_volume(SCAN)
    # Three windows a batch: the exported batch axis must take other sizes than the traced two.
    probabilities = predict_with_exported(scan, load_exported(model_path), read_spec(plan_path), sw_batch_size=3)

    expected = engine_probabilities(model, scan)
    assert probabilities.shape == expected.shape == (3, *scan.shape)
    assert np.abs(probabilities - expected).max() < 1e-4
    assert (expected.argmax(0) > 0).sum() > 100  # a real segmentation, not an empty one


def test_plan_file_round_trips_and_describes_the_prediction(model, tmp_path):
    _, plan_path = export_torchscript(model, tmp_path / "model")
    spec = read_spec(plan_path)
    assert read_plan(plan_path) == model.plan
    assert spec["sliding_window"] == {"roi_size": list(model.plan.patch_size), "overlap": model.overlap, "mode": "gaussian"}
    assert spec["predictors"] == list(model.method.predictors()) == ["student"]
    assert spec["input"]["shape"] == ["batch", 1, *model.plan.patch_size]
    assert spec["output"]["shape"] == ["batch", 3, *model.plan.patch_size]


def test_existing_files_are_not_overwritten_unless_asked(model, tmp_path):
    model_path, plan_path = export_torchscript(model, tmp_path / "model")
    model_path.write_bytes(b"earlier export")
    with pytest.raises(OutputExistsError, match="model.pt exists"):
        export_torchscript(model, tmp_path / "model")
    assert model_path.read_bytes() == b"earlier export"
    export_torchscript(model, tmp_path / "model", overwrite=True)
    assert model_path.read_bytes() != b"earlier export"

    # The other format of the same model shares the plan file; a different plan there is kept.
    assert export_onnx(model, tmp_path / "model")[1] == plan_path
    plan_path.write_text("{}")
    model_path.with_suffix(".onnx").unlink()
    with pytest.raises(OutputExistsError, match="model.plan.json exists"):
        export_onnx(model, tmp_path / "model")
    assert plan_path.read_text() == "{}" and not model_path.with_suffix(".onnx").exists()


def test_an_onnx_export_that_cannot_be_made_is_refused_and_leaves_nothing(tmp_path):
    # sscl's spectral branch (FFT) has no ONNX form at opset 17; random weights suffice to show it.
    method = build_method("sscl", 1, 3, NetworkSpec("vnet", {"base_filters": 4})).eval()
    default = load_model(DEFAULT_MODEL)
    plan = dataclasses.replace(default.plan, patch_size=(16, 16, 16))
    record = dataclasses.replace(default.record, method="sscl", method_options={}, network_options={"base_filters": 4}, plan=plan)
    model = Model(method, plan, record, "sscl")
    with pytest.raises(InputError, match="sscl cannot be exported to ONNX.*fft.*torchscript"):
        export_onnx(model, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_exports_and_refuses_missing_checkpoints_and_existing_outputs(tmp_path, capsys):
    out = tmp_path / "exported"
    code, stdout, _ = run_cli(capsys, "export-model", DEFAULT_MODEL, "--format", "torchscript", "--out", out)
    assert code == 0 and f"model: {out / 'model.pt'}" in stdout
    assert read_plan(out / "model.plan.json") == load_model(DEFAULT_MODEL).plan

    code, _, stderr = run_cli(capsys, "export-model", DEFAULT_MODEL, "--format", "torchscript", "--out", out)
    assert code == 2 and stderr.strip() == f"semiseg: error: {out / 'model.pt'} exists; refusing to overwrite it (use --overwrite)"
    assert run_cli(capsys, "export-model", DEFAULT_MODEL, "--format", "torchscript", "--out", out, "--overwrite")[0] == 0

    missing = tmp_path / "runs" / "best"
    code, _, stderr = run_cli(capsys, "export-model", missing, "--format", "onnx", "--out", tmp_path / "other")
    assert code == 2 and stderr.strip() == f"semiseg: error: {missing}: not a semiseg checkpoint (no model.json)"
    assert not (tmp_path / "other").exists()


def readme_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- export-snippet[^>]*-->\s*```python\n(.*?)```", readme, re.DOTALL)
    assert match, "README.md lost its export snippet"
    return match.group(1)


def test_readme_snippet_reproduces_predict(model, tmp_path, one_thread):
    export_torchscript(model, tmp_path / "exported" / "model")
    snippet = readme_snippet()
    for placeholder, path in {"exported/": f"{tmp_path / 'exported'}/", "scan.nii.gz": str(SCAN)}.items():
        assert placeholder in snippet
        snippet = snippet.replace(placeholder, path)
    namespace: dict = {}
    exec(compile(snippet, "README.md export snippet", "exec"), namespace)

    expected = engine_probabilities(model, read_volume(SCAN))
    assert np.abs(namespace["probabilities"] - expected).max() < 1e-4
    assert np.array_equal(namespace["labels"], expected.argmax(0))
