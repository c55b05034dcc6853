"""The checkpoint record: a checkpoint written before `ModelRecord` existed still reads and loads,
the record writes back the same description, and a broken description is one clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from semiseg.checkpoint import FORMAT_VERSION
from semiseg.errors import CheckpointError
from semiseg.inference import predict_volume
from semiseg.io import read_volume
from semiseg.metrics import dice
from semiseg.models import ModelRecord, load_model, read_record

ROOT = Path(__file__).resolve().parents[1]
FORMAT_1 = Path(__file__).resolve().parent / "fixtures" / "checkpoint-format-1"  # model.json of the bundled model, as first written
BUNDLED = ROOT / "resources" / "models" / "default"
SAMPLE = ROOT / "resources" / "hippocampus"


def test_a_format_1_description_reads_into_the_record_and_back():
    original = json.loads((FORMAT_1 / "model.json").read_text())
    assert original["format_version"] == 1 == FORMAT_VERSION
    record = read_record(FORMAT_1)
    assert (record.method, record.network, record.network_options) == ("supervised", "vnet", {"base_filters": 8})
    assert record.class_names == {0: "background", 1: "Anterior", 2: "Posterior"} and record.num_classes == 3
    assert tuple(record.plan.patch_size) == (32, 48, 32)
    assert record.best_dice_mean == original["validation"]["best_dice_mean"]
    assert len(record.split.labeled) == len(original["split"]["labeled"]) and record.split.seed == 0
    # Written back, the description is the one read (save_checkpoint adds the format fields).
    written = json.loads(json.dumps(record.to_dict()))
    assert written == {k: v for k, v in original.items() if k not in ("format", "format_version")}


def test_the_bundled_model_written_before_the_record_loads_and_segments():
    model = load_model(BUNDLED)
    assert model.record.method == "supervised" and model.record.weights_sha256
    volume = read_volume(SAMPLE / "imagesTr" / "hippocampus_001.nii.gz")
    label = read_volume(SAMPLE / "labelsTr" / "hippocampus_001.nii.gz").array
    labels = predict_volume(volume, model.plan, model.predictors(), torch.device("cpu"), model.overlap).labels.array
    assert dice(labels > 0, label > 0) > 0.7


def test_unknown_keys_are_kept_and_a_broken_description_is_one_error(tmp_path):
    data = json.loads((FORMAT_1 / "model.json").read_text())
    data["benchmark_selection"] = {"iteration": 800}
    record = ModelRecord.from_dict(data)
    assert record.to_dict()["benchmark_selection"] == {"iteration": 800}
    folder = tmp_path / "broken"
    shutil.copytree(FORMAT_1, folder)
    del data["plan"]
    (folder / "model.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="incomplete checkpoint description"):
        read_record(folder)
    data = json.loads((FORMAT_1 / "model.json").read_text())
    data["format_version"] = FORMAT_VERSION + 1
    (folder / "model.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="newer semiseg"):
        read_record(folder)
