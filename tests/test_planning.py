"""Anisotropic planning as nnU-Net plans it, on real scans: the isotropic hippocampus, the DICOM CT
series (0.98 x 0.98 x 2 mm) and hippocampus scans resampled to thick slices (3.5 to 5 mm)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from semiseg.cli import main
from semiseg.datasets import Case, Dataset, Split, choose_split, load_dataset
from semiseg.errors import InputError
from semiseg.inference import predict_volume
from semiseg.io import read_volume
from semiseg.methods import build_method
from semiseg.methods.base import NetworkSpec, StepInfo
from semiseg.models import load_model
from semiseg.networks import build_network, pooling_options, size_multiple
from semiseg.preprocessing import compute_plan
from semiseg.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "resources" / "hippocampus"
DICOM = ROOT.parent / "shared" / "data" / "samples" / "example_ct_dicom"
CASES = ["hippocampus_001", "hippocampus_004", "hippocampus_006", "hippocampus_007"]
SLICE_MM = [3.5, 4.0, 4.5, 5.0]  # one slice thickness per resampled case


def _thick_slices(folder: Path) -> Path:
    """The four cases resampled (linear; labels nearest) from 1 mm to SLICE_MM along z."""
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    for case, thickness in zip(CASES, SLICE_MM):
        for sub, interpolator in (("imagesTr", sitk.sitkLinear), ("labelsTr", sitk.sitkNearestNeighbor)):
            image = sitk.ReadImage(str(SAMPLE / sub / f"{case}.nii.gz"))
            spacing = (image.GetSpacing()[0], image.GetSpacing()[1], thickness)
            size = [image.GetSize()[0], image.GetSize()[1], int(round(image.GetSize()[2] * image.GetSpacing()[2] / thickness))]
            resampled = sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), spacing, image.GetDirection(), 0)
            sitk.WriteImage(resampled, str(folder / sub / f"{case}.nii.gz"))
    shutil.copy(SAMPLE / "dataset.json", folder)
    return folder


def test_the_isotropic_hippocampus_pools_every_axis_alike():
    dataset = load_dataset(SAMPLE)
    plan = compute_plan(dataset, choose_split(dataset, "100%"), 16, per_axis_pooling=True)
    assert plan.low_resolution_axis is None and plan.target_spacing is None  # all scans share 1 mm
    assert plan.pooling == ((2, 2, 2),) * 4 and plan.kernel_sizes == ((3, 3, 3),) * 5
    assert all(side % 16 == 0 for side in plan.patch_size)


@pytest.mark.skipif(not DICOM.is_dir(), reason="needs ../shared/data")
def test_the_dicom_series_keeps_its_2_mm_slices_unpooled_at_the_first_stage():
    dataset = Dataset(str(DICOM.parent), "test", [Case("ct", str(DICOM))], {0: "background", 1: "body"}, "CT")
    plan = compute_plan(dataset, Split(["ct"], [], [], 0), 16, per_axis_pooling=True)
    # 2 mm is over twice 0.98 mm: z waits one stage; under 3x, it is no low-resolution axis.
    assert plan.low_resolution_axis is None
    assert plan.pooling == ((1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    assert plan.kernel_sizes == ((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
    assert plan.patch_size == (16, 160, 160)  # 20 slices: a multiple of z's 8, not of 16
    # Without per-axis pooling (a network pooling every axis alike) the patch is a multiple of 16.
    assert compute_plan(dataset, Split(["ct"], [], [], 0), 16).pooling is None


def test_thick_slices_keep_their_axis_and_train_a_network_pooling_per_axis(tmp_path, one_thread, capsys):
    data = _thick_slices(tmp_path / "thick")
    dataset = load_dataset(data)
    split = choose_split(dataset, "100%")
    plan = compute_plan(dataset, split, 16, per_axis_pooling=True)
    # z is over 3x coarser: it takes the 10th percentile of the slice thicknesses, not the median.
    assert plan.low_resolution_axis == 0
    assert plan.target_spacing[0] == np.percentile(SLICE_MM, 10) and plan.target_spacing[1:] == (1.0, 1.0)
    assert plan.pooling == ((1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    assert plan.patch_size[0] == 8  # 35 mm / 3.65 mm: 9 slices, a multiple of 8 (16 would pool z to nothing)

    config = TrainConfig(data=str(data), output=str(tmp_path / "run"), method="supervised", network="vnet",
                         network_options={"base_filters": 4}, labeled="100%", validation="0", iterations=2, workers=0, device="cpu")
    best = train(config)
    model = load_model(best)
    assert model.record.network_options["strides"] == [[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert model.plan.pooling == plan.pooling
    scan = read_volume(data / "imagesTr" / f"{CASES[0]}.nii.gz")
    prediction = predict_volume(scan, model.plan, model.predictors(), torch.device("cpu"))
    assert prediction.labels.shape == scan.shape
    assert main(["info", str(best)]) == 0
    printed = capsys.readouterr().out
    assert "low-resolution axis: z (its 10th-percentile spacing)" in printed
    assert "pooling per stage: 1x2x2, 2x2x2, 2x2x2, 2x2x2 (z, y, x strides)" in printed


def test_the_residual_unet_takes_the_plans_strides_and_kernels():
    strides = [[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    kernels = [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    network = build_network("residual-unet", 1, 3, base_filters=4, strides=strides, kernel_sizes=kernels)
    assert network.reduction == [8, 16, 16]
    with torch.no_grad():
        assert network(torch.zeros(1, 1, 8, 32, 32)).shape == (1, 3, 8, 32, 32)
    json.dumps({"strides": strides, "kernel_sizes": kernels})  # the options a checkpoint records are JSON


@pytest.mark.parametrize("name, options", [("unet", {"features": [4, 8, 16, 32, 64, 8]}),
                                           ("uxnet", {"base_filters": 4, "depths": [1, 1, 1, 1]})])
def test_monais_unet_and_the_uxnet_take_the_plans_strides(name, options):
    strides = [[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    network = build_network(name, 1, 3, **options, **pooling_options(name, strides, []))
    assert network.reduction == [8, 16, 16] and size_multiple(network) == 8
    with torch.no_grad():
        assert network(torch.zeros(1, 1, 8, 32, 32)).shape == (1, 3, 8, 32, 32)
    # Strides of 2 everywhere build the network as before: same weights, same output.
    torch.manual_seed(0)
    before = build_network(name, 1, 3, **options).eval()
    same = build_network(name, 1, 3, **options, strides=[[2, 2, 2]] * 4).eval()
    same.load_state_dict(before.state_dict())
    image = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(same(image), before(image))


def test_every_method_on_a_pooling_network_trains_on_a_thick_slice_patch(one_thread):
    """An (8, 32, 32) patch, z pooled 3 times: each method's networks (the spectral encoder of sscl,
    the second subnet of dual-subnet included) pool as the plan says; a second subnet that cannot is refused."""
    strides = [[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    kernels = [[1, 3, 3]] + [[3, 3, 3]] * 4
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, 1, 8, 32, 32, generator=generator)
    label = torch.randint(0, 3, (2, 1, 8, 32, 32), generator=generator)
    tiny_kmax = {"queries": 6, "query_dim": 16, "ffn_dim": 32, "heads": 2, "layers_per_scale": 1}
    for name in ("supervised", "mean-teacher", "cps", "sscl", "dual-subnet", "voxel-adversarial", "bcp", "3d-cps", "dk-uxnet"):
        network = {"3d-cps": "residual-unet", "dk-uxnet": "uxnet"}.get(name, "vnet")
        method = build_method(name, 1, 3, NetworkSpec(network, {"base_filters": 4, **pooling_options(network, strides, kernels)}),
                              tiny_kmax if name == "dk-uxnet" else None)
        losses = method.training_step({"image": image, "label": label, "image_strong": image},
                                      {"image": -image, "image_strong": -image}, StepInfo(60, 100))
        assert all(torch.isfinite(v) for v in losses.values()), name
    with pytest.raises(InputError, match="second_network 'resnet' cannot pool per axis"):  # its own strides fix its topology
        build_method("dual-subnet", 1, 3, NetworkSpec("vnet", {"strides": strides}),
                     {"second_network": "resnet", "second_network_options": {"strides": [[2, 2, 2]] * 4}})
