"""Scans of several channels (multi-parametric MRI), end to end on real hippocampus MRI; the second
channel is a transformed copy of the first (multichannel_data.py says why)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from semiseg.cli import main
from semiseg.datasets import load_dataset, select_split
from semiseg.errors import InputError
from semiseg.inference import predict_volume
from semiseg.io import Volume, read_scan, read_volume, write_volume
from semiseg.models import load_model
from semiseg.preprocessing import Plan, cached_case, channel_rule, compute_plan, read_case
from semiseg.sampling import PatchDataset, Volumes
from semiseg.training import TrainConfig, train

from multichannel_data import CASES, two_channel_folder, write_4d


def test_a_folder_of_channel_files_is_one_case_per_scan_with_its_channel_names(tmp_path):
    root = two_channel_folder(tmp_path / "data", CASES[:2])
    dataset = load_dataset(root)
    assert dataset.channel_names == ("T2", "ADC")
    assert [len(c.image_files) for c in dataset.cases] == [2, 2]
    assert [Path(f).name for f in dataset.cases[0].image_files] == ["hippocampus_001_0000.nii.gz", "hippocampus_001_0001.nii.gz"]
    assert "channels T2, ADC" in dataset.describe()

    image, label = read_case(dataset.cases[0])
    assert image.channels == 2 and image.array.shape == (2, *label.shape)
    assert np.array_equal(image.array[0], read_volume(dataset.cases[0].image).array)

    (root / "imagesTr" / "hippocampus_004_0001.nii.gz").unlink()
    with pytest.raises(InputError, match=r"'hippocampus_004' lacks channel _0001 \(ADC\)"):
        load_dataset(root)


def test_a_4d_nifti_reads_as_the_stack_of_its_channel_files(tmp_path):
    root = two_channel_folder(tmp_path / "data", CASES[:1])
    files = sorted((root / "imagesTr").iterdir())
    write_4d(*files, tmp_path / "case.nii.gz")
    stacked, separate = read_scan(tmp_path / "case.nii.gz"), read_scan(files)
    assert stacked.array.shape == separate.array.shape == (2, *read_volume(files[0]).shape)
    np.testing.assert_allclose(stacked.array, separate.array, rtol=1e-6)
    assert stacked.geometry.matches(separate.geometry)
    written = read_scan(write_volume(separate, tmp_path / "written.nii.gz"))  # a scan of channels writes as a 4D NIfTI
    np.testing.assert_array_equal(written.array, separate.array)
    assert written.geometry.matches(separate.geometry)
    with pytest.raises(InputError, match="written as a 4D NIfTI"):
        write_volume(separate, tmp_path / "written.nrrd")

    moved = read_volume(files[1])
    geometry = dataclasses.replace(moved.geometry, origin=tuple(o + 5 for o in moved.geometry.origin))
    write_volume(Volume(moved.array, geometry), tmp_path / "moved.nii.gz")
    with pytest.raises(InputError, match="must share one grid"):
        read_scan([files[0], tmp_path / "moved.nii.gz"])


def test_each_channel_is_normalised_by_its_own_rule():
    rng = np.random.default_rng(0)
    mr, ct = rng.normal(300, 50, (8, 8, 8)), rng.normal(40, 400, (8, 8, 8))
    rule = channel_rule(ct.ravel(), ct=True)
    plan = Plan({0: "background", 1: "x"}, (8, 8, 8), None, "zscore", channel_names=("T2", "CT"), channel_normalization=(rule,))
    out = plan.normalize(np.stack([mr, ct]))
    assert out.shape == (2, 8, 8, 8)
    assert abs(out[0].mean()) < 1e-5 and out[0].std() == pytest.approx(1, rel=1e-4)  # z-score per scan
    lo, hi = rule["intensity_clip"]
    expected = (np.clip(ct, lo, hi) - rule["intensity_mean"]) / rule["intensity_std"]
    np.testing.assert_allclose(out[1], expected, rtol=1e-4, atol=1e-5)  # the CT rule: global clip + statistics
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))).normalize(np.stack([mr, ct])) == pytest.approx(out)
    assert plan.key() != Plan({0: "background", 1: "x"}, (8, 8, 8), None, "zscore").key()


def test_the_strong_view_perturbs_each_channel_on_its_own():
    rng = np.random.default_rng(1)
    channel = rng.normal(size=(20, 24, 24)).astype(np.float32)
    volumes = Volumes([np.stack([channel, channel])], [np.zeros((20, 24, 24), np.uint8)])
    for augmentation in ("default", "ua-mt"):
        sample = PatchDataset(volumes, (16, 16, 16), seed=0, augmentation=augmentation)[3]
        assert sample["image"].shape == sample["image_strong"].shape == (2, 16, 16, 16)
        assert torch.equal(sample["image"][0], sample["image"][1])  # the same crop and turn for both channels
        differences = [(sample["image_strong"][c] - sample["image"][c]).abs().mean() for c in range(2)]
        assert sample["image_strong"][0].sub(sample["image_strong"][1]).abs().max() > 1e-3, differences


def test_train_predict_and_the_missing_channel_refusal_on_two_channel_scans(tmp_path, capsys, one_thread):
    root = two_channel_folder(tmp_path / "data")
    events: list[dict] = []
    best = train(TrainConfig(data=str(root), output=str(tmp_path / "run"), method="supervised", network="vnet",
                             network_options={"base_filters": 8}, labeled="4", validation="1", iterations=60, log_every=10,
                             validate_every=60, workers=0, device="cpu", seed=0), events.append)
    losses = [e["loss"] for e in events if e["type"] == "iteration"]
    assert np.mean(losses[-2:]) < 0.85 * np.mean(losses[:2]), losses
    model = load_model(best)
    assert model.record.in_channels == 2 and model.plan.channel_names == ("T2", "ADC")
    assert model.plan.normalization == "zscore" and model.plan.channel_normalization[0]["normalization"] == "zscore"

    main(["info", str(best)])
    assert "input: 0=T2 (zscore), 1=ADC (zscore)" in capsys.readouterr().out

    # A folder of channel files, the first channel's file alone (its siblings found), a 4D NIfTI: one prediction.
    scans = tmp_path / "scans"
    scans.mkdir()
    for channel in ("0000", "0001"):
        shutil.copy(root / "imagesTr" / f"hippocampus_011_{channel}.nii.gz", scans)
    assert main(["predict", str(scans), "--checkpoint", str(best), "--out", str(tmp_path / "folder")]) == 0
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["hippocampus_011.nii.gz"]
    assert main(["predict", str(scans / "hippocampus_011_0000.nii.gz"), "--checkpoint", str(best), "--out", str(tmp_path / "first")]) == 0
    write_4d(scans / "hippocampus_011_0000.nii.gz", scans / "hippocampus_011_0001.nii.gz", tmp_path / "hippocampus_011.nii.gz")
    assert main(["predict", str(tmp_path / "hippocampus_011.nii.gz"), "--checkpoint", str(best), "--out", str(tmp_path / "stack")]) == 0
    folder = read_volume(tmp_path / "folder" / "hippocampus_011.nii.gz")
    for other in ("first", "stack"):
        assert np.array_equal(read_volume(tmp_path / other / "hippocampus_011.nii.gz").array, folder.array)
    image, label = read_case(next(c for c in load_dataset(root).cases if c.case_id == "hippocampus_011"))
    assert folder.geometry.matches(label.geometry) and np.isin(folder.array, [0, 1, 2]).all()

    # Fine-tuning on a correction given by its first channel's file: the channel files beside it come along.
    corrected = tmp_path / "corrected"
    corrected.mkdir()
    for channel in ("0000", "0001"):
        shutil.copy(scans / f"hippocampus_011_{channel}.nii.gz", corrected / f"patient_{channel}.nii.gz")
    shutil.copy(root / "labelsTr" / "hippocampus_011.nii.gz", corrected / "patient.nii.gz")
    correction = f"{corrected / 'patient_0000.nii.gz'}:{corrected / 'patient.nii.gz'}"
    assert main(["finetune", "--checkpoint", str(best), "--corrections", correction, "--data", str(root),
                 "--out", str(tmp_path / "tuned"), "--iterations", "2", "--device", "cpu"]) == 0
    tuned = load_model(tmp_path / "tuned" / "last")
    assert tuned.record.iteration == 2 and tuned.plan.channel_names == ("T2", "ADC")

    (scans / "hippocampus_011_0001.nii.gz").unlink()
    capsys.readouterr()
    assert main(["predict", str(scans / "hippocampus_011_0000.nii.gz"), "--checkpoint", str(best), "--out", str(tmp_path / "x")]) == 2
    assert "missing: ADC (channel 1, file _0001)" in capsys.readouterr().err
    with pytest.raises(InputError, match="this model takes 2"):
        predict_volume(image.channel(0), model.plan, model.predictors(), torch.device("cpu"))


def test_msd_4d_niftis_plan_two_channels_and_a_scan_with_a_third_is_refused(tmp_path):
    files = two_channel_folder(tmp_path / "files", CASES[:3])
    root = tmp_path / "msd"
    (root / "imagesTr").mkdir(parents=True)
    shutil.copytree(files / "labelsTr", root / "labelsTr")
    for case in CASES[:3]:
        write_4d(files / "imagesTr" / f"{case}_0000.nii.gz", files / "imagesTr" / f"{case}_0001.nii.gz", root / "imagesTr" / f"{case}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "T2", "1": "ADC"},
                                                   "labels": {"0": "background", "1": "anterior", "2": "posterior"}}))
    dataset = load_dataset(root)
    split = select_split(dataset, "2", "1", None, 0)
    plan = compute_plan(dataset, split, size_multiple=16)
    assert plan.channel_names == ("T2", "ADC") and plan.in_channels == 2
    image, label = cached_case(dataset.cases[0], plan, with_label=True)
    assert image.shape == (2, *label.shape)

    # napari's reader: one image layer per channel, named by suffix and dataset.json, on the channel's grid
    from semiseg.napari._reader import read_layers
    from semiseg.napari.layers import geometry_from

    layers = read_layers(root / "imagesTr" / f"{CASES[0]}.nii.gz")
    assert [attributes["name"] for _, attributes, _ in layers] == [f"{CASES[0]}_0000 (T2)", f"{CASES[0]}_0001 (ADC)"]
    assert [attributes["metadata"]["channel"] for _, attributes, _ in layers] == [0, 1]
    for channel, (data, attributes, kind) in zip(("0000", "0001"), layers):
        original = read_volume(files / "imagesTr" / f"{CASES[0]}_{channel}.nii.gz")
        assert kind == "image" and geometry_from(attributes["metadata"], data.shape).matches(original.geometry)
        np.testing.assert_allclose(data, original.array, rtol=1e-6)

    three = sitk.JoinSeries([sitk.Cast(sitk.ReadImage(str(files / "imagesTr" / f"{CASES[1]}_0000.nii.gz")), sitk.sitkFloat32)] * 3)
    sitk.WriteImage(three, str(root / "imagesTr" / f"{CASES[1]}.nii.gz"))
    with pytest.raises(InputError, match="differ in their number of channels"):
        compute_plan(load_dataset(root), split, size_multiple=16)
    with pytest.raises(InputError, match=r"3 channels, but this model takes 2 \(T2, ADC\)"):
        cached_case(load_dataset(root).cases[1], plan, with_label=True)
