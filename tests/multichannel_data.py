"""Two-channel scans for the tests, made from real hippocampus MRI.

No multi-channel data ships with the tests, so each scan's second channel ("ADC") is a transformed
copy of its real first channel ("T2"): the square root of the intensities, inverted. That exercises
the mechanics (files per channel, 4D NIfTI, per-channel normalisation, in_channels, the channel check
at prediction), not what a second real sequence adds to the Dice.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from semiseg.io import Volume, read_volume, write_volume

SAMPLE = Path(__file__).resolve().parents[1] / "resources" / "hippocampus"
CASES = ["hippocampus_001", "hippocampus_004", "hippocampus_006", "hippocampus_007", "hippocampus_011"]


def second_channel(volume: Volume) -> Volume:
    array = volume.array.astype(np.float32)
    return Volume((np.sqrt(array).max() - np.sqrt(array)).astype(np.float32), volume.geometry)


def two_channel_folder(root: Path, cases: list[str] = CASES, names: dict | None = None) -> Path:
    """An nnU-Net v2 folder of two-channel scans: case_0000 (real), case_0001 (derived), labels."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case in cases:
        image = read_volume(SAMPLE / "imagesTr" / f"{case}.nii.gz")
        write_volume(image, root / "imagesTr" / f"{case}_0000.nii.gz")
        write_volume(second_channel(image), root / "imagesTr" / f"{case}_0001.nii.gz")
        shutil.copy(SAMPLE / "labelsTr" / f"{case}.nii.gz", root / "labelsTr" / f"{case}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": names or {"0": "T2", "1": "ADC"},
        "labels": {"background": 0, "anterior": 1, "posterior": 2}, "file_ending": ".nii.gz"}))
    return root


def write_4d(first: Path, second: Path, target: Path) -> None:
    """The two channel files as one 4D NIfTI, channels on the 4th axis (as MSD ships BrainTumour)."""
    images = [sitk.ReadImage(str(first)), sitk.ReadImage(str(second), sitk.sitkFloat32)]
    sitk.WriteImage(sitk.JoinSeries([sitk.Cast(images[0], sitk.sitkFloat32), images[1]]), str(target))
