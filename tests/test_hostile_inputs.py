"""Hostile inputs beyond single files: non-UTF-8 names, symlink loops, and fuzzed readers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from semiseg.cli import main
from semiseg.datasets import load_dataset
from semiseg.io import read_volume, write_volume

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "resources" / "hippocampus"
CASES = ["hippocampus_001.nii.gz", "hippocampus_004.nii.gz", "hippocampus_006.nii.gz"]
# Names as a Latin-1 system writes them: bytes that are not UTF-8, which Python keeps as surrogates.
LATIN1 = os.fsdecode(b"r\xe9sultat")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_non_utf8_folder_and_file_names_round_trip(tmp_path, suffix):
    source = read_volume(SAMPLE / "imagesTr" / CASES[0])
    folder = tmp_path / os.fsdecode(b"dossier_\xe0")
    folder.mkdir()
    path = write_volume(source, folder / f"{LATIN1}{suffix}")
    assert os.fsencode(path.name) in os.listdir(os.fsencode(folder))
    back = read_volume(path)
    assert back.geometry == source.geometry
    np.testing.assert_array_equal(back.array, source.array)
    assert os.listdir(folder) == [path.name]  # no temporary left beside it


def test_training_and_prediction_on_a_dataset_with_non_utf8_names(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEMISEG_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    for sub in ("imagesTr", "labelsTr"):
        (data / sub).mkdir(parents=True)
        for name in CASES:
            shutil.copy(SAMPLE / sub / name, data / sub / f"{LATIN1}_{name}")
    shutil.copy(SAMPLE / "dataset.json", data)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--method", "supervised", "--labeled", "100%", "--network-option", "base_filters=4",
                 "--iterations", "2", "--validation", "1", "--workers", "0", "--device", "cpu"]) == 0
    split = json.loads((run / "best" / "model.json").read_text())["split"]
    assert sorted(split["labeled"] + split["validation"]) == sorted(f"{LATIN1}_{n[:-7]}" for n in CASES)
    out = tmp_path / os.fsdecode(b"pr\xe9dictions")
    assert main(["predict", str(data / "imagesTr"), "--checkpoint", str(run / "best"), "--out", str(out), "--device", "cpu"]) == 0
    written = sorted(os.listdir(out))
    assert written == sorted(f"{LATIN1}_{n}" for n in CASES)
    assert read_volume(out / written[0]).geometry == read_volume(data / "imagesTr" / written[0]).geometry
    assert "r\\udce9sultat" in capsys.readouterr().out  # printed escaped, not a UnicodeEncodeError


def test_symlink_loops_in_dataset_folders_are_not_followed(tmp_path):
    data = tmp_path / "data"
    for sub in ("imagesTr", "labelsTr"):
        (data / sub).mkdir(parents=True)
        shutil.copy(SAMPLE / sub / CASES[0], data / sub / CASES[0])
    (data / "imagesTr" / "loop").symlink_to(data)
    (data / "labelsTr" / "self").symlink_to(data / "labelsTr")
    (data / "imagesTs").symlink_to(data / "imagesTs")  # a link to itself: ELOOP when opened
    dataset = load_dataset(data)
    assert [c.case_id for c in dataset.cases] == ["hippocampus_001"]

    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(SAMPLE / "imagesTs" / sorted(os.listdir(SAMPLE / "imagesTs"))[0], flat / "scan.nii.gz")
    (flat / "loop").symlink_to(flat)
    (flat / "a").symlink_to(flat / "b")
    (flat / "b").symlink_to(flat / "a")
    assert [c.case_id for c in load_dataset(flat).cases] == ["scan"]


@pytest.mark.slow
def test_fuzzed_volume_files_give_a_volume_or_one_clear_error(tmp_path):
    # Byte mutations of real NIfTI/NRRD/MHA/h5 files for 15 s; before h5py's own errors were
    # translated, this found damaged h5 files raising RuntimeError/KeyError within seconds.
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz_readers.py"), "--seconds", "15", "--seed", "0",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    summary = json.loads(result.stdout)
    assert summary["tried"] > 500
    assert summary["findings"] == [] and summary["crashes"] == [], result.stdout[:3000]
    assert result.returncode == 0
