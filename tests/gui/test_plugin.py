"""The napari plugin end to end on real hippocampus MRI: manifest, reader, writer, sample data and the
five dock widgets driven as a user would (clicks, under a virtual display)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("qtpy", reason="GUI tests need a Qt binding (pip install 'napari-semiseg[gui]')")
pytest.importorskip("napari", reason="GUI tests need napari (pip install 'napari-semiseg[gui]')")

from napari.layers import Image, Labels  # noqa: E402
from qtpy.QtCore import Qt, QTimer  # noqa: E402

from semiseg.checkpoint import read_meta  # noqa: E402
from semiseg.io import Volume, read_volume, strip_suffix  # noqa: E402
from semiseg.metrics import case_metrics  # noqa: E402
from semiseg.finetuning import guard_cases, replay_cases  # noqa: E402
from semiseg.models import load_model, read_record  # noqa: E402
from semiseg.napari.placement import layer_world_matrix  # noqa: E402
from sample_model import HELD_OUT  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "resources" / "hippocampus"
SHARED = REPO.parent / "shared" / "data"

pytestmark = pytest.mark.gui
PLUGIN = "napari-semiseg"


def assert_geometry(a, b, atol=1e-6):
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=0, atol=atol)
    np.testing.assert_allclose(a.origin, b.origin, rtol=0, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, rtol=0, atol=atol)


def open_case(viewer, case_paths):
    image_path, label_path = case_paths
    image = viewer.open(str(image_path), plugin=PLUGIN)[0]
    label = viewer.open(str(label_path), plugin=PLUGIN)[0]
    return image, label


def click(qtbot, button):
    assert button.isEnabled(), button.text()
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def segment_widget(viewer, checkpoint):
    from semiseg.napari.widgets.segment import SegmentWidget

    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    assert widget.model.choose(str(checkpoint))
    widget.device.combo.setCurrentText("cpu")
    return widget


def wait_job(qtbot, widget, timeout=60_000):
    qtbot.waitUntil(lambda: widget.job is not None and not widget.job.running, timeout=timeout)


# Manifest -------------------------------------------------------------------------------------------


def test_manifest_is_valid_and_shipped_with_the_package():
    from npe2 import PluginManifest

    root = REPO / "napari.yaml"
    assert root.is_symlink() and root.resolve() == (REPO / "src" / "semiseg" / "napari" / "napari.yaml").resolve()
    manifest = PluginManifest.from_distribution(PLUGIN)
    assert manifest.name == PLUGIN
    assert {w.display_name for w in manifest.contributions.widgets} == {"Segment", "Train", "Fine-tune on correction", "Review queue", "Export labels"}
    assert {c.command for c in manifest.contributions.menus["napari/layers/segment"]} >= {"napari-semiseg.segment", "napari-semiseg.finetune"}
    manifest.validate_imports()


def test_widgets_are_in_the_layers_segment_menu(make_napari_viewer):
    from napari._app_model import get_app_model

    make_napari_viewer()
    items = get_app_model().menus.get_menu("napari/layers/segment")
    commands = {getattr(item, "command", None) and item.command.id for item in items}
    assert {"napari-semiseg.segment", "napari-semiseg.finetune", "napari-semiseg.review", "napari-semiseg.train"} <= commands


# Reader, writer, sample data ------------------------------------------------------------------------


def test_reader_places_scan_and_labels_physically(make_napari_viewer, case_paths):
    viewer = make_napari_viewer()
    image, label = open_case(viewer, case_paths)
    source = read_volume(case_paths[0])
    assert isinstance(image, Image) and isinstance(label, Labels)
    np.testing.assert_allclose(image.data_to_world((0, 0, 0)), source.geometry.origin_zyx)
    np.testing.assert_array_equal(image.data, source.array)
    assert image.metadata["geometry"] == source.geometry.to_dict()
    assert image.metadata["source_path"] == str(case_paths[0])
    np.testing.assert_allclose(label.affine.affine_matrix, image.affine.affine_matrix)
    assert label.metadata["image_path"] == str(case_paths[0])  # labelsTr/x -> imagesTr/x
    assert label.metadata["class_names"] == {"0": "background", "1": "Anterior", "2": "Posterior"}
    assert set(np.unique(label.data)) == {0, 1, 2}


def test_reader_opens_a_dicom_series_and_la_h5(make_napari_viewer):
    dicom = SHARED / "samples" / "example_ct_dicom"
    la = sorted((SHARED / "la").rglob("mri_norm2.h5"))
    if not dicom.is_dir() or not la:
        pytest.skip(f"shared data not found at {SHARED}")
    viewer = make_napari_viewer()
    [ct] = viewer.open(str(dicom), plugin=PLUGIN)
    assert isinstance(ct, Image) and ct.data.shape == (20, 512, 512)
    np.testing.assert_allclose(np.linalg.norm(ct.affine.affine_matrix[:3, :3], axis=0), (2.0, 0.98, 0.98), atol=0.01)
    image, label = viewer.open(str(la[0]), plugin=PLUGIN)
    assert isinstance(image, Image) and isinstance(label, Labels) and image.data.shape == label.data.shape
    assert set(np.unique(label.data)) <= {0, 1}


def test_reader_reports_a_corrupt_file_in_one_line(make_napari_viewer, tmp_path, monkeypatch):
    import semiseg.napari._reader as reader

    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a volume")
    assert reader.get_reader(str(broken)) is not None
    assert reader.read_paths(str(broken)) == [(None,)]  # npe2's "nothing to add"
    assert len(shown) == 1 and "\n" not in shown[0] and "broken.nii.gz" in shown[0]
    assert reader.get_reader(str(tmp_path / "notes.txt")) is None


def test_a_corrupt_file_opened_from_the_menu_shows_only_the_plugins_message(make_napari_viewer, tmp_path, monkeypatch, case_paths):
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a volume")
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(case_paths[0].read_bytes()[:5000])
    from napari.settings import get_settings

    # The user has chosen this plugin for .nii.gz (napari's reader dialog, "remember"); napari's
    # error dialog would name the failure and offer the other readers.
    monkeypatch.setattr(get_settings().plugins, "extension2reader", {"*.nii.gz": PLUGIN})
    napari_errors = []
    monkeypatch.setattr("napari._qt.qt_viewer.handle_gui_reading", lambda *args, **kwargs: napari_errors.append(kwargs or args))
    viewer = make_napari_viewer()
    for path in (broken, truncated):
        viewer.window._qt_viewer._qt_open([str(path)], stack=False)  # File > Open, drag and drop
        assert viewer.open(str(path), plugin=PLUGIN) == []
    assert napari_errors == [] and len(viewer.layers) == 0
    assert len(shown) == 4 and all("\n" not in text for text in shown)
    assert "broken.nii.gz" in shown[0] and "truncated.nii.gz" in shown[2]


def test_writer_restores_the_source_geometry(make_napari_viewer, case_paths, tmp_path):
    viewer = make_napari_viewer()
    image, label = open_case(viewer, case_paths)
    label.data = (label.data > 0).astype(np.uint8) * 2
    target = tmp_path / "mask.nii.gz"
    written = label.save(str(target), plugin=PLUGIN)
    assert written == [str(target)]
    back = read_volume(target)
    assert_geometry(back.geometry, read_volume(case_paths[0]).geometry)
    np.testing.assert_array_equal(back.array, label.data)
    # napari's save dialog has asked before replacing: the writer replaces, atomically.
    label.data = np.zeros_like(label.data)
    assert label.save(str(target), plugin=PLUGIN) == [str(target)]
    assert not read_volume(target).array.any()
    # ...but never writes over the scan the layer belongs to.
    before = case_paths[0].read_bytes()
    from semiseg.napari._writer import write_labels

    assert write_labels(str(case_paths[0]), label.data, {"metadata": label.metadata, "name": label.name}) == []
    assert case_paths[0].read_bytes() == before


# Geometry: world coordinates are physical coordinates; masks keep their scan's geometry ----------------

SCANS = [SAMPLE / "imagesTr" / "hippocampus_001.nii.gz"] + [SHARED / "samples" / name for name in
                                                             ("example_ct.nii.gz", "example_ct_sm.nii.gz", "example_mr_sm.nii.gz", "example_ct_dicom")]


def itk_image(path: Path):
    import SimpleITK as sitk

    if not path.exists():
        pytest.skip(f"{path} not found")
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


def some_voxels(shape_zyx):
    z, y, x = (s - 1 for s in shape_zyx)
    return [(0, 0, 0), (z, y, x), (z, 0, 0), (0, y, 0), (0, 0, x), (z // 2, y // 3, x // 4)]


def physical_zyx(image, index_zyx):
    return image.TransformIndexToPhysicalPoint([int(i) for i in reversed(index_zyx)])[::-1]


@pytest.mark.parametrize("path", SCANS, ids=lambda p: p.name)
def test_world_coordinates_are_itk_physical_points(make_napari_viewer, path):
    source = itk_image(path)
    viewer = make_napari_viewer()
    [scan] = viewer.open(str(path), plugin=PLUGIN)
    for index in some_voxels(scan.data.shape):
        np.testing.assert_allclose(scan.data_to_world(index), physical_zyx(source, index), rtol=0, atol=1e-6)


@pytest.mark.parametrize("path", SCANS, ids=lambda p: p.name)
def test_new_labels_layer_exports_with_its_scans_geometry(make_napari_viewer, qtbot, tmp_path, messages, path):
    import SimpleITK as sitk

    from semiseg.napari.widgets.export import ExportWidget

    source = itk_image(path)
    viewer = make_napari_viewer()
    [scan] = viewer.open(str(path), plugin=PLUGIN)
    viewer.layers.selection.active = scan
    viewer._new_labels()  # what napari's New Labels button does
    painted = viewer.layers[-1]
    assert isinstance(painted, Labels) and "geometry" not in painted.metadata
    painted.brush_size = 1
    voxel = tuple(s // 3 for s in painted.data.shape)
    painted.paint(voxel, 5)
    export = ExportWidget(viewer)
    viewer.window.add_dock_widget(export, name="Export")
    export.folder.set_text(str(tmp_path / "export"))
    click(qtbot, export.export_all)
    assert messages["error"] == []
    back = sitk.ReadImage(str(tmp_path / "export" / f"{painted.name.replace(' ', '_')}.nii.gz"))
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(back, get)(), getattr(source, get)(), rtol=0, atol=1e-6)
    assert [tuple(i) for i in np.argwhere(sitk.GetArrayFromImage(back) == 5)] == [voxel]
    np.testing.assert_allclose(physical_zyx(back, voxel), painted.data_to_world(voxel), rtol=0, atol=1e-6)
    # napari's File > Save Selected Layers gives the same file.
    saved = tmp_path / "saved.nrrd"
    assert painted.save(str(saved), plugin=PLUGIN) == [str(saved)]
    np.testing.assert_allclose(sitk.ReadImage(str(saved)).GetDirection(), source.GetDirection(), rtol=0, atol=1e-6)


def test_a_label_layer_on_no_scans_grid_is_refused(make_napari_viewer, qtbot, tmp_path, messages, case_paths):
    from semiseg.napari.widgets.export import ExportWidget

    viewer = make_napari_viewer()
    image, _ = open_case(viewer, case_paths)
    stray = viewer.add_labels(np.ones(image.data.shape, np.uint8), name="stray", scale=(2.0, 2.0, 2.0))
    export = ExportWidget(viewer)
    for i in range(export.list.count()):
        export.list.item(i).setCheckState(Qt.CheckState.Checked if export.list.item(i).text() == "stray" else Qt.CheckState.Unchecked)
    export.folder.set_text(str(tmp_path / "export"))
    click(qtbot, export.export_checked)
    assert len(messages["error"]) == 1 and "lies on no open scan's grid" in messages["error"][0]
    assert not any((tmp_path / "export").iterdir())
    assert stray.save(str(tmp_path / "stray.nii.gz"), plugin=PLUGIN) == [] and not (tmp_path / "stray.nii.gz").exists()


def test_sample_data_opens_image_and_labels(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open_sample(PLUGIN, "hippocampus")
    image, label = layers
    assert isinstance(image, Image) and isinstance(label, Labels)
    assert image.data.shape == label.data.shape == (35, 51, 35)
    assert label.metadata["class_names"]["1"] == "Anterior"


# One session per window -------------------------------------------------------------------------------


def docked(viewer, name):
    """A widget docked the way napari's Plugins menu does it (napari hands it a proxy of the viewer)."""
    return viewer.window.add_plugin_dock_widget(PLUGIN, name)[1]


def test_dock_widgets_of_one_window_share_one_session(make_napari_viewer, checkpoint, tmp_path, messages):
    import shutil

    viewer = make_napari_viewer()
    segment, train, finetune, review = (docked(viewer, name) for name in ("Segment", "Train", "Fine-tune on correction", "Review queue"))
    assert segment.viewer is not finetune.viewer  # napari's per-widget proxies...
    assert segment.session is train.session is finetune.session is review.session  # ...of one window
    assert segment.model.choose(str(checkpoint))
    assert finetune.model.path() == review.model.path() == str(checkpoint)
    # A model that Train reports finished is selected in the Segment and Fine-tune widgets already open.
    trained = tmp_path / "other-run" / "best"
    shutil.copytree(checkpoint, trained)
    train.view.handle({"type": "end", "checkpoint": str(trained), "iteration": 10})
    assert segment.session.last_run == str(trained)
    assert str(trained) in [segment.model.combo.itemData(i) for i in range(segment.model.combo.count())]
    assert segment.model.path() == finetune.model.path() == str(trained)
    # Another window has its own session.
    other_window = make_napari_viewer()
    assert docked(other_window, "Segment").session is not segment.session
    assert messages["error"] == []


def test_corrupt_checkpoints_are_refused_at_browse_and_dropped_from_the_recent_list(make_napari_viewer, checkpoint, tmp_path, messages):
    import shutil

    from semiseg.napari.checkpoints import recent_checkpoints

    def copy(name):
        target = tmp_path / name / "best"
        shutil.copytree(checkpoint, target)
        return target

    def damage(folder, truncate=False):
        weights = folder / "model.safetensors"
        data = bytearray(weights.read_bytes())
        if truncate:
            del data[len(data) // 2:]
        else:
            data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))

    def offered(widget):
        return [widget.model.combo.itemData(i) for i in range(widget.model.combo.count())]

    viewer = make_napari_viewer()
    segment = docked(viewer, "Segment")
    assert segment.model.choose(str(checkpoint))
    for name, truncate in (("flipped", False), ("truncated", True)):
        broken = copy(name)
        damage(broken, truncate)
        assert not segment.model.choose(str(broken))
        assert "checksum mismatch" in messages["error"][-1] and "\n" not in messages["error"][-1]
        assert str(broken) not in offered(segment) and segment.model.path() == str(checkpoint)
    # Intact when remembered, corrupted afterwards: dropped, and never a new window's default.
    later = copy("later")
    assert segment.model.choose(str(later)) and recent_checkpoints()[0] == str(later)
    damage(later)
    fresh = docked(make_napari_viewer(), "Segment")
    assert fresh.model.path() == str(checkpoint) and str(later) not in offered(fresh)
    assert str(later) not in recent_checkpoints()


def test_finetune_preselects_the_labels_painted_last_never_the_reference(make_napari_viewer, case_paths):
    viewer = make_napari_viewer()
    image, reference = open_case(viewer, case_paths)
    segment = docked(viewer, "Segment")
    segment.reference.set_layer(reference)
    viewer.layers.selection.active = image
    viewer._new_labels()
    painted = viewer.layers[-1]
    painted.paint((10, 20, 15), 1)
    unrelated = viewer.add_labels(np.zeros(image.data.shape, np.uint8), name="unrelated", affine=image.affine)
    finetune = docked(viewer, "Fine-tune on correction")
    assert finetune.labels.layer() is painted
    unrelated.paint((3, 3, 3), 2)
    assert finetune.labels.layer() is unrelated
    reference.paint((3, 3, 3), 2)
    assert finetune.labels.layer() is unrelated


# Segment ----------------------------------------------------------------------------------------------


def test_segment_adds_prediction_uncertainty_error_map_and_metrics(make_napari_viewer, qtbot, checkpoint, case_paths, messages, monkeypatch):
    viewer = make_napari_viewer()
    image, label = open_case(viewer, case_paths)
    widget = segment_widget(viewer, checkpoint)
    widget.image.set_layer(image)
    widget.reference.set_layer(label)
    ticks, finished = [], []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    done = widget._done
    monkeypatch.setattr(widget, "_done", lambda *args: (finished.append(time.perf_counter()), done(*args)))
    statuses = []
    progress = widget._progress
    monkeypatch.setattr(widget, "_progress", lambda event: (progress(event), statuses.append(widget.buttons.status.text())))
    timer.start(10)
    started = time.perf_counter()
    click(qtbot, widget.buttons.start)
    wait_job(qtbot, widget)
    timer.stop()
    assert messages["error"] == []

    # While the model worked (click -> result back in the GUI thread), the Qt event loop kept
    # serving a 10 ms timer: the work is in a thread, never in the GUI's.
    working = [t for t in ticks if t <= finished[0]]
    gaps = np.diff([started] + working + [finished[0]])
    assert len(working) >= 0.3 * (finished[0] - started) / 0.010, (len(working), finished[0] - started)
    assert gaps.max() < 0.5, gaps.max()

    prediction = viewer.layers[f"{image.name} prediction"]
    entropy = viewer.layers[f"{image.name} entropy"]
    disagreement = viewer.layers[f"{image.name} disagreement"]
    errors = viewer.layers[f"{image.name} errors"]
    assert isinstance(prediction, Labels) and isinstance(errors, Labels)
    for layer in (prediction, entropy, disagreement, errors):
        np.testing.assert_allclose(layer_world_matrix(layer), layer_world_matrix(image))
        assert layer.data.shape == image.data.shape
    assert set(np.unique(prediction.data)) <= {0, 1, 2}
    meta = read_meta(checkpoint)
    assert prediction.metadata["checkpoint_sha256"] == meta["weights_sha256"]
    assert prediction.metadata["class_names"] == {"0": "background", "1": "Anterior", "2": "Posterior"}
    for layer in (entropy, disagreement):
        assert not layer.visible and layer.colormap.name == "magma"
        assert tuple(layer.contrast_limits) == (0.0, 1.0) and 0 < layer.opacity < 1
        assert 0.0 <= layer.data.min() and layer.data.max() <= 1.0

    # Error map: 1 false positive, 2 false negative, 3 wrong class -- against numpy.
    pred, ref = np.asarray(prediction.data), np.asarray(label.data)
    assert int((errors.data == 1).sum()) == int(((pred > 0) & (ref == 0)).sum())
    assert int((errors.data == 2).sum()) == int(((pred == 0) & (ref > 0)).sum())
    assert int((errors.data == 3).sum()) == int(((pred > 0) & (ref > 0) & (pred != ref)).sum())
    assert int((errors.data == 0).sum()) == int((pred == ref).sum())
    assert errors.colormap.map(np.array([1]))[0].tolist() != errors.colormap.map(np.array([2]))[0].tolist()

    # Per-class table, with the scan's spacing.
    expected = case_metrics(pred, ref, [1, 2], read_volume(case_paths[0]).geometry.spacing_zyx)
    assert widget.table.isVisibleTo(widget) and widget.table.rowCount() == 2
    for row, class_id in enumerate((1, 2)):
        assert widget.table.item(row, 0).text() == {1: "Anterior", 2: "Posterior"}[class_id]
        assert widget.table.item(row, 1).text() == f"{expected[class_id]['dice']:.3f}"
    # The scan is one the model trained on: the metrics say they are no held-out score.
    role = read_record(checkpoint).case_role("hippocampus_001")
    assert role in ("labeled", "unlabeled") and f"one of this model's {role} training cases" in widget.errors.text()
    # A two-network model's regions come from its disagreement map.
    assert "disagreement >" in widget.regions.title.text() and widget.regions.table.rowCount() == len(widget.regions.regions)
    print(f"\nclick to prediction on CPU: {widget.last_seconds:.2f} s")
    # Before predicting: the time and memory estimate; while predicting: an ETA.
    assert "network calls" in widget.estimate.text() and "GB of memory" in widget.estimate.text()
    assert any("ETA" in text for text in statuses), statuses

    # Classes in their own colours, never one of the error map's; per-class volumes in mL.
    from semiseg.napari.layers import CLASS_COLORS

    error_rgb = [errors.colormap.map(np.array([v]))[0][:3] for v in (1, 2, 3)]
    for class_id in (1, 2):
        rgb = prediction.colormap.map(np.array([class_id]))[0][:3]
        np.testing.assert_allclose(rgb, CLASS_COLORS[class_id - 1][:3], atol=1e-6)
        assert min(np.linalg.norm(rgb - other) for other in error_rgb) > 0.4
    voxel_ml = float(np.prod(read_volume(case_paths[0]).geometry.spacing)) / 1000
    assert widget.volumes.isVisibleTo(widget)
    assert widget.volumes.column("prediction") == [f"{(pred == k).sum() * voxel_ml:.3f}" for k in (1, 2)]
    assert widget.volumes.column("reference") == [f"{(ref == k).sum() * voxel_ml:.3f}" for k in (1, 2)]
    # Painting on the prediction adds the corrected volumes beside the predicted ones.
    predicted = np.array(pred)
    prediction.brush_size = 1
    prediction.paint(tuple(int(i) for i in np.argwhere(predicted == 0)[0]), 2)
    corrected = [f"{(predicted == 1).sum() * voxel_ml:.3f}", f"{((predicted == 2).sum() + 1) * voxel_ml:.3f}"]
    qtbot.waitUntil(lambda: widget.volumes.columnCount() == 4 and widget.volumes.column("correction") == corrected, timeout=5_000)
    assert widget.volumes.column("prediction") == [f"{(predicted == k).sum() * voxel_ml:.3f}" for k in (1, 2)]
    prediction.data = predicted

    # Segmenting again updates the unedited prediction in place; an edited one is kept.
    edited = np.array(prediction.data)
    edited[10:20, 20:30, 10:20] = 2
    prediction.data = edited
    click(qtbot, widget.buttons.start)
    wait_job(qtbot, widget)
    np.testing.assert_array_equal(prediction.data, edited)  # the user's edit survived
    assert f"{image.name} prediction [1]" in viewer.layers


def form_rows_cut(widget) -> list[str]:
    """The rows of a widget's form drawn shorter than their content needs, or over the next row."""
    from qtpy.QtWidgets import QFormLayout

    rows = widget.findChildren(QFormLayout)[0]
    fields = [rows.itemAt(row, QFormLayout.ItemRole.FieldRole) for row in range(rows.rowCount())]
    fields = [item.widget() for item in fields if item is not None and item.widget() is not None and item.widget().isVisible()]
    cut = []
    for field, below in zip(fields, fields[1:] + [None]):
        needed = field.heightForWidth(field.width()) if field.hasHeightForWidth() else field.minimumSizeHint().height()
        if field.height() < needed:
            cut.append(f"{type(field).__name__} {field.height()} px of {needed}")
        if below is not None and field.geometry().bottom() >= below.geometry().top():
            cut.append(f"{type(field).__name__} overlaps {type(below).__name__}")
    return cut


def test_two_widgets_in_one_dock_column_keep_whole_rows_and_the_window_on_screen(make_napari_viewer, qtbot, checkpoint, case_paths):
    """Segment, then Review queue, docked in one column as a user opens them from the menu: every form row
    keeps its height (a model description of two lines once overlapped the Model row), the start buttons
    stay in view, and a segmented scan's metrics, volumes and regions scroll inside the dock instead of
    growing the window off the screen."""
    from qtpy.QtWidgets import QApplication

    from semiseg.napari.widgets.review import ReviewWidget

    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1280, 760)
    image, label = open_case(viewer, case_paths)
    segment = segment_widget(viewer, checkpoint)
    QApplication.processEvents()
    review = ReviewWidget(viewer)
    viewer.window.add_dock_widget(review, name="Review queue")
    qtbot.waitUntil(lambda: review.isVisible() and review.height() > 0, timeout=5_000)
    QApplication.processEvents()
    description = segment.model.info
    assert description.heightForWidth(description.width()) > 1.5 * description.fontMetrics().height(), "it wraps at this width"
    assert form_rows_cut(segment) == [] and form_rows_cut(review) == []

    segment.image.set_layer(image)
    segment.reference.set_layer(label)
    click(qtbot, segment.buttons.start)
    wait_job(qtbot, segment)
    qtbot.waitUntil(lambda: segment.table.isVisible() and segment.regions.isVisible(), timeout=5_000)
    QApplication.processEvents()
    screen = window.screen().availableGeometry().height()
    assert window.height() <= screen and window.minimumSizeHint().height() <= screen, (window.height(), screen)
    assert segment.verticalScrollBar().maximum() > 0  # the results scroll; the rows above them stay whole
    assert form_rows_cut(segment) == [] and form_rows_cut(review) == []
    for widget in (segment, review):  # the start button stays in view, the rows above it whole
        start = widget.buttons.start
        assert start.visibleRegion().boundingRect().height() == start.height(), type(widget).__name__


def test_segment_cancel_and_user_errors(make_napari_viewer, qtbot, checkpoint, case_paths, messages):
    viewer = make_napari_viewer()
    widget = segment_widget(viewer, checkpoint)
    click(qtbot, widget.buttons.start)  # no scan yet: a message, no traceback
    assert len(messages["error"]) == 1 and "open a scan" in messages["error"][0]
    image, _ = open_case(viewer, case_paths)
    widget.image.set_layer(image)
    widget.tta.setChecked(True)  # 8 passes: long enough to cancel in the middle
    layers_before = len(viewer.layers)
    click(qtbot, widget.buttons.start)
    qtbot.waitUntil(lambda: widget.buttons.progress.value() > 0, timeout=30_000)
    click(qtbot, widget.buttons.cancel)
    cancelled_at = time.perf_counter()
    wait_job(qtbot, widget, timeout=10_000)
    assert time.perf_counter() - cancelled_at < 5
    assert "cancelled" in widget.buttons.status.text()
    assert len(viewer.layers) == layers_before
    assert widget.buttons.start.isEnabled()


def test_a_two_channel_model_through_segment_finetune_and_review(make_napari_viewer, qtbot, tmp_path, messages, one_thread):
    """A model of two channels (T2 + a derived 'ADC', multichannel_data.py): Segment asks for the ADC layer,
    preselects it by its nnU-Net suffix, and predicts what the engine predicts from the two files; a 4D NIfTI of
    the two opens as two layers that fill both rows; Fine-tune trains on both channels; the review queue lists
    one entry per case and opens each with its channels."""
    import torch

    from multichannel_data import CASES, two_channel_folder, write_4d
    from semiseg.inference import predict_volume
    from semiseg.io import read_scan
    from semiseg.training import TrainConfig, train

    root = two_channel_folder(tmp_path / "data", CASES[:3])
    best = train(TrainConfig(data=str(root), output=str(tmp_path / "run"), method="supervised", network="vnet",
                             network_options={"base_filters": 4}, labeled="2", validation="0", iterations=6, log_every=3,
                             validate_every=1000, workers=0, device="cpu", seed=0))
    files = [root / "imagesTr" / f"{CASES[2]}_{channel}.nii.gz" for channel in ("0000", "0001")]
    viewer = make_napari_viewer()
    t2 = viewer.open(str(files[0]), plugin=PLUGIN)[0]
    widget = segment_widget(viewer, best)
    widget.image.set_layer(t2)
    assert [name for name, _ in widget.channels.rows] == ["ADC"]
    click(qtbot, widget.buttons.start)
    assert "choose the layer of its 'ADC' channel" in messages["error"][-1]

    adc = viewer.open(str(files[1]), plugin=PLUGIN)[0]
    widget.image.set_layer(t2)  # opening the ADC made it the active layer, which the scan choice follows
    assert widget.channels.rows[0][1].layer() is adc  # preselected by its _0001 suffix
    click(qtbot, widget.buttons.start)
    wait_job(qtbot, widget)
    assert "done in" in widget.buttons.status.text(), widget.buttons.status.text()
    model = load_model(best)
    expected = predict_volume(read_scan(files), model.plan, model.predictors(), torch.device("cpu")).labels.array
    np.testing.assert_array_equal(np.asarray(widget.prediction.data), expected)

    # The same scan as one 4D NIfTI opens as one layer per channel; the last one opened (the active layer,
    # channel 1) gives way to channel 0 as the scan, and its sibling fills the ADC row.
    write_4d(*files, tmp_path / "stacked.nii.gz")
    channel_layers = viewer.open(str(tmp_path / "stacked.nii.gz"), plugin=PLUGIN)
    assert [layer.name for layer in channel_layers] == ["stacked_0000", "stacked_0001"]
    assert widget.image.layer() is channel_layers[0] and widget.channels.rows[0][1].layer() is channel_layers[1]
    click(qtbot, widget.buttons.start)
    wait_job(qtbot, widget)
    assert "done in" in widget.buttons.status.text(), widget.buttons.status.text()
    np.testing.assert_array_equal(np.asarray(viewer.layers["stacked_0000 prediction"].data), expected)
    widget.channels.rows[0][1].set_layer(channel_layers[0])  # the file's T2 in the ADC row: refused, not segmented
    click(qtbot, widget.buttons.start)
    assert "'stacked_0000' is channel 0 of its file, chosen as this model's channel 1 ('ADC')" in messages["error"][-1]

    # Fine-tune on a correction of that scan: both channels go to the trainer, as one 4D NIfTI copy.
    from semiseg.napari.widgets.finetune import FineTuneWidget

    correction = viewer.add_labels(read_volume(root / "labelsTr" / f"{CASES[2]}.nii.gz").array, name="correction",
                                   affine=channel_layers[0].affine)
    finetune = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(finetune, name="Fine-tune")
    finetune.labels.set_layer(correction)
    finetune.image.set_layer(channel_layers[1])  # the ADC layer: gives way to the file's first channel
    assert finetune.image.layer() is channel_layers[0] and finetune.channels.rows[0][1].layer() is channel_layers[1]
    finetune.folder.set_text(str(root))
    finetune.iterations.setValue(3)
    finetune.device.combo.setCurrentText("cpu")
    finetune.output.set_text(str(tmp_path / "fine-tuning"))
    errors = len(messages["error"])
    click(qtbot, finetune.buttons.start)
    qtbot.waitUntil(lambda: finetune.job is not None and not finetune.job.running, timeout=150_000)
    assert messages["error"][errors:] == [], messages
    copies = list((tmp_path / "fine-tuning" / "corrections").glob("stacked_0000_image*.nii.gz"))
    assert len(copies) == 1
    np.testing.assert_allclose(read_scan(copies[0]).array, read_scan(files).array, rtol=1e-6)
    new = finetune.new_checkpoint
    assert new and load_model(new).record.iteration == 3 and load_model(new).plan.channel_names == ("T2", "ADC")
    assert viewer.layers["stacked_0000 prediction"].metadata["checkpoint"] == new

    # In a new window, Fine-tune docked before the 4D file is opened: both rows fill once its layers are in.
    other = make_napari_viewer()
    early = FineTuneWidget(other)
    other.window.add_dock_widget(early, name="Fine-tune")
    assert early.model.choose(str(best)) and [name for name, _ in early.channels.rows] == ["ADC"]
    opened = other.open(str(tmp_path / "stacked.nii.gz"), plugin=PLUGIN)
    qtbot.waitUntil(lambda: early.channels.rows[0][1].layer() is opened[1], timeout=5_000)
    assert early.image.layer() is opened[0]

    # The review queue of a folder of channel files: one entry per case, opened with all its channels.
    from semiseg.napari.widgets.review import ReviewWidget

    review = ReviewWidget(viewer)
    viewer.window.add_dock_widget(review, name="Review")
    assert review.model.path() == new
    review.device.combo.setCurrentText("cpu")
    review.folder.set_text(str(root / "imagesTr"))
    click(qtbot, review.buttons.start)
    wait_job(qtbot, review)
    entries = review.queue.entries
    assert sorted(e.name for e in entries) == sorted(CASES[:3]) and all(e.score is not None for e in entries), entries
    before = list(viewer.layers)
    click(qtbot, review.open_next)
    opened = entries[0].name
    # Its two channel files, as two new image layers (named 'case_0000 [1]' by napari where that case is open already)
    review_scan, review_adc = [layer for layer in viewer.layers if layer not in before and layer.metadata.get("role") == "image"]
    assert [strip_suffix(layer.metadata["source_path"]) for layer in (review_scan, review_adc)] == [f"{opened}_0000", f"{opened}_0001"]
    # Segment follows the active layer to the opened scan: its channel files fill the scan and ADC rows, never
    # the layers of an earlier opening of the same case
    qtbot.waitUntil(lambda: widget.channels.rows[0][1].layer() is review_adc, timeout=5_000)
    assert widget.image.layer() is review_scan
    scan_files = [root / "imagesTr" / f"{opened}_{channel}.nii.gz" for channel in ("0000", "0001")]
    expected = predict_volume(read_scan(scan_files), load_model(new).plan, load_model(new).predictors(), torch.device("cpu")).labels.array
    np.testing.assert_array_equal(np.asarray(viewer.layers[f"{review_scan.name} prediction"].data), expected)

    # The first case's channel files opened once more: each copy of the scan takes the ADC layer opened with it
    again = viewer.open(str(files[0]), plugin=PLUGIN)[0]
    again_adc = viewer.open(str(files[1]), plugin=PLUGIN)[0]
    qtbot.waitUntil(lambda: widget.image.layer() is again and widget.channels.rows[0][1].layer() is again_adc, timeout=5_000)
    # and a third copy right after it: the ADC layers before and after it are equally near; its own comes after it
    third = viewer.open(str(files[0]), plugin=PLUGIN)[0]
    third_adc = viewer.open(str(files[1]), plugin=PLUGIN)[0]
    qtbot.waitUntil(lambda: widget.image.layer() is third and widget.channels.rows[0][1].layer() is third_adc, timeout=5_000)
    widget.image.set_layer(again)
    qtbot.waitUntil(lambda: widget.channels.rows[0][1].layer() is again_adc, timeout=5_000)
    widget.image.set_layer(t2)
    qtbot.waitUntil(lambda: widget.channels.rows[0][1].layer() is adc, timeout=5_000)


# Fine-tune --------------------------------------------------------------------------------------------


def test_finetune_saves_the_correction_first_then_trains_and_repredicts(make_napari_viewer, qtbot, checkpoint, case_paths,
                                                                         unlabeled_folder, tmp_path, messages):
    from semiseg.napari.widgets.finetune import FineTuneWidget

    viewer = make_napari_viewer()
    image, label = open_case(viewer, case_paths)
    segment = segment_widget(viewer, checkpoint)
    segment.image.set_layer(image)
    click(qtbot, segment.buttons.start)
    wait_job(qtbot, segment)
    prediction = viewer.layers[f"{image.name} prediction"]
    entropy = viewer.layers[f"{image.name} entropy"]
    entropy_before = np.array(entropy.data)
    # The user's correction: the reference outline painted into a new labels layer.
    correction = viewer.add_labels(np.array(label.data), name="my correction", affine=image.affine)

    widget = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Fine-tune")
    widget.image.set_layer(image)
    widget.labels.set_layer(correction)
    assert widget.model.path() == str(checkpoint)
    # The predicted and the corrected volume of each class, side by side.
    voxel_ml = float(np.prod(read_volume(case_paths[0]).geometry.spacing)) / 1000
    predicted = [f"{(np.asarray(prediction.data) == k).sum() * voxel_ml:.3f}" for k in (1, 2)]
    qtbot.waitUntil(lambda: widget.volumes.columnCount() == 3 and widget.volumes.column("correction")
                    == [f"{(np.asarray(label.data) == k).sum() * voxel_ml:.3f}" for k in (1, 2)], timeout=5_000)
    assert widget.volumes.column("prediction") == predicted
    widget.folder.set_text(str(unlabeled_folder))
    widget.iterations.setValue(3)
    widget.device.combo.setCurrentText("cpu")
    output = tmp_path / "fine-tuning"
    widget.output.set_text(str(output))
    click(qtbot, widget.buttons.start)
    # Saved before the training process even started.
    saved = sorted((output / "corrections").glob("hippocampus_001_correction_*.nii.gz"))
    assert len(saved) == 1 and widget.process is not None
    corrected = read_volume(saved[0])
    np.testing.assert_array_equal(corrected.array, label.data)
    assert_geometry(corrected.geometry, read_volume(case_paths[0]).geometry)
    qtbot.waitUntil(lambda: widget.job is not None and not widget.job.running, timeout=150_000)
    assert messages["error"] == [], messages

    new = widget.new_checkpoint
    assert new and Path(new).parent.parent == output and load_model(new).record.iteration == 3
    log = [json.loads(line) for line in (Path(new).parent / "log.jsonl").read_text().splitlines()]
    assert saved[0].stat().st_mtime <= log[0]["time"]
    assert log[0]["config"]["initial_checkpoint"] == str(checkpoint)
    dataset = next(e for e in log if e["type"] == "dataset")
    # The recipe replays the model's own labeled cases beside the correction (benchmarks/results/finetune_recipes.md).
    replayed = replay_cases(read_record(checkpoint), unlabeled_folder, [(str(case_paths[0]), str(saved[0]))])
    # The correction is listed as often as the replayed cases together (the recipe's correction share 0.5).
    corrected_pair = [str(case_paths[0]), str(saved[0])]
    assert replayed and log[0]["config"]["labeled"] == [*replayed, *[corrected_pair] * len(replayed)]
    assert (dataset["labeled"], dataset["unlabeled"]) == (2 * len(replayed), 3)
    assert widget.session.checkpoint == new  # selected for Segment
    # No held-out labeled case within reach (the model has no validation cases, the folder no labels): said, not hidden.
    assert not widget.guard.isHidden() and widget.guard.verdict.text().startswith("Not checked") and widget.guard.rows() == []
    assert segment.model.path() == new
    # The prediction layer now holds the fine-tuned model's prediction.
    assert viewer.layers[f"{image.name} prediction"] is prediction
    assert prediction.metadata["checkpoint"] == new
    assert prediction.metadata["checkpoint_sha256"] == read_meta(new)["weights_sha256"]
    assert not np.allclose(entropy.data, entropy_before)
    np.testing.assert_array_equal(correction.data, label.data)  # the correction itself is untouched

    # Saving again (same second even) never overwrites the earlier correction.
    from semiseg.finetuning import save_correction

    again = [save_correction(corrected, output, image.name) for _ in range(2)]
    assert len({saved[0], *again}) == 3 and read_volume(saved[0]).array.tolist() == corrected.array.tolist()


def test_two_review_rounds_the_guard_keeps_a_worse_model_out_and_the_queue_follows_the_model(
        make_napari_viewer, qtbot, sample_model, unlabeled_folder, tmp_path, messages):
    """The review loop through the docked widgets, from the bundled model: rank, open the most uncertain
    scan, correct it, fine-tune; the guard compares the old and the new model on the held-out case the
    model knows, and the queue ranks again with the new model. Round 2's correction is wrong (the whole
    scan one class): the guard keeps the old model."""
    import shutil

    from semiseg.napari.widgets.finetune import FineTuneWidget
    from semiseg.napari.widgets.review import ReviewWidget

    trained = read_record(sample_model).split.labeled
    cases = [f"{case}.nii.gz" for case in trained[:3]]  # scans the user reviews; their true labels are the corrections
    scans = tmp_path / "to-review"
    scans.mkdir()
    for name in cases:
        shutil.copy(SAMPLE / "imagesTr" / name, scans / name)
    viewer = make_napari_viewer()
    review, finetune = ReviewWidget(viewer), FineTuneWidget(viewer)
    viewer.window.add_dock_widget(review, name="Review")
    viewer.window.add_dock_widget(finetune, name="Fine-tune")
    assert review.model.choose(str(sample_model))
    for widget in (review, finetune):
        widget.device.combo.setCurrentText("cpu")
    review.folder.set_text(str(scans))
    finetune.folder.set_text(str(unlabeled_folder))
    finetune.output.set_text(str(tmp_path / "fine-tuning"))
    click(qtbot, review.buttons.start)
    wait_job(qtbot, review)

    def one_round(correct, iterations: int, lr: float):
        entry = review.queue.next_unreviewed()
        click(qtbot, review.open_next)
        assert entry.reviewed
        prediction = viewer.layers[f"{entry.name} prediction"]
        prediction.data = correct(read_volume(SAMPLE / "labelsTr" / f"{entry.name}.nii.gz").array).astype(prediction.data.dtype)
        finetune.labels.set_layer(prediction)
        assert finetune.image.layer() is viewer.layers[entry.name]
        finetune.iterations.setValue(iterations)
        finetune.lr.setValue(lr)
        before = finetune.session.checkpoint
        click(qtbot, finetune.buttons.start)
        qtbot.waitUntil(lambda: not finetune.guard.isHidden() and finetune.buttons.start.isEnabled(), timeout=180_000)
        return before, entry

    # Round 1: the scan's true labels. On this one held-out case even the recipe's lr moves the strong bundled
    # model's Dice by more than the tolerance (5 iterations at 0.003: 0.826 -> 0.811, measured), so round 1 takes
    # steps too small to change it much: the new model is no worse, and selected.
    before, first = one_round(lambda truth: truth, 2, 0.0001)
    new = finetune.new_checkpoint
    rows = first_rows = finetune.guard.rows()
    assert [row[0] for row in rows] == ["before", "after"] and float(rows[1][1]) >= float(rows[0][1]) - 0.005, rows
    assert finetune.guard.use_anyway.isHidden() and finetune.session.checkpoint == new != before
    assert messages["error"] == [] and messages["warning"] == [], messages
    assert [Path(label).name for _, label in guard_cases(before, new)] == [f"{HELD_OUT}.nii.gz"]
    # The queue ranks again with the new model; what was reviewed stays reviewed.
    qtbot.waitUntil(lambda: review.queue.checkpoint == new and not review.job.running, timeout=60_000)
    assert [e.name for e in review.queue.entries if e.reviewed] == [first.name]
    assert all(e.score is not None for e in review.queue.entries)

    # Round 2: a wrong correction (every voxel class 1), learnt hard. The guard measures it worse: the old model stays.
    _, second = one_round(lambda truth: np.ones_like(truth), 10, 0.05)
    rejected = finetune.new_checkpoint
    rows = finetune.guard.rows()
    assert float(rows[1][1]) < float(rows[0][1]) - 0.005, rows
    assert not finetune.guard.use_anyway.isHidden() and finetune.session.checkpoint == new and review.queue.checkpoint == new
    assert "kept aside" in messages["warning"][-1] and rejected in finetune.session.checkpoints()  # kept, not selected
    print(f"guard (model, mean Dice, cases lower): round 1 {first_rows}, round 2 {rows}")
    # The user may still take it: then it is selected and the queue follows.
    click(qtbot, finetune.guard.use_anyway)
    qtbot.waitUntil(lambda: finetune.session.checkpoint == rejected and review.queue.checkpoint == rejected
                    and not review.job.running and not finetune.job.running, timeout=60_000)
    assert {e.name for e in review.queue.entries if e.reviewed} == {first.name, second.name}


def test_a_prediction_with_label_values_above_255_is_shown_as_it_is(make_napari_viewer, case_paths):
    """Label values as the user's classes have them (here 300): never wrapped by a cast to 8 bits."""
    from semiseg.napari.widgets.display import show_prediction

    viewer = make_napari_viewer()
    image = viewer.open(str(case_paths[0]), plugin=PLUGIN)[0]
    truth = read_volume(case_paths[1])
    values = np.where(truth.array == 2, 300, truth.array.astype(np.uint16))
    layers = show_prediction(viewer, image, Volume(values, truth.geometry), {0: "background", 1: "Anterior", 300: "Posterior"},
                             0.1, {}, [])
    np.testing.assert_array_equal(layers["prediction"].data, values)
    voxel_ml = float(np.prod(truth.geometry.spacing)) / 1000
    assert layers["prediction"].metadata["class_volumes_ml"]["300"] == pytest.approx((truth.array == 2).sum() * voxel_ml)


# Review queue -----------------------------------------------------------------------------------------


def test_review_queue_ranks_most_uncertain_first_and_opens_next(make_napari_viewer, qtbot, checkpoint, unlabeled_folder, messages):
    from semiseg.napari.widgets.review import ReviewWidget

    viewer = make_napari_viewer()
    widget = ReviewWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Review")
    assert widget.model.choose(str(checkpoint))
    widget.device.combo.setCurrentText("cpu")
    widget.folder.set_text(str(unlabeled_folder))
    click(qtbot, widget.buttons.start)
    wait_job(qtbot, widget)
    assert messages["error"] == []
    entries = widget.queue.entries
    scores = [e.score for e in entries]
    assert len(entries) == 3 and scores == sorted(scores, reverse=True)
    assert widget.table.rowCount() == 3 and widget.table.item(0, 1).text() == entries[0].name

    click(qtbot, widget.open_next)
    first = viewer.layers[entries[0].name]
    prediction = viewer.layers[f"{entries[0].name} prediction"]
    assert isinstance(first, Image) and isinstance(prediction, Labels)
    np.testing.assert_allclose(layer_world_matrix(prediction), layer_world_matrix(first))
    assert entries[0].reviewed and widget.table.item(0, 3).text() == "✓"
    # Another Review widget of this window (napari hands it its own proxy) shows the same queue.
    from napari.utils._proxies import PublicOnlyProxy

    other = ReviewWidget(PublicOnlyProxy(viewer))
    assert other.table.rowCount() == 3 and other.table.item(0, 3).text() == "✓" and other.table.item(1, 3).text() == ""
    click(qtbot, widget.open_next)
    assert f"{entries[1].name} prediction" in viewer.layers and entries[1].reviewed and not entries[2].reviewed
    assert other.table.item(1, 3).text() == "✓"
    # The queue's score is the engine's: Prediction.uncertainty_score() of that scan.
    from semiseg.inference import predict_volume
    import torch

    model = load_model(checkpoint)
    expected = predict_volume(read_volume(entries[2].scan), model.plan, model.predictors(), torch.device("cpu")).uncertainty_score()
    assert entries[2].score == pytest.approx(expected, rel=1e-5)


# Export -----------------------------------------------------------------------------------------------


def test_export_writes_source_geometry_and_checkpoint_hash_and_asks_before_replacing(make_napari_viewer, qtbot, checkpoint, case_paths,
                                                                                     tmp_path, monkeypatch, messages):
    from semiseg.napari.widgets.export import ExportWidget

    viewer = make_napari_viewer()
    image, label = open_case(viewer, case_paths)
    segment = segment_widget(viewer, checkpoint)
    segment.image.set_layer(image)
    click(qtbot, segment.buttons.start)
    wait_job(qtbot, segment)
    widget = ExportWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Export")
    names = [widget.list.item(i).text() for i in range(widget.list.count())]
    assert names == ["hippocampus_001 labels", "hippocampus_001 prediction"]
    assert widget.list.item(1).checkState() == Qt.CheckState.Checked  # predictions are checked by default
    folder = tmp_path / "export"
    widget.folder.set_text(str(folder))
    click(qtbot, widget.export_checked)
    target = folder / "hippocampus_001_prediction.nii.gz"
    back = read_volume(target)
    source = read_volume(case_paths[0])
    assert_geometry(back.geometry, source.geometry, atol=1e-6)
    np.testing.assert_array_equal(back.array, viewer.layers["hippocampus_001 prediction"].data)
    sidecar = json.loads((folder / "hippocampus_001_prediction.json").read_text())
    meta = json.loads((Path(checkpoint) / "model.json").read_text())
    assert sidecar["checkpoint"]["path"] == str(checkpoint)
    assert sidecar["checkpoint"]["weights_sha256"] == meta["weights_sha256"]
    assert sidecar["source_image"] == str(case_paths[0])
    assert sidecar["edited_after_prediction"] is False

    # Never overwrite without asking: "No" keeps the files, "Yes" replaces them.
    before = target.read_bytes()
    asked = []
    monkeypatch.setattr(widget, "confirm_overwrite", lambda paths: asked.append(paths) or False)
    layer = viewer.layers["hippocampus_001 prediction"]
    layer.data = np.ones_like(layer.data)
    click(qtbot, widget.export_checked)
    assert asked and target.read_bytes() == before
    monkeypatch.setattr(widget, "confirm_overwrite", lambda paths: True)
    click(qtbot, widget.export_all)
    assert read_volume(target).array.all()
    assert json.loads((folder / "hippocampus_001_prediction.json").read_text())["edited_after_prediction"] is True
    labels_back = read_volume(folder / "hippocampus_001_labels.nii.gz")
    np.testing.assert_array_equal(labels_back.array, read_volume(case_paths[1]).array)
    assert json.loads((folder / "hippocampus_001_labels.json").read_text())["checkpoint"] is None
    assert messages["error"] == []


# Train ------------------------------------------------------------------------------------------------


def train_widget(viewer, tmp_path, iterations, validation=0):
    from semiseg.napari.widgets.train import TrainWidget

    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Train")
    widget.data.set_text(str(SAMPLE))
    widget.method.setCurrentText("supervised")
    widget.network_options.setText("base_filters=4")
    widget.labeled.setText("2")
    widget.validation.setValue(validation)
    widget.iterations.setValue(iterations)
    widget.validate_every.setValue(2)
    widget.workers.setValue(0)
    widget.device.combo.setCurrentText("cpu")
    widget.output.set_text(str(tmp_path / "train-run"))
    return widget


def test_train_shows_progress_and_its_model_becomes_selectable(make_napari_viewer, qtbot, tmp_path, messages):
    viewer = make_napari_viewer()
    widget = train_widget(viewer, tmp_path, iterations=4, validation=1)
    qtbot.waitUntil(lambda: "labeled" in widget.found.text(), timeout=30_000)
    assert [spin.text() for spin in widget.patch] == ["auto"] * 3 and not widget.patch[0].isEnabled()
    assert "12 labeled, 8 unlabeled" in widget.found.text() and "spacing" in widget.found.text()
    # Beside the method list: what the benchmark measured for the chosen method, following the choice.
    from semiseg.methods import evidence

    chosen = widget.method.currentText()
    for name in ("supervised", "bcp", chosen):
        widget.method.setCurrentText(name)
        shown = widget.method_evidence.text()
        assert evidence.measured(name), name
        for row in evidence.measured(name):  # a table row per labeled count and budget, with its paired test
            assert f"<td>{row.labeled}&nbsp;·&nbsp;{row.iterations}" in shown and f"{row.dice:.3f}<br>{evidence.spread(row, '&nbsp;')}({row.seeds})" in shown
            if row.p_value is not None:
                assert f"{row.delta:+.3f}<br>p {row.p_value:.2g}" in shown
            if row.equal_time:
                assert f"{row.equal_time['delta']:+.3f}&nbsp;at&nbsp;{row.equal_time['supervised_iterations']}<br>p " in shown
    # And every measured method at once, so the trade-off is seen before choosing.
    overview = widget.methods_measured.text()
    assert evidence.overview(), "the shipped evidence lists measured methods"
    for method, dice, time in evidence.overview():
        assert f"<td>{method}</td><td>{dice}</td><td>{time}</td>" in overview
    assert widget.ignore_label.text() == "none"
    widget.ignore_label.setValue(255)  # the value of unannotated voxels (the sample has none)
    click(qtbot, widget.buttons.start)
    qtbot.waitUntil(lambda: widget.process is not None and not widget.process.running and widget.buttons.start.isEnabled(), timeout=150_000)
    assert messages["error"] == [], messages
    best = str(tmp_path / "train-run" / "best")
    assert load_model(best).record.plan.ignore_label == 255
    assert widget.session.checkpoint == best
    assert [p for p in widget.view.sparkline.points] and len(widget.view.sparkline.points) == 2  # validated at 2 and 4
    assert "iteration 4/4" in widget.buttons.status.text() or "finished" in widget.buttons.status.text()
    assert load_model(best).record.iteration == 4
    # The greyed patch boxes show the patch the run chose.
    log = [json.loads(line) for line in (tmp_path / "train-run" / "log.jsonl").read_text().splitlines()]
    assert [spin.value() for spin in widget.patch] == next(e for e in log if e["type"] == "dataset")["patch_size"]
    from semiseg.napari.widgets.segment import SegmentWidget

    segment = SegmentWidget(viewer)
    assert best in [segment.model.combo.itemData(i) for i in range(segment.model.combo.count())]
    assert segment.model.path() == best


def test_train_cancel_stops_cleanly_with_a_loadable_checkpoint(make_napari_viewer, qtbot, tmp_path, messages):
    viewer = make_napari_viewer()
    widget = train_widget(viewer, tmp_path, iterations=5000)
    click(qtbot, widget.buttons.start)
    qtbot.waitUntil(lambda: "iteration" in widget.buttons.status.text(), timeout=120_000)
    click(qtbot, widget.buttons.cancel)
    cancelled_at = time.perf_counter()
    qtbot.waitUntil(lambda: not widget.process.running, timeout=30_000)
    stopped_in = time.perf_counter() - cancelled_at
    assert stopped_in < 10, stopped_in
    qtbot.waitUntil(lambda: widget.buttons.start.isEnabled(), timeout=10_000)
    assert widget.process.process.returncode == 0 and messages["error"] == []
    last = tmp_path / "train-run" / "last"
    model = load_model(last)
    assert 1 <= model.record.iteration < 5000
    log = [json.loads(line) for line in (tmp_path / "train-run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["type"] == "cancelled"
    assert widget.session.checkpoint == str(tmp_path / "train-run" / "best")
    print(f"\ntraining stopped {stopped_in:.2f} s after Cancel, at iteration {model.record.iteration}")


def test_train_starts_from_the_command_lines_defaults_and_each_methods_network(make_napari_viewer, tmp_path):
    from semiseg.config import TrainConfig, default_of, resolve_settings
    from semiseg.methods import METHODS

    train = docked(make_napari_viewer(), "Train")
    train.data.set_text(str(SAMPLE))
    train.output.set_text(str(tmp_path / "run"))
    config = train.config()
    assert (config.method, config.iterations) == (default_of("method"), default_of("iterations"))
    for name, method in METHODS.items():  # as `semiseg train --method NAME` without --network
        train.method.setCurrentText(name)
        cli = resolve_settings({**TrainConfig(data="d", output="o", method=name).to_dict()}, given={"method"})
        assert train.config().network == cli["network"] == method.paper_network
    assert {m.paper_network for m in METHODS.values()} > {"vnet"}  # the loop above saw the network change
    train.network.setCurrentText("unet")  # chosen after the method: kept
    assert train.config().network == "unet"


def test_a_job_whose_widget_was_closed_stops_and_reports_to_no_one(make_napari_viewer, qtbot, monkeypatch):
    import threading

    from semiseg.napari import training_process

    release = threading.Event()
    monkeypatch.setattr(training_process, "describe_dataset", lambda folder: release.wait(10) and {})
    viewer = make_napari_viewer()
    train = docked(viewer, "Train")
    train.data.set_text(str(SAMPLE))  # starts reading the folder in the background
    job = train.describe_job
    assert job.running
    viewer.close()  # the widget and its labels are deleted while the job runs
    qtbot.waitUntil(lambda: job.owner_closed, timeout=10_000)
    release.set()
    qtbot.waitUntil(lambda: not job.running, timeout=10_000)
    assert job.should_stop()  # and its result went nowhere: no error in Qt's event loop


def test_doomed_jobs_are_refused_before_anything_is_written(make_napari_viewer, qtbot, checkpoint, case_paths, tmp_path, messages):
    viewer = make_napari_viewer()
    image, label = open_case(viewer, case_paths)
    train = docked(viewer, "Train")
    train.output.set_text(str(tmp_path / "run"))
    for folder, reason in ((tmp_path / "missing", "not a folder"), (SAMPLE / "imagesTs", "no labeled case")):
        train.data.set_text(str(folder))
        click(qtbot, train.buttons.start)
        assert reason in messages["error"][-1] and train.process is None and not (tmp_path / "run").exists()
    # Resuming a run with no iterations left (the fixture's run did 10).
    train.data.set_text(str(SAMPLE))
    train.labeled.setText("2")
    train.validation.setValue(0)
    train.output.set_text(str(Path(checkpoint).parent))
    train.resume.setChecked(True)
    train.iterations.setValue(10)
    click(qtbot, train.buttons.start)
    assert "done 10 iterations already" in messages["error"][-1] and train.process is None

    finetune = docked(viewer, "Fine-tune on correction")
    assert finetune.model.choose(str(checkpoint))
    finetune.image.set_layer(image)
    finetune.labels.set_layer(label)
    finetune.output.set_text(str(tmp_path / "ft"))
    (tmp_path / "empty").mkdir()
    for folder, reason in ((tmp_path / "missing", "not a folder"), (tmp_path / "empty", "no images found")):
        finetune.folder.set_text(str(folder))
        click(qtbot, finetune.buttons.start)
        assert reason in messages["error"][-1] and finetune.process is None and not (tmp_path / "ft").exists()
    assert all("\n" not in text for text in messages["error"])


def test_segment_offers_only_3d_scans_and_its_status_never_keeps_an_old_error(make_napari_viewer, qtbot, checkpoint, case_paths, tmp_path, messages):
    import shutil

    viewer = make_napari_viewer()
    image, _ = open_case(viewer, case_paths)
    viewer.add_image(np.zeros((40, 50), np.float32), name="a 2D image")
    viewer.add_image(np.zeros((40, 50, 3), np.uint8), name="a photo", rgb=True)
    viewer.add_image(np.zeros((5, 40, 50, 3), np.uint8), name="an RGB volume", rgb=True)
    segment = docked(viewer, "Segment")
    assert [segment.image.itemText(i) for i in range(segment.image.count())] == [image.name]
    broken = tmp_path / "broken" / "best"
    shutil.copytree(checkpoint, broken)
    assert segment.model.choose(str(broken))
    segment.device.combo.setCurrentText("cpu")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # corrupted after it was chosen
    click(qtbot, segment.buttons.start)
    wait_job(qtbot, segment)
    assert segment.buttons.status.text().startswith("failed") and "checksum" in segment.buttons.status.text()
    viewer.layers.remove(image)
    click(qtbot, segment.buttons.start)
    assert "checksum" not in segment.buttons.status.text() and "open a scan" in segment.buttons.status.text()


def test_user_mistakes_give_one_line_messages(make_napari_viewer, qtbot, checkpoint, case_paths, tmp_path, messages):
    from semiseg.napari.widgets.export import ExportWidget
    from semiseg.napari.widgets.finetune import FineTuneWidget
    from semiseg.napari.widgets.train import TrainWidget

    viewer = make_napari_viewer()
    image, label = open_case(viewer, case_paths)
    segment = segment_widget(viewer, checkpoint)
    segment.image.set_layer(image)
    wrong = viewer.add_labels(np.zeros((3, 4, 5), np.uint8), name="elsewhere")
    segment.reference.set_layer(wrong)
    click(qtbot, segment.buttons.start)
    assert segment.job is None and "shape" in messages["error"][-1]

    train = TrainWidget(viewer)
    click(qtbot, train.buttons.start)
    assert "dataset folder" in messages["error"][-1]
    train.data.set_text(str(SAMPLE))
    train.output.set_text(str(Path(checkpoint).parent))  # holds a run
    click(qtbot, train.buttons.start)
    assert "already holds a training run" in messages["error"][-1] and train.process is None

    finetune = FineTuneWidget(viewer)
    finetune.image.set_layer(image)
    finetune.labels.set_layer(label)
    click(qtbot, finetune.buttons.start)
    assert "folder of unlabeled scans" in messages["error"][-1]
    finetune.folder.set_text(str(SAMPLE / "imagesTs"))
    finetune.output.set_text(str(tmp_path / "ft"))
    label.data = np.where(label.data > 0, 7, 0).astype(np.uint8)
    click(qtbot, finetune.buttons.start)
    assert "label values [7] are outside the declared classes" in messages["error"][-1] and not (tmp_path / "ft").exists()

    export = ExportWidget(viewer)
    for i in range(export.list.count()):
        export.list.item(i).setCheckState(Qt.CheckState.Unchecked)
    export.folder.set_text(str(tmp_path / "out"))
    click(qtbot, export.export_checked)
    assert "no label layer to export" in messages["error"][-1]
    assert all("\n" not in text for text in messages["error"]) and len(messages["error"]) == 6


def test_segment_lists_uncertain_regions_and_goes_to_the_one_clicked(make_napari_viewer, qtbot, messages):
    import SimpleITK as sitk

    from semiseg.napari._sample_data import HIPPOCAMPUS_IMAGE
    from semiseg.regions import DEFAULT_THRESHOLD, uncertain_regions

    viewer = make_napari_viewer()
    image, _ = viewer.open_sample(PLUGIN, "hippocampus")
    widget = segment_widget(viewer, REPO / "resources" / "models" / "default")
    widget.image.set_layer(image)
    click(qtbot, widget.buttons.start)
    wait_job(qtbot, widget)
    assert messages["error"] == []
    prediction, entropy = viewer.layers[f"{image.name} prediction"], viewer.layers[f"{image.name} entropy"]

    # The list holds the regions of the entropy map shown (the default model has one network), in rank order.
    listed = widget.regions
    geometry = read_volume(HIPPOCAMPUS_IMAGE).geometry
    names = {int(k): v for k, v in prediction.metadata["class_names"].items()}
    expected = uncertain_regions(Volume(np.asarray(entropy.data), geometry), Volume(np.asarray(prediction.data), geometry), names)
    assert listed.isVisibleTo(widget) and len(expected) >= 2 and listed.table.rowCount() == len(expected)
    assert f"entropy > {DEFAULT_THRESHOLD:g}" in listed.title.text()
    for row, region in enumerate(expected):
        cells = [listed.table.item(row, column).text() for column in range(4)]
        assert cells == [str(row + 1), region.class_name, f"{region.volume_ml:.3f}", f"{region.uncertainty_sum:.1f}"]

    # Clicking a row puts the viewer's current point at that region's centre, in world (physical) coordinates.
    row = 1
    rect = listed.table.visualItemRect(listed.table.item(row, 1))
    qtbot.mouseClick(listed.table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert listed.selected() == expected[row]
    # napari shows whole slices, so the point is the centre's voxel: within half a voxel of the centre.
    centre_voxel = np.rint(expected[row].centre_voxel)
    np.testing.assert_allclose(viewer.dims.point, image.data_to_world(centre_voxel), atol=1e-6)
    itk = sitk.ReadImage(str(HIPPOCAMPUS_IMAGE)).TransformContinuousIndexToPhysicalPoint(centre_voxel[::-1].tolist())
    np.testing.assert_allclose(np.asarray(viewer.dims.point)[::-1], itk, atol=1e-6)  # world = the scan's ITK physical space
    spacing = np.asarray(geometry.spacing_zyx)
    assert np.all(np.abs(np.asarray(viewer.dims.point) - image.data_to_world(expected[row].centre_voxel)) <= spacing / 2 + 1e-6)
    camera = getattr(viewer, "scene", viewer).camera
    np.testing.assert_allclose(camera.center[-2:], np.asarray(viewer.dims.point)[list(viewer.dims.displayed)], atol=1e-6)

    # Accept marks it reviewed; Correct selects the prediction for painting with the region's class.
    click(qtbot, listed.accept)
    assert listed.table.item(row, 0).text().startswith(listed.REVIEWED)
    click(qtbot, listed.correct)
    assert viewer.layers.selection.active is prediction and prediction.mode == "paint"
    if expected[row].class_id:
        assert prediction.selected_label == expected[row].class_id

    # The threshold is the reviewer's: a lower one gives the regions of the same map recomputed, more tissue in them.
    listed.threshold.setValue(0.3)
    lower = uncertain_regions(Volume(np.asarray(entropy.data), geometry), Volume(np.asarray(prediction.data), geometry), names, threshold=0.3)
    assert "entropy > 0.3" in listed.title.text() and listed.table.rowCount() == len(lower)
    assert [(r.voxels, r.class_id) for r in listed.regions] == [(r.voxels, r.class_id) for r in lower]
    assert sum(r.voxels for r in lower) > sum(r.voxels for r in expected)


@pytest.mark.skipif(not (SHARED / "samples" / "example_ct_sm.nii.gz").is_file(), reason="needs /work/shared/data")
def test_segment_warns_when_the_scan_does_not_fit_the_model_and_still_segments(make_napari_viewer, qtbot, messages, monkeypatch):
    monkeypatch.setattr("semiseg.napari.jobs.available_memory", lambda device: 1000)  # a device that holds nothing
    viewer = make_napari_viewer()
    ct = viewer.open(str(SHARED / "samples" / "example_ct_sm.nii.gz"), plugin=PLUGIN)[0]
    widget = segment_widget(viewer, REPO / "resources" / "models" / "default")
    widget.image.set_layer(ct)
    click(qtbot, widget.buttons.start)
    assert len(messages["warning"]) == 2, messages["warning"]
    assert "look like CT" in messages["warning"][0] and "spacing" in messages["warning"][1]
    assert widget.buttons.status.text().count("warning: ") == 2
    wait_job(qtbot, widget)
    assert messages["error"] == [] and f"{ct.name} prediction" in viewer.layers
    # Before predicting, the estimate warned that the scan may not fit in the device's memory.
    assert len(messages["warning"]) == 3 and "may run out of memory" in messages["warning"][2]
    assert "only 0.00 GB is free" in widget.estimate.text()


@pytest.mark.skipif(not (SHARED / "samples" / "example_ct.nii.gz").is_file(), reason="needs /work/shared/data")
def test_a_ct_opens_in_a_soft_tissue_window_and_segment_offers_bone_and_lung(make_napari_viewer, case_paths, monkeypatch):
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_info", shown.append)
    viewer = make_napari_viewer()
    [ct] = viewer.open(str(SHARED / "samples" / "example_ct.nii.gz"), plugin=PLUGIN)
    assert ct.metadata["modality"] == "CT" and tuple(ct.contrast_limits) == (-160.0, 240.0)  # level 40, width 400 HU
    assert len(shown) == 1 and "is a CT" in shown[0]
    mr, _ = open_case(viewer, case_paths)
    assert "modality" not in mr.metadata and len(shown) == 1
    segment = docked(viewer, "Segment")
    segment.image.set_layer(mr)
    assert not segment.window.isVisibleTo(segment)  # no HU windows for an MR
    segment.image.set_layer(ct)
    assert segment.window.isVisibleTo(segment) and segment.window.currentText() == "soft tissue"
    for name, limits in (("lung", (-1350.0, 150.0)), ("bone", (-500.0, 1300.0))):
        segment.window.setCurrentText(name)
        segment.window.textActivated.emit(name)  # what choosing it in the list does
        assert tuple(ct.contrast_limits) == limits
    segment.window.textActivated.emit("full range")
    assert tuple(ct.contrast_limits) == (float(ct.data.min()), float(ct.data.max()))


@pytest.mark.skipif(not (SHARED / "samples" / "example_ct.nii.gz").is_file(), reason="needs /work/shared/data")
def test_a_scan_opened_at_another_physical_place_is_brought_into_view(make_napari_viewer, case_paths):
    viewer = make_napari_viewer()
    mr, _ = open_case(viewer, case_paths)
    camera = viewer.scene.camera
    before = (tuple(viewer.dims.point), tuple(camera.center), camera.zoom)
    [ct] = viewer.open(str(SHARED / "samples" / "example_ct.nii.gz"), plugin=PLUGIN)
    low, high = np.asarray(ct.extent.world)
    assert not np.all((low <= before[0]) & (before[0] <= high))  # where the MR was shown lies outside the CT
    # The slice shown is inside the CT, and the camera looks at it, zoomed to fit it.
    point = np.asarray(viewer.dims.point)
    assert np.all((low <= point) & (point <= high)), (point, low, high)
    displayed = list(viewer.dims.displayed)
    np.testing.assert_allclose(camera.center[-2:], ((low + high) / 2)[displayed], atol=1e-6)
    assert camera.zoom < before[2]  # the CT is larger than the hippocampus crop
    # A scan where the view already is (the same CT again) leaves the view alone.
    view = (tuple(viewer.dims.point), tuple(camera.center), camera.zoom)
    viewer.open(str(SHARED / "samples" / "example_ct.nii.gz"), plugin=PLUGIN)
    assert (tuple(viewer.dims.point), tuple(camera.center), camera.zoom) == view


def test_finetune_scan_follows_the_chosen_corrected_labels(make_napari_viewer):
    viewer = make_napari_viewer()
    first = open_case(viewer, (SAMPLE / "imagesTr" / "hippocampus_001.nii.gz", SAMPLE / "labelsTr" / "hippocampus_001.nii.gz"))
    second = open_case(viewer, (SAMPLE / "imagesTr" / "hippocampus_004.nii.gz", SAMPLE / "labelsTr" / "hippocampus_004.nii.gz"))
    finetune = docked(viewer, "Fine-tune on correction")
    for scan, labels in (first, second, first):
        finetune.labels.set_layer(labels)  # labels read from a dataset: their scan by file
        assert finetune.image.layer() is scan
    # A label layer the user made on the second scan's grid, without any metadata: its scan by grid.
    drawn = viewer.add_labels(np.zeros(second[0].data.shape, np.uint8), name="drawn", affine=second[0].affine)
    finetune.labels.set_layer(drawn)
    assert finetune.image.layer() is second[0]
