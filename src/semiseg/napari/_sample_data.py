"""Sample data: one hippocampus MRI with its reference labels (MSD Task04, CC-BY-SA 4.0), shipped in
the package (`samples/`, see samples/ATTRIBUTION.md) so that it works from any installation."""

from __future__ import annotations

from pathlib import Path

from semiseg.errors import InputError

SAMPLES = Path(__file__).resolve().parent / "samples"
HIPPOCAMPUS_IMAGE = SAMPLES / "hippocampus_001.nii.gz"
HIPPOCAMPUS_LABEL = SAMPLES / "labels" / "hippocampus_001.nii.gz"
HIPPOCAMPUS_CLASSES = {0: "background", 1: "Anterior", 2: "Posterior"}


def hippocampus() -> list[tuple]:
    from semiseg.io import read_volume
    from semiseg.napari.layers import jsonable_names, volume_layer_data

    for path in (HIPPOCAMPUS_IMAGE, HIPPOCAMPUS_LABEL):
        if not path.is_file():
            raise InputError(f"{path}: the sample file is missing from this installation (reinstall napari-semiseg)")
    image = volume_layer_data(read_volume(HIPPOCAMPUS_IMAGE), "hippocampus_001", "image", str(HIPPOCAMPUS_IMAGE))
    label = volume_layer_data(read_volume(HIPPOCAMPUS_LABEL), "hippocampus_001 labels", "labels", str(HIPPOCAMPUS_LABEL),
                              image_path=str(HIPPOCAMPUS_IMAGE), class_names=jsonable_names(HIPPOCAMPUS_CLASSES))
    image[1]["colormap"] = "gray"
    label[1]["opacity"] = 0.5
    return [image, label]
