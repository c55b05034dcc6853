"""Warnings when a scan or a reference does not fit the model: the bundled default (hippocampus MR) model
against a hippocampus scan, a CT, an LA h5 scan and the LA classes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.cli import main
from semiseg.compatibility import mismatch_warnings
from semiseg.datasets import LA_CLASS_NAMES, load_dataset, Split
from semiseg.io import read_volume
from semiseg.models import load_model, read_record
from semiseg.preprocessing import Plan, compute_plan

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "resources" / "models" / "default"
SHARED = Path("/work/shared/data")
CT = SHARED / "samples" / "example_ct_sm.nii.gz"
LA_H5 = next(iter(sorted((SHARED / "la" / "2018LA_Seg_Training Set").glob("*/mri_norm2.h5"))), None)
HIPPOCAMPUS_SCAN = ROOT / "resources" / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
needs_shared = pytest.mark.skipif(not CT.is_file() or LA_H5 is None, reason="needs /work/shared/data")


@pytest.fixture(scope="module")
def plan() -> Plan:
    return read_record(DEFAULT_MODEL).plan


def test_the_default_model_records_its_training_statistics_and_a_hippocampus_scan_fits_them(plan):
    low, median, high = plan.training_percentiles
    assert 0 <= low < median < high  # MR intensities: non-negative
    assert plan.training_spacing_range == ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    assert mismatch_warnings(read_volume(HIPPOCAMPUS_SCAN), plan, source=HIPPOCAMPUS_SCAN) == []


@needs_shared
def test_a_ct_scan_on_the_mr_model_warns_of_modality_and_spacing(plan):
    warnings = mismatch_warnings(read_volume(CT), plan, source=CT)
    assert len(warnings) == 2, warnings
    modality, spacing = warnings
    assert "look like CT" in modality and "MR-like" in modality
    assert "spacing 3 x 3 x 3 mm" in spacing and "1 x 1 x 1 mm" in spacing


@needs_shared
def test_an_h5_scan_warns_that_it_is_placed_at_1_mm(plan):
    warnings = mismatch_warnings(read_volume(LA_H5), plan, source=LA_H5)
    assert len(warnings) == 1, warnings
    assert "mri_norm2.h5" in warnings[0] and "1 mm" in warnings[0]
    # The same volume without its file name is not known to come from an h5 file.
    assert mismatch_warnings(read_volume(LA_H5), plan) == []


def test_a_reference_with_other_classes_is_named_and_matching_classes_are_not(plan):
    volume = read_volume(HIPPOCAMPUS_SCAN)
    warnings = mismatch_warnings(volume, plan, reference_class_names=LA_CLASS_NAMES)
    assert len(warnings) == 1, warnings
    assert "left atrium" in warnings[0].lower() and "Anterior" in warnings[0] and "Posterior" in warnings[0]
    same = {0: "Background", 1: "anterior", 2: "Posterior "}
    assert mismatch_warnings(volume, plan, reference_class_names=same) == []


def test_a_plan_without_training_statistics_loads_and_skips_the_checks(plan):
    data = plan.to_dict()
    del data["training_percentiles"], data["training_spacing_range"]
    old = Plan.from_dict(data)
    assert old.training_percentiles is None and old.training_spacing_range is None
    assert old.key() == plan.key()  # the statistics do not change what preprocessing produces
    fixture = json.loads((ROOT / "tests" / "fixtures" / "checkpoint-format-1" / "model.json").read_text())
    assert Plan.from_dict(fixture["plan"]).training_percentiles is None
    if CT.is_file():
        assert mismatch_warnings(read_volume(CT), old) == []


def test_compute_plan_records_the_training_intensities_and_spacings():
    dataset = load_dataset(ROOT / "resources" / "hippocampus")
    ids = [case.case_id for case in dataset.cases][:4]
    plan = compute_plan(dataset, Split(labeled=ids[:2], unlabeled=ids[2:], validation=[], seed=0), 16)
    pooled = np.concatenate([read_volume(case.image).array.ravel() for case in dataset.cases if case.case_id in ids])
    low, median, high = plan.training_percentiles
    assert pooled.min() <= low < median < high <= pooled.max()
    assert plan.training_spacing_range == ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


@needs_shared
def test_predict_prints_the_warnings_and_still_succeeds(capsys, tmp_path):
    torch.set_num_threads(1)
    code = main(["predict", "--checkpoint", str(DEFAULT_MODEL), str(CT), "--out", str(tmp_path), "--device", "cpu"])
    _, err = capsys.readouterr()
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("semiseg: warning:")]
    assert len(warnings) == 2, err
    assert "look like CT" in warnings[0] and "spacing" in warnings[1]
    assert (tmp_path / "example_ct_sm.nii.gz").is_file()
