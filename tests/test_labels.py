"""Labels as users have them, on real hippocampus and CT label maps: non-contiguous label values
mapped to channels and back, an ignore value for partially annotated scans left out of the loss
and the metrics, and per-class metrics that stay fast with many classes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from semiseg.cli import main
from semiseg.datasets import choose_split, class_names_in, ignore_label_in, load_dataset
from semiseg.errors import InputError
from semiseg.inference import predict_volume
from semiseg.io import read_volume
from semiseg.labels import IGNORE_INDEX, channels_to_values, values_to_channels
from semiseg.methods import METHODS, build_method, register_method
from semiseg.methods.base import Method, NetworkSpec, StepInfo, make_supervised_loss
from semiseg.methods.dk_uxnet import class_balanced_nll
from semiseg.metrics import binary_metrics, case_metrics
from semiseg.models import load_model
from semiseg.preprocessing import cached_case, compute_plan
from semiseg.sampling import _foreground_points
from semiseg.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "resources" / "hippocampus"
BUNDLED = ROOT / "resources" / "models" / "default"
CT_LABELS = ROOT.parent / "shared" / "data" / "samples" / "example_seg.nii.gz"  # 41 organ values from 0 to 117
needs_ct_labels = pytest.mark.skipif(not CT_LABELS.is_file(), reason="needs ../shared/data")
CASES = ["hippocampus_001", "hippocampus_004", "hippocampus_006", "hippocampus_007", "hippocampus_011"]
REMAP = {0: 0, 1: 2, 2: 7}
IGNORE = 255
SLAB = 8  # the first z slices of each partially annotated label are unannotated


def _dataset(folder: Path, relabel, labels_json: dict) -> Path:
    """A copy of five bundled hippocampus cases with each label array passed through `relabel`."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case in CASES:
        shutil.copy(SAMPLE / "imagesTr" / f"{case}.nii.gz", folder / "imagesTr")
        image = sitk.ReadImage(str(SAMPLE / "labelsTr" / f"{case}.nii.gz"))
        relabeled = sitk.GetImageFromArray(relabel(sitk.GetArrayFromImage(image)).astype(np.uint8))
        relabeled.CopyInformation(image)
        sitk.WriteImage(relabeled, str(folder / "labelsTr" / f"{case}.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({"labels": labels_json, "modality": {"0": "MRI"}}))
    return folder


def _remapped(array: np.ndarray) -> np.ndarray:
    return np.vectorize(REMAP.get)(array)


def _partial(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array[:SLAB] = IGNORE
    return array


def _config(data: Path, output: Path, **overrides) -> TrainConfig:
    settings = dict(data=str(data), output=str(output), method="supervised", network="vnet", network_options={"base_filters": 8},
                    labeled="3", validation="1", iterations=6, validate_every=6, log_every=3, workers=0, device="cpu", seed=0)
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same short run on the original labels (0, 1, 2) and on labels 0, 2, 7."""
    root = tmp_path_factory.mktemp("labels")
    original = _dataset(root / "original", lambda a: a, {"background": 0, "Anterior": 1, "Posterior": 2})
    remapped = _dataset(root / "remapped", _remapped, {"background": 0, "Anterior": 2, "Posterior": 7})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        events = {name: [] for name in ("original", "remapped")}
        best = {name: train(_config(data, root / f"run-{name}"), events[name].append)
                for name, data in (("original", original), ("remapped", remapped))}
    finally:
        torch.set_num_threads(threads)
    return root, {"original": original, "remapped": remapped}, best, events


def test_non_contiguous_values_train_on_contiguous_channels_with_the_same_result(runs):
    _, _, best, events = runs
    original, remapped = load_model(best["original"]), load_model(best["remapped"])
    assert remapped.plan.label_values == (0, 2, 7) and remapped.record.num_classes == 3
    assert original.plan.label_values == (0, 1, 2)
    # Deterministic CPU training on the same channels: the same weights, the same validation Dice.
    weights_a, weights_b = original.method.state_dict(), remapped.method.state_dict()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    validation = {name: [e for e in events[name] if e["type"] == "validation"][-1] for name in events}
    assert validation["original"]["dice_mean"] == validation["remapped"]["dice_mean"]
    assert set(validation["remapped"]["dice_per_class"]) == {"Anterior", "Posterior"}


def test_predictions_and_exported_files_hold_the_users_values(runs, tmp_path, capsys):
    root, data, best, _ = runs
    model = load_model(best["remapped"])
    image = read_volume(data["remapped"] / "imagesTr" / f"{CASES[0]}.nii.gz")
    prediction = predict_volume(image, model.plan, model.predictors(), torch.device("cpu"))
    reference = load_model(best["original"])
    expected = predict_volume(image, reference.plan, reference.predictors(), torch.device("cpu"))
    np.testing.assert_array_equal(prediction.labels.array, _remapped(expected.labels.array))
    assert prediction.labels.array.dtype == np.uint8

    out = tmp_path / "predicted"
    assert main(["predict", str(data["remapped"] / "imagesTr"), "--checkpoint", str(best["remapped"]), "--out", str(out),
                 "--probabilities"]) == 0
    for case in CASES:
        written = read_volume(out / f"{case}.nii.gz").array
        assert set(np.unique(written).tolist()) <= {0, 2, 7}
    probability_7 = read_volume(out / f"{CASES[0]}_probability_7.nii.gz").array
    np.testing.assert_allclose(probability_7, prediction.probabilities[2], atol=1e-6)
    assert not (out / f"{CASES[0]}_probability_1.nii.gz").exists()

    # The same Dice as the original values' run, per class, from `semiseg evaluate`.
    reference_out = tmp_path / "reference"
    main(["predict", str(data["original"] / "imagesTr"), "--checkpoint", str(best["original"]), "--out", str(reference_out)])
    for name, predictions in (("remapped", out), ("original", reference_out)):
        assert main(["evaluate", "--predictions", str(predictions), "--labels", str(data[name] / "labelsTr"),
                     "--checkpoint", str(best[name]), "--out", str(tmp_path / f"evaluation-{name}")]) == 0
    rows = {name: [line.split(",")[:3] for line in (tmp_path / f"evaluation-{name}" / "metrics.csv").read_text().splitlines()[1:]]
            for name in ("remapped", "original")}
    assert rows["remapped"] == rows["original"] and len(rows["remapped"]) == 2 * len(CASES)

    capsys.readouterr()
    main(["info", str(best["remapped"])])
    assert "output channels -> label values: 0->0, 1->2, 2->7  ignore label: none" in capsys.readouterr().out


def test_partially_annotated_scans_train_with_the_ignored_voxels_left_out(tmp_path, one_thread):
    data = _dataset(tmp_path / "partial", _partial, {"background": 0, "Anterior": 1, "Posterior": 2, "ignore": IGNORE})
    assert class_names_in(data) == {0: "background", 1: "Anterior", 2: "Posterior"} and ignore_label_in(data) == IGNORE
    dataset = load_dataset(data)
    assert dataset.ignore_label == IGNORE and "ignore label 255" in dataset.describe()
    events: list[dict] = []
    best = train(_config(data, tmp_path / "run"), events.append)
    model = load_model(best)
    assert model.plan.ignore_label == IGNORE and model.plan.label_values == (0, 1, 2)
    validation = [e for e in events if e["type"] == "validation"][-1]
    assert 0 <= validation["dice_mean"] <= 1
    # The preprocessed label marks the slab as ignored; no foreground patch is centred there.
    _, label = cached_case(dataset.labeled[0], model.plan, with_label=True)
    assert (np.asarray(label)[:SLAB] == IGNORE_INDEX).all() and np.asarray(label)[SLAB:].max() == 2
    points = _foreground_points(np.asarray(label), 0)
    assert len(points) == 2 and all((p[:, 0] >= SLAB).all() for p in points)
    prediction = predict_volume(read_volume(data / "imagesTr" / f"{CASES[0]}.nii.gz"), model.plan, model.predictors(), torch.device("cpu"))
    assert IGNORE not in np.unique(prediction.labels.array)


@pytest.mark.parametrize("kind", ["dice+ce", "half-dice+ce", "dice"])
def test_the_masked_loss_is_the_loss_of_the_annotated_voxels_alone(kind):
    """A real label with its first slices unannotated: the loss equals the unmasked loss of the
    annotated slices cut out, no gradient reaches an ignored voxel, and a batch without an ignored
    voxel gets the unmasked loss bit for bit."""
    label = torch.from_numpy(read_volume(SAMPLE / "labelsTr" / f"{CASES[0]}.nii.gz").array.astype(np.int64))[None, None]
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, *label.shape[2:], generator=generator).requires_grad_(True)
    partial = label.clone()
    partial[:, :, :SLAB] = IGNORE_INDEX
    masked, unmasked = make_supervised_loss(kind, ignore_label=True), make_supervised_loss(kind)
    loss = masked(logits, partial)
    expected = unmasked(logits[:, :, SLAB:], label[:, :, SLAB:])
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    loss.backward()
    assert logits.grad[:, :, :SLAB].abs().max() == 0 and logits.grad[:, :, SLAB:].abs().max() > 0
    assert torch.equal(masked(logits, label), unmasked(logits, label))


TINY_NETWORKS = {"dk-uxnet": NetworkSpec("uxnet", {"base_filters": 4, "depths": [1, 1, 1, 1]}),
                 "3d-cps": NetworkSpec("residual-unet", {"base_filters": 4, "downsamplings": 2})}
TINY_OPTIONS = {"dk-uxnet": {"queries": 6, "query_dim": 16, "ffn_dim": 32, "heads": 2, "layers_per_scale": 1}}


def test_every_built_in_method_trains_on_partial_labels_and_a_method_that_cannot_is_refused(one_thread):
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, 1, 16, 32, 16, generator=generator)
    label = torch.randint(0, 3, (2, 1, 16, 32, 16), generator=generator)
    label[:, :, :4] = IGNORE_INDEX
    labeled = {"image": image, "label": label, "image_strong": image + 0.1}
    unlabeled = {"image": -image, "image_strong": -image + 0.1}
    for name in ("supervised", "mean-teacher", "cps", "sscl", "3d-cps", "dual-subnet", "voxel-adversarial", "dk-uxnet", "bcp"):
        torch.manual_seed(0)
        method = build_method(name, 1, 3, TINY_NETWORKS.get(name, NetworkSpec("vnet", {"base_filters": 4})), TINY_OPTIONS.get(name),
                              ignore_label=True)
        losses = method.training_step(labeled, unlabeled, StepInfo(50, 100))
        assert losses and all(torch.isfinite(v) for v in losses.values()), (name, losses)

    class ReadsLabels(Method):
        name = "reads-labels"
        summary = "a method that does not declare handles_ignore_label"

    register_method(ReadsLabels)
    try:
        with pytest.raises(InputError, match="method 'reads-labels' cannot train with an ignore label"):
            build_method("reads-labels", 1, 3, NetworkSpec(), ignore_label=True)
    finally:
        del METHODS["reads-labels"]


def test_bcp_and_dk_uxnet_leave_ignored_voxels_out_of_their_own_label_losses():
    """Their label terms beyond the supervised loss: an ignored voxel counts as a voxel outside
    bcp's region, and as no voxel at all in dk-uxnet's class-balanced query NLL."""
    label = torch.from_numpy(read_volume(SAMPLE / "labelsTr" / f"{CASES[0]}.nii.gz").array.astype(np.int64))[None, None]
    logits = torch.randn(1, 3, *label.shape[2:], generator=torch.Generator().manual_seed(0))
    partial = label.clone()
    partial[:, :, :SLAB] = IGNORE_INDEX
    bcp = build_method("bcp", 1, 3, NetworkSpec("vnet", {"base_filters": 4}), ignore_label=True)
    region = torch.zeros(label.shape[2:], dtype=torch.bool)
    region[4:, 10:40] = True
    annotated_region = region.clone()
    annotated_region[:SLAB] = False
    assert float(bcp.region_loss(logits, partial, region)) == pytest.approx(float(bcp.region_loss(logits, label, annotated_region)), rel=1e-6)
    log_probs = torch.log_softmax(logits, 1)
    annotated = log_probs[:, :, SLAB:].movedim(1, -1).reshape(-1, 3), label[:, 0, SLAB:].reshape(-1)
    assert float(class_balanced_nll(log_probs, partial[:, 0])) == pytest.approx(float(class_balanced_nll(*annotated)), rel=1e-6)


def test_the_ignore_value_must_not_be_a_class(tmp_path):
    data = _dataset(tmp_path / "clash", _partial, {"background": 0, "Anterior": 1, "Posterior": 2})
    with pytest.raises(InputError, match="ignore label 2 is also a class"):
        train(_config(data, tmp_path / "run", ignore_label=2))
    # Without the ignore value, 255 is a value outside the declared classes, named with its file.
    with pytest.raises(InputError, match=r"label values \[255\] are outside the declared classes"):
        train(_config(data, tmp_path / "run", overwrite=True))


def test_without_class_names_the_classes_are_the_label_values_but_the_ignore_value(tmp_path):
    data = _dataset(tmp_path / "unnamed", _partial, {})
    dataset = load_dataset(data)
    split = choose_split(dataset, "3", "1")
    plan = compute_plan(dataset, split, 16, ignore_label=IGNORE)
    assert plan.class_names == {0: "background", 1: "class 1", 2: "class 2"} and plan.ignore_label == IGNORE


def test_a_plan_from_before_the_mapping_predicts_as_it_did():
    """The bundled model's plan (checkpoint format 1) has no label mapping: channel i is value i,
    and the label map is the argmax of the probabilities, as uint8, exactly as before."""
    model = load_model(BUNDLED)
    assert model.plan.label_values is None and model.plan.ignore_label is None
    assert model.plan.channel_values == (0, 1, 2) and "label_values" not in model.plan.to_dict()
    prediction = predict_volume(read_volume(SAMPLE / "imagesTr" / f"{CASES[0]}.nii.gz"), model.plan, model.predictors(), torch.device("cpu"))
    np.testing.assert_array_equal(prediction.labels.array, prediction.probabilities.argmax(0).astype(np.uint8))
    assert prediction.labels.array.dtype == np.uint8


@needs_ct_labels
def test_label_values_map_to_channels_and_back():
    label = read_volume(CT_LABELS).array
    values = sorted(np.unique(label).tolist())
    channels = values_to_channels(label, values, None)
    assert channels.dtype == np.uint8 and channels.max() == len(values) - 1
    np.testing.assert_array_equal(channels_to_values(channels, values), label)
    partial = label.copy()
    partial[:5] = IGNORE
    channels = values_to_channels(partial, [v for v in values if v != IGNORE], IGNORE)
    assert (channels[:5] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(channels_to_values(channels[5:], values), label[5:])
    assert channels_to_values(np.array([0, 1]), [0, 300]).dtype == np.uint16


def _whole_volume_metrics(prediction, reference, class_ids, spacing):
    """The implementation before the per-class boxes: each class's masks over the whole volume."""
    return {c: binary_metrics(prediction == c, reference == c, spacing) for c in class_ids}


@needs_ct_labels
def test_per_class_boxes_give_the_whole_volume_results_on_real_label_maps():
    ct = read_volume(CT_LABELS)
    reference = ct.array
    prediction = np.roll(reference, (1, -2, 1), axis=(0, 1, 2))  # a misplaced copy: every distance nonzero
    class_ids = sorted(set(np.unique(reference).tolist()) - {0}) + [200]  # 200: in neither map
    spacing = ct.geometry.spacing_zyx
    boxed, whole = case_metrics(prediction, reference, class_ids, spacing), _whole_volume_metrics(prediction, reference, class_ids, spacing)
    for class_id in class_ids:
        for metric, value in whole[class_id].items():
            np.testing.assert_allclose(boxed[class_id][metric], value, rtol=1e-6, atol=1e-6, err_msg=f"class {class_id} {metric}")
    hippocampus = read_volume(SAMPLE / "labelsTr" / f"{CASES[1]}.nii.gz").array
    moved = np.roll(hippocampus, 2, axis=1)
    for class_id, values in case_metrics(moved, hippocampus, [1, 2], None).items():
        assert values == _whole_volume_metrics(moved, hippocampus, [1, 2], None)[class_id]


def test_metrics_leave_the_ignored_voxels_out(tmp_path):
    reference = read_volume(SAMPLE / "labelsTr" / f"{CASES[2]}.nii.gz")
    prediction = np.roll(reference.array, 1, axis=2)
    prediction[:SLAB] = 2  # wrong everywhere in the unannotated slab: it must not count
    partial = _partial(reference.array)
    spacing = reference.geometry.spacing_zyx
    with_ignore = case_metrics(prediction, partial, [1, 2], spacing, ignore_label=IGNORE)
    annotated_only = case_metrics(prediction[SLAB:], reference.array[SLAB:], [1, 2], spacing)
    for class_id in (1, 2):
        for metric, value in annotated_only[class_id].items():
            assert with_ignore[class_id][metric] == pytest.approx(value, rel=1e-9)
    # `semiseg evaluate --ignore-label`: the same numbers from files, and 255 is no class.
    for name, array in (("predictions", prediction), ("labels", partial)):
        (tmp_path / name).mkdir()
        image = sitk.GetImageFromArray(array.astype(np.uint8))
        reference.geometry.apply_to(image)
        sitk.WriteImage(image, str(tmp_path / name / "case.nii.gz"))
    assert main(["evaluate", "--predictions", str(tmp_path / "predictions"), "--labels", str(tmp_path / "labels"),
                 "--out", str(tmp_path / "evaluation"), "--ignore-label", str(IGNORE)]) == 0
    rows = (tmp_path / "evaluation" / "metrics.csv").read_text().splitlines()[1:]
    assert [row.split(",")[1] for row in rows] == ["1", "2"]
    assert float(rows[0].split(",")[2]) == pytest.approx(annotated_only[1]["dice"], rel=1e-12)
