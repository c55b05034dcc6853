"""Uncertain regions within one scan: on the bundled default model's real prediction and on known blobs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from semiseg.errors import InputError
from semiseg.inference import predict_volume
from semiseg.io import Geometry, Volume, read_volume
from semiseg.models import load_model
from semiseg.regions import DEFAULT_THRESHOLD, uncertain_regions

RESOURCES = Path(__file__).resolve().parents[1] / "resources"


@pytest.fixture(scope="module")
def real_prediction():
    torch.set_num_threads(1)
    model = load_model(RESOURCES / "models" / "default")
    scan = read_volume(RESOURCES / "hippocampus" / "imagesTs" / "hippocampus_036.nii.gz")
    return predict_volume(scan, model.plan, model.predictors(), torch.device("cpu"), overlap=model.overlap), model.record.class_names


def test_regions_of_a_real_prediction_are_ranked_connected_and_measured(real_prediction):
    prediction, class_names = real_prediction
    entropy, labels = prediction.entropy.array, prediction.labels.array
    regions = uncertain_regions(prediction.entropy, prediction.labels, class_names, min_voxels=1)
    assert len(regions) >= 2
    assert [r.rank for r in regions] == list(range(1, len(regions) + 1))
    sums = [r.uncertainty_sum for r in regions]
    assert sums == sorted(sums, reverse=True)
    above = entropy > DEFAULT_THRESHOLD
    assert sum(r.voxels for r in regions) == int(above.sum())  # every voxel above the threshold is in one region
    voxel_ml = np.prod(prediction.entropy.geometry.spacing) / 1000
    for region in regions:
        # The region's voxels: those face-connected to its most uncertain voxel through voxels above the threshold.
        seed = np.zeros_like(above)
        seed[region.peak_voxel] = True
        grown = ndimage.binary_propagation(seed, mask=above)
        assert entropy[grown].min() > DEFAULT_THRESHOLD
        assert int(grown.sum()) == region.voxels
        assert region.volume_ml == pytest.approx(region.voxels * voxel_ml)
        assert region.uncertainty_sum == pytest.approx(float(entropy[grown].astype(np.float64).sum()))
        assert region.uncertainty_max == pytest.approx(float(entropy[grown].max()))
        box = tuple(slice(*bounds) for bounds in region.bounding_box)
        assert grown[box].sum() == grown.sum() and all(grown[box].any(axis=a).all() for a in ((1, 2), (0, 2), (0, 1)))
        np.testing.assert_allclose(region.centre_voxel, np.argwhere(grown).mean(0))
        assert region.class_id == np.bincount(labels[grown]).argmax()
        assert region.class_name == class_names[region.class_id]
    # Speckle is dropped by the minimum size, the order kept.
    large = uncertain_regions(prediction.entropy, prediction.labels, class_names, min_voxels=8)
    assert [r.voxels for r in large] == [r.voxels for r in regions if r.voxels >= 8]


def test_two_known_blobs_give_exactly_those_regions():
    geometry = Geometry(spacing=(0.7, 1.5, 2.0), origin=(10.0, -5.0, 3.0), direction=(0, 1, 0, -1, 0, 0, 0, 0, 1))
    uncertainty = np.zeros((20, 30, 40), dtype=np.float32)
    labels = np.zeros(uncertainty.shape, dtype=np.uint8)
    uncertainty[2:5, 3:7, 4:9] = 0.9  # small but very uncertain: 60 voxels, sum 54
    labels[2:5, 3:7, 4:9] = 2
    uncertainty[10:16, 10:20, 20:30] = 0.6  # large, less uncertain: 600 voxels, sum 360
    labels[10:16, 10:20, 20:24] = 1  # 240 voxels of class 1, 360 of background
    uncertainty[0, 0, 0] = 0.8  # a single voxel: speckle
    uncertainty[18, 25, 30:35] = 0.4  # below the threshold
    names = {0: "background", 1: "Anterior", 2: "Posterior"}
    regions = uncertain_regions(Volume(uncertainty, geometry), Volume(labels, geometry), names)
    voxel_ml = 0.7 * 1.5 * 2.0 / 1000
    assert [(r.voxels, r.class_name) for r in regions] == [(600, "background"), (60, "Posterior")]
    assert [r.volume_ml for r in regions] == pytest.approx([600 * voxel_ml, 60 * voxel_ml])
    assert [r.uncertainty_sum for r in regions] == pytest.approx([360.0, 54.0], rel=1e-6)
    assert regions[0].bounding_box == ((10, 16), (10, 20), (20, 30))
    assert regions[1].centre_voxel == (3.0, 4.5, 6.0)
    image = sitk.Image(40, 30, 20, sitk.sitkUInt8)
    geometry.apply_to(image)
    expected = image.TransformContinuousIndexToPhysicalPoint((6.0, 4.5, 3.0))
    np.testing.assert_allclose(regions[1].centre_physical, expected)


def test_mismatched_maps_and_thresholds_are_clear_errors():
    volume = Volume(np.zeros((4, 4, 4), dtype=np.float32), Geometry())
    with pytest.raises(InputError, match="shape"):
        uncertain_regions(volume, Volume(np.zeros((4, 4, 5), dtype=np.uint8), Geometry()), {})
    with pytest.raises(InputError, match="threshold"):
        uncertain_regions(volume, Volume(np.zeros((4, 4, 4), dtype=np.uint8), Geometry()), {}, threshold=1.5)
