"""The plugin's Qt-free logic: layer geometry, error maps, progress accounting, fine-tuning configs,
and the training process's clean stop when its parent goes away."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.datasets import load_dataset, select_split
from semiseg.errors import InputError, OutputExistsError
from semiseg.inference import network_calls
from semiseg.io import Geometry, Volume, read_volume
from semiseg.models import load_model, read_record
from semiseg.napari import jobs
from semiseg.napari.export import ExportItem, export
from semiseg.finetuning import FineTuneRequest, finetune_config
from semiseg.napari.layers import error_map, geometry_from, labels_array, looks_like_labels
from semiseg.napari.placement import affine_zyx
from semiseg.training import TrainConfig

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "resources" / "hippocampus"


def test_geometry_comes_from_metadata_and_refuses_a_changed_shape():
    geometry = Geometry((0.8, 0.7, 2.5), (-10.0, 5.0, 3.0), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    metadata = {"geometry": geometry.to_dict(), "shape": [4, 5, 6]}
    assert geometry_from(metadata, (4, 5, 6), np.eye(4)) == geometry  # the display transform does not matter
    with pytest.raises(InputError, match="no longer matches"):
        geometry_from(metadata, (4, 5, 7))
    # Without metadata: the layer's full placement, read back exactly; never a guess.
    placed = geometry_from({}, (4, 5, 6), affine_zyx(geometry))
    for ours, theirs in ((placed.spacing, geometry.spacing), (placed.origin, geometry.origin), (placed.direction, geometry.direction)):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    sheared = affine_zyx(geometry)
    sheared[0, 1] = 0.3
    with pytest.raises(InputError, match="shears"):
        geometry_from({}, (4, 5, 6), sheared)
    with pytest.raises(InputError, match="unknown"):
        geometry_from({}, (4, 5, 6))


def test_a_scan_placed_by_another_plugin_keeps_its_full_geometry():
    from napari.layers import Image

    from semiseg.napari.layers import volume_from_layer

    source = read_volume(SAMPLE / "imagesTr" / "hippocampus_001.nii.gz")
    assert source.geometry.direction != Geometry().direction  # not an identity placement
    layer = Image(source.array, affine=affine_zyx(source.geometry))  # no metadata of ours
    assert source.geometry.matches(volume_from_layer(layer).geometry, tolerance=1e-9)


def test_label_detection_and_label_types(tmp_path):
    image = read_volume(SAMPLE / "imagesTr" / "hippocampus_001.nii.gz").array
    assert not looks_like_labels(tmp_path / "scan.nii.gz", image)
    assert looks_like_labels(tmp_path / "scan.nii.gz", (image > 100).astype(np.uint8))
    assert looks_like_labels(tmp_path / "labelsTr" / "x.nii.gz", image)  # a labels* folder decides
    assert not looks_like_labels(tmp_path / "labelsTr" / "x.nii.gz", image.astype(np.float32) + 0.5)
    assert labels_array(np.array([[[0.0, 2.0]]])).dtype == np.uint8
    assert labels_array(np.array([[[0, 300]]])).dtype == np.uint16
    with pytest.raises(InputError):
        labels_array(np.array([[[0, -1]]]))


def test_error_map_classes():
    prediction = np.array([[[0, 1, 1, 2, 0]]])
    reference = np.array([[[0, 0, 1, 1, 2]]])
    assert error_map(prediction, reference).tolist() == [[[0, 1, 0, 3, 2]]]


def test_progress_counts_every_sliding_window_batch(checkpoint):
    model = load_model(checkpoint)
    volume = read_volume(SAMPLE / "imagesTr" / "hippocampus_004.nii.gz")
    for tta in (False, True):
        events = []
        jobs.segment(volume, model, torch.device("cpu"), tta=tta, progress=events.append)
        predicting = [e for e in events if e["stage"] == "predicting" and e["fraction"] > 0]
        assert len(predicting) == network_calls(volume, model.plan, 2, 0.5, tta)
        assert all(e["eta_s"] >= 0 for e in predicting) and predicting[-1]["eta_s"] == 0
        assert events[-1]["fraction"] == 1.0


def test_cancel_stops_inside_the_sliding_window(checkpoint):
    model = load_model(checkpoint)
    volume = read_volume(SAMPLE / "imagesTr" / "hippocampus_004.nii.gz")
    calls = []
    with pytest.raises(jobs.Cancelled):
        jobs.segment(volume, model, torch.device("cpu"), tta=True, progress=calls.append, should_stop=lambda: len(calls) > 3)
    assert len(calls) < network_calls(volume, model.plan, 2, 0.5, True)


def test_finetune_request_of_the_widget_switches_replay(checkpoint, tmp_path, unlabeled_folder):
    """The widget's "also train on labeled scans" box is the recipe's replay: the model's own labeled cases
    (except the corrected scan) beside the correction, or the correction alone; the folder's scans unlabeled."""
    image = str(SAMPLE / "imagesTr" / "hippocampus_001.nii.gz")
    correction = tmp_path / "c.nii.gz"
    shutil.copy(SAMPLE / "labelsTr" / "hippocampus_001.nii.gz", correction)
    base = dict(checkpoint=str(checkpoint), folder=str(unlabeled_folder), image_path=image, label_path=str(correction), iterations=7)

    def split_of(config):
        return select_split(load_dataset(config.data), config.labeled, config.validation, config.unlabeled_cases)

    config = finetune_config(FineTuneRequest(output=str(tmp_path / "a"), **base))
    assert config.data == str(unlabeled_folder) and config.initial_checkpoint == str(checkpoint) and config.iterations == 7
    assert (config.network, config.network_options, config.method) == ("vnet", {"base_filters": 4}, "mean-teacher")
    own = [case for case in read_record(checkpoint).split.labeled if case != "hippocampus_001"]
    split = split_of(config)
    assert own and split.labeled[:len(own)] == own and set(split.labeled[len(own):]) == {"c"}
    assert split.unlabeled == sorted(c.case_id for c in load_dataset(unlabeled_folder).cases)
    config = finetune_config(FineTuneRequest(output=str(tmp_path / "b"), replay=False, **base))
    assert split_of(config).labeled == ["c"]


def test_export_refuses_to_overwrite_unless_asked(tmp_path):
    volume = Volume(np.ones((2, 3, 4), np.uint8), Geometry((0.5, 0.5, 2.0)))
    item = ExportItem("a/b: labels", volume, {"role": "correction"})
    [written] = export([item], tmp_path)
    assert written.name == "a_b__labels.nii.gz"
    with pytest.raises(OutputExistsError):
        export([item], tmp_path)
    assert export([item], tmp_path, overwrite=True) == [written]
    assert json.loads((tmp_path / "a_b__labels.json").read_text())["checkpoint"] is None


def test_training_process_stops_cleanly_when_its_parent_goes_away(tmp_path):
    """The plugin's process dying closes the child's stdin: the child stops as on Cancel, saving
    its last checkpoint (it never keeps training unattended, never leaves a half-written one)."""
    from semiseg.napari.training_process import TrainingProcess

    config = TrainConfig(data=str(SAMPLE), output=str(tmp_path / "run"), method="supervised", network_options={"base_filters": 4},
                         labeled="1", iterations=5000, log_every=1, validate_every=100_000, workers=0, device="cpu")
    process = TrainingProcess(config)
    process.start()
    events: list[dict] = []
    deadline = time.monotonic() + 120
    while not any(e["type"] == "iteration" for e in events) and time.monotonic() < deadline:
        events += process.poll()
        time.sleep(0.1)
    assert any(e["type"] == "iteration" for e in events), events
    process.process.stdin.close()
    closed = time.monotonic()
    assert process.wait(timeout=30) == 0
    assert time.monotonic() - closed < 15
    events += process.poll()
    kinds = [e["type"] for e in events]
    assert "cancelled" in kinds and kinds[-1] == "exit"
    assert 1 <= load_model(tmp_path / "run" / "last").record.iteration < 5000
    process.close()


def test_class_colours_are_far_from_the_error_colours_and_volumes_are_in_millilitres():
    from semiseg.napari.layers import CLASS_COLORS, ERROR_COLORS, UNNAMED_CLASS_COLOR, class_colors, class_volumes_ml
    from semiseg.napari.widgets.formatting import volume_rows

    errors = [np.asarray(ERROR_COLORS[v][:3]) for v in (1, 2, 3)]
    assert min(np.linalg.norm(np.asarray(c[:3]) - e) for c in CLASS_COLORS for e in errors) > 0.4
    colors = class_colors({0: "background", 1: "a", 2: "b"})
    assert colors[0][3] == 0 and colors[1] == CLASS_COLORS[0] and colors.get(9, colors[None]) == UNNAMED_CLASS_COLOR
    assert class_colors({k: str(k) for k in range(9)})[7] == CLASS_COLORS[0]  # more classes than colours: they cycle
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[0, :2, :3] = 1  # 6 voxels
    labels[3, 4, 5] = 3  # 1 voxel, a class the model does not name
    volumes = class_volumes_ml(labels, (2.0, 0.5, 1.5), {0: "background", 1: "a", 2: "b"})
    assert volumes == {1: pytest.approx(6 * 1.5e-3), 2: 0.0, 3: pytest.approx(1.5e-3)}
    rows = volume_rows({"prediction": volumes, "correction": {1: 250.0}}, {1: "a", 2: "b"})
    assert rows == [(1, ["a", "0.009", "250.0"]), (2, ["b", "0.000", ""]), (3, ["class 3", "0.002", ""])]


def test_ct_windows_and_which_scans_are_ct():
    from semiseg.napari.windows import is_ct, window_limits, window_of

    assert window_limits("soft tissue") == (-160.0, 240.0) and window_limits("lung") == (-1350.0, 150.0)
    assert window_of((-500.0, 1300.0)) == "bone" and window_of((0.0, 1.0)) is None
    mr = read_volume(SAMPLE / "imagesTr" / "hippocampus_001.nii.gz").array
    ct = np.full((40, 40, 40), 40.0, np.float32)
    ct[:, :8] = -1000.0  # air around the body
    assert is_ct(ct) and not is_ct(mr)
    assert not is_ct(ct, {"modality": "MR"}) and is_ct(mr, {"modality": "ct"})  # recorded modality first
