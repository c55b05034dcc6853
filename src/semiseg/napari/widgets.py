"""The dock widgets: Segment, Train, Fine-tune on correction, Review queue, Export labels.

They stay thin: model work runs in napari worker threads (`ThreadJob`, listed in napari's activity
panel with its cancel) or, for training, in a separate process (`TrainingProcess`); the logic they
call lives in the Qt-free modules of this package.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from semiseg.compatibility import mismatch_warnings
from semiseg.config import default_of, parse_options
from semiseg.errors import InputError, SemisegError
from semiseg.io import Volume
from semiseg.models import read_record
from semiseg.napari import checkpoints, jobs
from semiseg.napari._qt_common import CheckpointPicker, DevicePicker, FolderField, LayerChoice, Sparkline, ThreadJob
from semiseg.napari.layers import (
    ERROR_COLORS,
    ERROR_NAMES,
    UNCERTAINTY_COLORMAP,
    data_digest,
    format_metric,
    geometry_metadata,
    jsonable_names,
    label_features,
    labels_array,
    names_from_metadata,
    volume_from_layer,
)
from semiseg.napari.placement import TRANSFORM_KEYS, placement_of
from semiseg.napari.session import session_for
from semiseg.regions import DEFAULT_THRESHOLD, Region

OUTPUT_ROLES = ("entropy", "disagreement")
# Patch (z, y, x) offered when the user turns the automatic choice off before a run has made one.
MANUAL_PATCH = (64, 96, 96)


def _is_scan(layer) -> bool:
    """A 3D single-channel image that is not one of the plugin's uncertainty maps."""
    return layer.ndim == 3 and not getattr(layer, "rgb", False) and layer.metadata.get("role") not in OUTPUT_ROLES


def _user_labels(layer) -> bool:
    return layer.metadata.get("role") != "errors"


def _one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _default_runs() -> Path:
    return Path.home() / "semiseg-runs"


def _form() -> tuple[QWidget, QFormLayout]:
    box = QWidget()
    form = QFormLayout(box)
    form.setContentsMargins(0, 0, 0, 0)
    form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    return box, form


def _status_label() -> QLabel:
    label = QLabel()
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label


# Putting a segmentation into the viewer ----------------------------------------------------------------


def _find(viewer, name: str, kind: type):
    return next((layer for layer in viewer.layers if layer.name == name and isinstance(layer, kind)), None)


def _unedited(layer) -> bool:
    written = layer.metadata.get("written_digest")
    return written is not None and written == data_digest(np.asarray(layer.data))


def _put_layer(viewer, kind: type, name: str, data: np.ndarray, attributes: dict[str, Any], protect=()):
    """Update the layer of this name in place when that loses nothing (same shape; for label maps:
    not edited since the plugin wrote it, and not protected), else add a new layer."""
    existing = _find(viewer, name, kind)
    if existing is not None and not any(existing is p for p in protect) and np.shape(existing.data) == data.shape:
        if kind is Image or _unedited(existing):
            existing.data = data
            existing.metadata = attributes["metadata"]
            for key in TRANSFORM_KEYS:
                setattr(existing, key, attributes[key])
            if "features" in attributes:
                existing.features = attributes["features"]
            if "contrast_limits" in attributes:
                existing.contrast_limits = attributes["contrast_limits"]
            return existing
    extra = {k: v for k, v in attributes.items() if k != "name"}
    if kind is Labels:
        return viewer.add_labels(data, name=name, **extra)
    return viewer.add_image(data, name=name, **extra)


def show_segmentation(viewer, image_layer, result: jobs.SegmentResult, protect=()) -> dict[str, Any]:
    """Add (or update) the prediction, uncertainty and error-map layers of a segmentation of image_layer."""
    prediction = result.prediction
    source = image_layer.metadata.get("source_path")
    common = {
        "source_path": source,
        "image_path": source,
        "image_layer": image_layer.name,
        "checkpoint": result.checkpoint,
        "checkpoint_sha256": result.checkpoint_sha256,
        "method": result.method,
        "device": result.device,
        "tta": result.tta,
    }
    placement = placement_of(image_layer)
    geometry, shape = prediction.labels.geometry, prediction.labels.shape
    names = result.class_names
    labels = prediction.labels.array
    layers: dict[str, Any] = {}
    meta = geometry_metadata(geometry, shape, role="prediction", class_names=jsonable_names(names),
                             uncertainty_score=result.score, written_digest=data_digest(labels), **common)
    layers["prediction"] = _put_layer(viewer, Labels, f"{image_layer.name} prediction", labels,
                                      {"metadata": meta, "features": label_features(names), "opacity": 0.6, **placement}, protect)
    maps = [("entropy", prediction.entropy)] + ([("disagreement", prediction.disagreement)] if prediction.disagreement is not None else [])
    for role, volume in maps:
        meta = geometry_metadata(geometry, shape, role=role, **common)
        existing = _find(viewer, f"{image_layer.name} {role}", Image)
        layers[role] = _put_layer(viewer, Image, f"{image_layer.name} {role}", volume.array.astype(np.float32, copy=False), {
            "metadata": meta, "colormap": UNCERTAINTY_COLORMAP, "contrast_limits": [0.0, 1.0], "opacity": 0.6,
            "blending": "additive", "visible": existing.visible if existing is not None else False, **placement})
    if result.errors is not None:
        meta = geometry_metadata(geometry, shape, role="errors", written_digest=data_digest(result.errors), **common)
        colormap = DirectLabelColormap(color_dict={**ERROR_COLORS, None: (0.0, 0.0, 0.0, 0.0)})
        layers["errors"] = _put_layer(viewer, Labels, f"{image_layer.name} errors", result.errors, {
            "metadata": meta, "colormap": colormap, "opacity": 0.8,
            "features": {"index": list(ERROR_NAMES), "error": list(ERROR_NAMES.values())}, **placement})
    viewer.layers.selection.active = layers["prediction"]
    return layers


def _segment_function(volume: Volume, checkpoint: str, device, tta: bool, reference: np.ndarray | None = None):
    def run(progress, should_stop):
        progress({"stage": "loading", "fraction": 0.0, "text": "loading the model"})
        model = checkpoints.MODELS.get(checkpoint, device)
        return jobs.segment(volume, model, device, tta=tta, reference=reference, progress=progress, should_stop=should_stop)

    return run


class _JobButtons(QWidget):
    """A start button, a Cancel button, a progress bar and a status line."""

    def __init__(self, start_text: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.start = QPushButton(start_text)
        self.cancel = QPushButton("Cancel")
        self.cancel.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.progress.setTextVisible(False)
        self.status = _status_label()
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.start, 2)
        row.addWidget(self.cancel, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)

    def busy(self, busy: bool) -> None:
        self.start.setEnabled(not busy)
        self.cancel.setEnabled(busy)
        self.cancel.setText("Cancel")
        if not busy:
            self.progress.setRange(0, 1000)

    def set_fraction(self, fraction: float | None) -> None:
        if fraction is None:
            self.progress.setRange(0, 0)  # busy indicator
        else:
            self.progress.setRange(0, 1000)
            self.progress.setValue(int(1000 * min(max(fraction, 0.0), 1.0)))


# 1. Segment -------------------------------------------------------------------------------------------


class SegmentWidget(QWidget):
    """Segment a scan with a checkpoint; uncertainty maps; error map and metrics against a reference."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.job: ThreadJob | None = None
        self.last_seconds: float | None = None

        self.image = LayerChoice(napari_viewer, Image, accept=_is_scan, follow_active=True)
        self.model = CheckpointPicker(self.session)
        self.device = DevicePicker()
        self.tta = QCheckBox("test-time augmentation (8 flips; 8× slower)")
        self.reference = LayerChoice(napari_viewer, Labels, none_text="none", accept=_user_labels)
        self.reference.setToolTip("A reference (ground-truth) label map on the same grid: adds an error map and per-class metrics")
        self.reference.currentIndexChanged.connect(lambda index: self.session.set_reference(self.reference.layer()))
        box, form = _form()
        form.addRow("Scan", self.image)
        form.addRow("Model", self.model)
        form.addRow("Device", self.device)
        form.addRow("", self.tta)
        form.addRow("Reference", self.reference)
        self.buttons = _JobButtons("Segment")
        self.errors = QLabel()
        self.errors.setWordWrap(True)
        self.table = QTableWidget(0, 5)
        self.table.setHorizontalHeaderLabels(["class", "Dice", "Jaccard", "HD95 mm", "ASD mm"])
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setVisible(False)
        self.regions = _RegionList(napari_viewer)
        layout = QVBoxLayout(self)
        layout.addWidget(box)
        layout.addWidget(self.buttons)
        layout.addWidget(self.errors)
        layout.addWidget(self.table)
        layout.addWidget(self.regions)
        layout.addStretch(1)
        self.buttons.start.clicked.connect(self.run)
        self.buttons.cancel.clicked.connect(self.cancel)

    def run(self) -> None:
        if self.job is not None and self.job.running:
            return
        clicked = time.perf_counter()
        layer = self.image.layer()
        checkpoint = self.model.path()
        try:
            if layer is None:
                raise InputError("open a scan first (File > Open, or File > Open Sample > Hippocampus MRI)")
            if not checkpoint:
                raise InputError("choose a model first: train one (Train), or Browse… to a checkpoint folder")
            device = self.device.device()
            volume = volume_from_layer(layer)
            reference_layer = self.reference.layer()
            reference = None
            if reference_layer is not None:
                reference = np.array(np.asarray(reference_layer.data), copy=True)
                if reference.shape != volume.shape:
                    raise InputError(f"the reference '{reference_layer.name}' has shape {reference.shape}, the scan {volume.shape}; choose the scan's label map")
            warnings = mismatch_warnings(volume, read_record(checkpoint).plan, source=layer.metadata.get("source_path"),
                                         reference_class_names=names_from_metadata(reference_layer.metadata) if reference_layer is not None else None)
        except SemisegError as error:
            show_error(f"semiseg: {_one_line(error)}")
            self.buttons.status.setText(f"not started: {_one_line(error)}")  # never an earlier run's outcome
            return
        self.buttons.busy(True)
        self.buttons.set_fraction(0.0)
        for warning in warnings:
            show_warning(f"semiseg: {warning}")
        self.buttons.status.setText("\n".join([f"segmenting '{layer.name}' on {device}…"] + [f"warning: {w}" for w in warnings]))
        self.table.setVisible(False)
        self.errors.setText("")
        function = _segment_function(volume, checkpoint, device, self.tta.isChecked(), reference)
        self.job = ThreadJob(f"semiseg: segmenting {layer.name}", function,
                             lambda status, value: self._done(status, value, layer, clicked), self._progress)
        self.job.start()

    def cancel(self) -> None:
        if self.job is not None:
            self.job.stop()
            self.buttons.cancel.setEnabled(False)
            self.buttons.status.setText("cancelling…")

    def _progress(self, event: dict) -> None:
        self.buttons.set_fraction(event.get("fraction"))
        if event.get("text"):
            self.buttons.status.setText(event["text"])

    def _done(self, status: str, value, layer, clicked: float) -> None:
        self.buttons.busy(False)
        if status == "cancelled":
            self.buttons.set_fraction(0.0)
            self.buttons.status.setText("cancelled; nothing was changed")
            return
        if status == "error":
            self.buttons.status.setText(f"failed: {value}")
            show_error(f"semiseg: {value}")
            return
        if layer not in self.viewer.layers:
            self.buttons.status.setText("the scan's layer was closed meanwhile; result dropped")
            return
        result: jobs.SegmentResult = value
        layers = show_segmentation(self.viewer, layer, result)
        self.regions.show_regions(layer, layers["prediction"], result.regions, result.regions_map)
        self.last_seconds = time.perf_counter() - clicked
        self.buttons.set_fraction(1.0)
        self.buttons.status.setText(
            f"done in {self.last_seconds:.1f} s on {result.device} (model {result.method}"
            f"{', TTA' if result.tta else ''}); uncertainty score {result.score:.3f}")
        if result.metrics is not None:
            self._show_metrics(result)

    def _show_metrics(self, result: jobs.SegmentResult) -> None:
        counts = result.error_counts or {}
        self.errors.setText(
            "errors (voxels): " + ", ".join(
                f"<span style='color: rgb({int(255 * c[0])},{int(255 * c[1])},{int(255 * c[2])})'>■</span> {name} {counts.get(name, 0):,}"
                for value, name in ERROR_NAMES.items() if value for c in [ERROR_COLORS[value]]))
        rows = result.metrics or []
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            cells = [row["class"]] + [format_metric(row[m], m) for m in ("dice", "jaccard", "hd95", "asd")]
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if c:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.table.setItem(r, c, item)
        self.table.setVisible(True)
        self.table.setFixedHeight(self.table.horizontalHeader().height() + sum(self.table.rowHeight(i) for i in range(len(rows))) + 4)


# Uncertain regions of the Segment widget's last prediction ---------------------------------------------


class _RegionList(QWidget):
    """The uncertain regions of a prediction (semiseg.regions), most summed uncertainty first.

    Clicking a row moves the view to the region's centre; Accept marks it reviewed, Correct selects
    the prediction layer in paint mode with the region's class as the brush.
    """

    REVIEWED = "✓"

    def __init__(self, viewer) -> None:
        super().__init__()
        self.viewer = viewer
        self.regions: list[Region] = []
        self.scan = self.prediction = None
        self.title = QLabel()
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["#", "class", "mL", "Σ uncertainty"])
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setMaximumHeight(180)
        self.accept = QPushButton("Accept")
        self.accept.setToolTip("Mark the selected region reviewed")
        self.correct = QPushButton("Correct")
        self.correct.setToolTip("Paint on the prediction, with the region's class")
        buttons = QHBoxLayout()
        buttons.addWidget(self.accept)
        buttons.addWidget(self.correct)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.title)
        layout.addWidget(self.table)
        layout.addLayout(buttons)
        self.table.itemSelectionChanged.connect(self.go_to_selected)
        self.accept.clicked.connect(self.accept_selected)
        self.correct.clicked.connect(self.correct_selected)
        self.setVisible(False)

    def show_regions(self, scan, prediction, regions: list[Region], map_name: str) -> None:
        self.scan, self.prediction, self.regions = scan, prediction, regions
        self.title.setText(f"{len(regions)} uncertain region{'s' * (len(regions) != 1)} ({map_name} > {DEFAULT_THRESHOLD:g})")
        self.table.clearSelection()
        self.table.setRowCount(len(regions))
        for row, region in enumerate(regions):
            cells = [str(region.rank), region.class_name, f"{region.volume_ml:.3f}", f"{region.uncertainty_sum:.1f}"]
            for column, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if column != 1:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.table.setItem(row, column, item)
        self.setVisible(True)

    def selected(self) -> Region | None:
        rows = self.table.selectionModel().selectedRows()
        return self.regions[rows[0].row()] if rows else None

    def go_to_selected(self) -> None:
        region = self.selected()
        if region is None or self.scan not in self.viewer.layers:
            return
        # napari shows whole slices (it snaps the point to them): go to the voxel holding the centre.
        world = np.asarray(self.scan.data_to_world(np.rint(region.centre_voxel)), dtype=float)
        axes = range(self.viewer.dims.ndim - len(world), self.viewer.dims.ndim)  # the scan's axes are the last ones
        self.viewer.dims.set_point(axes, world)
        camera = getattr(self.viewer, "scene", self.viewer).camera  # viewer.camera is deprecated since napari 0.9
        camera.center = np.asarray(self.viewer.dims.point)[list(self.viewer.dims.displayed)]

    def accept_selected(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if rows:
            self.table.item(rows[0].row(), 0).setText(f"{self.REVIEWED} {self.regions[rows[0].row()].rank}")

    def correct_selected(self) -> None:
        if self.prediction is None or self.prediction not in self.viewer.layers:
            return
        region = self.selected()
        self.viewer.layers.selection.active = self.prediction
        if region is not None and region.class_id > 0:
            self.prediction.selected_label = region.class_id
        self.prediction.mode = "paint"


# Training monitor (Train and Fine-tune) ---------------------------------------------------------------


class _TrainingView(QWidget):
    """Live view of a training process: iteration, losses, ETA, validation-Dice sparkline, log."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.process = None
        self.iterations = 1
        self.dice: list[tuple[float, float]] = []
        self.last_checkpoint: str | None = None
        self.result: dict[str, Any] | None = None
        self.on_event = None
        self.on_exit = None
        self.losses = QLabel()
        self.losses.setWordWrap(True)
        self.losses.setStyleSheet("color: gray;")
        self.sparkline = Sparkline()
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(500)
        self.log.setFixedHeight(90)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.losses)
        layout.addWidget(self.sparkline)
        layout.addWidget(self.log)
        self.timer = QTimer(self)
        self.timer.setInterval(200)
        self.timer.timeout.connect(self.poll)
        self.buttons: _JobButtons | None = None

    def watch(self, process, buttons: _JobButtons, iterations: int) -> None:
        self.process = process
        self.buttons = buttons
        self.iterations = iterations
        self.dice = []
        self.result = None
        self.last_checkpoint = None
        self.sparkline.set_points([], iterations)
        self.losses.setText("")
        self.timer.start()

    def add_log(self, text: str) -> None:
        self.log.appendPlainText(text)

    def poll(self) -> None:
        if self.process is None:
            return
        for event in self.process.poll():
            self.handle(event)

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        buttons = self.buttons
        if kind == "start":
            self.add_log(f"device: {event.get('device')}")
        elif kind == "dataset":
            self.add_log(f"{event.get('description')}\ntraining on {event.get('labeled')} labeled + {event.get('unlabeled')} unlabeled, "
                         f"validating on {event.get('validation')}; patch {tuple(event.get('patch_size') or ())}")
            buttons.status.setText("preparing the scans…")
        elif kind == "prepare":
            buttons.set_fraction(None)
            buttons.status.setText(f"preprocessing scans {event.get('done')}/{event.get('total')} ({event.get('case')})")
        elif kind == "iteration":
            iteration, total = event["iteration"], event.get("iterations", self.iterations)
            self.iterations = total
            buttons.set_fraction(iteration / max(total, 1))
            buttons.status.setText(f"iteration {iteration}/{total} · loss {event.get('loss', float('nan')):.4f} · "
                                   f"{event.get('sec_per_iter', 0):.2f} s/it · ETA {_duration(event.get('eta_s'))}")
            losses = event.get("losses") or {}
            self.losses.setText("losses: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        elif kind == "validation":
            self.dice.append((event["iteration"], event["dice_mean"]))
            self.sparkline.set_points(self.dice, self.iterations)
            self.add_log(f"iteration {event['iteration']}: validation Dice {event['dice_mean']:.4f}" + (" (best)" if event.get("best") else ""))
        elif kind == "checkpoint":
            self.last_checkpoint = event.get("path")
            self.add_log(f"saved {event.get('name')} checkpoint (iteration {event.get('iteration')})")
        elif kind == "resume":
            self.add_log(f"resumed at iteration {event.get('iteration')}")
            self.dice = self._earlier_validations()
            self.sparkline.set_points(self.dice, self.iterations)
        elif kind in ("end", "cancelled"):
            self.result = event
            self.add_log(("stopped" if kind == "cancelled" else "finished") + f" at iteration {event.get('iteration')}; model: {event.get('checkpoint')}")
        elif kind == "error":
            self.add_log(f"error: {event.get('message')}")
        elif kind == "exit":
            self.timer.stop()
            process, self.process = self.process, None
            if process is not None:
                process.close()
        if self.on_event is not None:
            self.on_event(event)

    def stop_timer(self) -> None:
        self.timer.stop()

    def _earlier_validations(self) -> list[tuple[float, float]]:
        """A resumed run's validation history so far, from its last checkpoint."""
        folder = getattr(self.process, "output", None)
        record = read_record_safe(str(folder / "last")) if folder is not None else None
        history = record.validation_history if record is not None else []
        return [(h["iteration"], h["dice_mean"]) for h in history if "iteration" in h and "dice_mean" in h]


# 2. Train ---------------------------------------------------------------------------------------------


class TrainWidget(QWidget):
    """Train a method on a dataset folder, in a separate process, with live progress and clean Cancel."""

    FORCE_AFTER_S = 60.0

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        from semiseg.methods import METHODS, evidence
        from semiseg.networks import NETWORKS

        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.process = None
        self.describe_job: ThreadJob | None = None
        self.data = FolderField("dataset folder (imagesTr/labelsTr, images/labels, LA h5, or scans)", "Choose a dataset folder")
        self.found = QLabel("Choose a dataset folder to see what it holds.")
        self.found.setWordWrap(True)
        self.found.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        self.found.setStyleSheet("color: gray;")
        self.method = QComboBox()
        for name, method in sorted(METHODS.items()):
            self.method.addItem(name)
            self.method.setItemData(self.method.count() - 1, method.summary, Qt.ItemDataRole.ToolTipRole)
        # What the benchmark measured for the chosen method, so the trade-off is seen before starting.
        self.method_evidence = QLabel()
        self.method_evidence.setWordWrap(True)
        self.method_evidence.setStyleSheet("color: gray;")
        self.method_evidence.setToolTip(evidence.benchmark_note())
        self.method.currentTextChanged.connect(lambda name: self.method_evidence.setText(evidence.describe(name)))
        self.method.setCurrentText(default_of("method"))
        self.method_evidence.setText(evidence.describe(self.method.currentText()))
        self.network = QComboBox()
        self.network.addItems(sorted(NETWORKS))
        self.network.setCurrentText("vnet")
        self.network_options = QLineEdit()
        self.network_options.setPlaceholderText("e.g. base_filters=8 (default: the network's own)")
        self.labeled = QLineEdit(default_of("labeled"))
        self.labeled.setToolTip("labeled cases used with their labels: a count (8), a percentage (10%), or a list file of case ids; all other scans train unlabeled")
        self.validation = QSpinBox()
        self.validation.setRange(0, 10_000)
        self.validation.setValue(2)
        self.iterations = QSpinBox()
        self.iterations.setRange(1, 1_000_000)
        self.iterations.setValue(300)
        self.validate_every = QSpinBox()
        self.validate_every.setRange(1, 1_000_000)
        self.validate_every.setValue(50)
        self.auto_patch = QCheckBox("auto")
        self.auto_patch.setChecked(True)
        self.patch = [QSpinBox() for _ in range(3)]
        patch_row = QHBoxLayout()
        patch_row.setContentsMargins(0, 0, 0, 0)
        patch_row.addWidget(self.auto_patch)
        for spin in self.patch:
            spin.setRange(0, 1024)
            spin.setSingleStep(16)
            spin.setSpecialValueText("auto")  # 0: chosen by the run, from the dataset (shown once it has)
            patch_row.addWidget(spin)
        self.auto_patch.toggled.connect(self._auto_patch_toggled)
        self._auto_patch_toggled(True)
        patch_box = QWidget()
        patch_box.setLayout(patch_row)
        self.batch = QSpinBox()
        self.batch.setRange(1, 256)
        self.batch.setValue(2)
        self.workers = QSpinBox()
        self.workers.setRange(0, 64)
        self.workers.setValue(2)
        self.device = DevicePicker()
        self.output = FolderField("output folder for checkpoints and the log", "Choose the output folder",
                                  str(_default_runs() / f"run-{_stamp()}"))
        self.resume = QCheckBox("continue the run already in the output folder")
        box, form = _form()
        form.addRow("Dataset", self.data)
        form.addRow("", self.found)
        form.addRow("Method", self.method)
        form.addRow("", self.method_evidence)
        form.addRow("Network", self.network)
        form.addRow("Network options", self.network_options)
        form.addRow("Labeled", self.labeled)
        form.addRow("Validation cases", self.validation)
        form.addRow("Iterations", self.iterations)
        form.addRow("Validate every", self.validate_every)
        form.addRow("Patch (z y x)", patch_box)
        form.addRow("Batch size", self.batch)
        form.addRow("Loader workers", self.workers)
        form.addRow("Device", self.device)
        form.addRow("Output", self.output)
        form.addRow("", self.resume)
        self.buttons = _JobButtons("Start training")
        self.view = _TrainingView()
        self.view.on_event = self._event
        layout = QVBoxLayout(self)
        layout.addWidget(box)
        layout.addWidget(self.buttons)
        layout.addWidget(self.view)
        layout.addStretch(1)
        self.data.changed.connect(self._describe)
        self.buttons.start.clicked.connect(self.start)
        self.buttons.cancel.clicked.connect(self.cancel)
        self.force_timer = QTimer(self)
        self.force_timer.setSingleShot(True)
        self.force_timer.timeout.connect(self._offer_force)

    def _auto_patch_toggled(self, auto: bool) -> None:
        for spin, manual in zip(self.patch, MANUAL_PATCH):
            spin.setEnabled(not auto)
            spin.setMinimum(0 if auto else 8)
            if auto:
                spin.setValue(0)
            elif spin.value() < 8:
                spin.setValue(manual)

    def _show_patch(self, patch_size) -> None:
        """The patch size a run chose itself, in the greyed boxes."""
        if self.auto_patch.isChecked() and patch_size:
            for spin, value in zip(self.patch, patch_size):
                spin.setValue(int(value))

    # Dataset description --------------------------------------------------------------------------
    def _describe(self, folder: str) -> None:
        if not folder:
            return
        self._auto_patch_toggled(self.auto_patch.isChecked())  # another dataset: its patch is not known yet
        from semiseg.napari.training_process import describe_dataset

        self.found.setText("looking…")
        self.describe_job = ThreadJob("semiseg: reading a dataset folder", lambda progress, should_stop: describe_dataset(folder), self._described)
        self.describe_job.start()

    def _described(self, status: str, value) -> None:
        if status != "ok":
            self.found.setText(f"<span style='color: #d55e00'>{value or 'cancelled'}</span>")
            return
        self.found.setText(f"{value['description']}<br>{value['spacing']}")
        self.validation.setMaximum(max(value["labeled"] - 1, 0))

    # Running --------------------------------------------------------------------------------------
    def config(self):
        from semiseg.config import TrainConfig

        data, output = self.data.text(), self.output.text()
        if not data:
            raise InputError("choose a dataset folder")
        if not output:
            raise InputError("choose an output folder")
        out = Path(output).expanduser()
        holds_run = (out / "last").exists() or (out / "best").exists()
        if holds_run and not self.resume.isChecked():
            raise InputError(f"{out} already holds a training run: tick 'continue the run' to resume it, or choose another output folder")
        iterations = self.iterations.value()
        return TrainConfig(
            data=str(Path(data).expanduser()), output=str(out), method=self.method.currentText(), network=self.network.currentText(),
            network_options=parse_options(self.network_options.text()), labeled=self.labeled.text().strip() or default_of("labeled"),
            validation=str(self.validation.value()), iterations=iterations, batch_size=self.batch.value(),
            patch_size=None if self.auto_patch.isChecked() else tuple(s.value() for s in self.patch),
            validate_every=self.validate_every.value(), log_every=1 if iterations <= 2000 else 5,
            device=self.device.name(), workers=self.workers.value(), resume=self.resume.isChecked() and holds_run,
        )

    def start(self) -> None:
        from semiseg.napari.preflight import check_training
        from semiseg.napari.training_process import cli_command

        if self.process is not None and self.process.running:
            return
        try:
            self.device.device()
            config = self.config()
            check_training(config)
        except SemisegError as error:
            show_error(f"semiseg: {_one_line(error)}")
            return
        self.process = _start_training_process(config, self.view, self.buttons, f"same as: {cli_command(config)}",
                                               "starting the training process…")

    def cancel(self) -> None:
        if self.process is None:
            return
        if self.process.stop_requested_at is not None and self.buttons.cancel.text().startswith("Force"):
            self.process.kill()
            self.buttons.status.setText("killed; the last checkpoint saved before is intact")
            return
        self.process.stop()
        self.buttons.cancel.setEnabled(False)
        self.buttons.cancel.setText("Stopping…")
        self.buttons.status.setText("stopping after this iteration and saving the last checkpoint…")
        self.force_timer.start(int(self.FORCE_AFTER_S * 1000))

    def _offer_force(self) -> None:
        if self.process is not None and self.process.running:
            self.buttons.cancel.setText("Force stop")
            self.buttons.cancel.setToolTip("Ends the process at once; checkpoints saved before stay intact")
            self.buttons.cancel.setEnabled(True)

    def _event(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "dataset":
            self._show_patch(event.get("patch_size"))
        elif kind in ("end", "cancelled"):
            best = event.get("checkpoint")
            if best and checkpoints.is_checkpoint(best):
                self.session.finish_run(best)
                self.buttons.status.setText(("stopped" if kind == "cancelled" else "finished") +
                                            f" at iteration {event.get('iteration')}; the model {best} is now selectable in Segment")
                show_info(f"semiseg: training {'stopped' if kind == 'cancelled' else 'finished'}; model: {best}")
        elif kind == "error":
            show_error(f"semiseg: training failed: {event.get('message')}")
            self.buttons.status.setText(f"failed: {event.get('message')}")
        elif kind == "exit":
            self.force_timer.stop()
            self.buttons.busy(False)
            out = Path(self.output.text()).expanduser()
            if out.parent == _default_runs() and out.name.startswith("run-") and (out / "last").exists():
                self.output.set_text(str(_default_runs() / f"run-{_stamp()}"))  # ready for the next run
            if event.get("returncode") not in (0, None) and self.view.result is None and event.get("error") and "failed" not in self.buttons.status.text():
                show_error(f"semiseg: training failed: {event.get('error')}")
                self.buttons.status.setText(f"failed: {event.get('error')}")
            if self.view.result is not None:
                self.buttons.set_fraction(1.0 if self.view.result.get("type") == "end" else self.buttons.progress.value() / 1000)

    def closeEvent(self, event) -> None:  # noqa: N802
        if self.process is not None and self.process.running:
            self.process.stop()  # clean stop: the child saves its last checkpoint
        super().closeEvent(event)


def _start_training_process(config, view: _TrainingView, buttons: _JobButtons, first_line: str, status: str):
    """Start `semiseg train` in its own process and show its progress in view and buttons; None if it cannot start."""
    from semiseg.napari.training_process import TrainingProcess

    process = TrainingProcess(config)
    try:
        process.start()
    except OSError as error:
        show_error(f"semiseg: cannot start the training process ({error})")
        return None
    view.log.clear()
    view.add_log(first_line)
    buttons.busy(True)
    buttons.set_fraction(None)
    buttons.status.setText(status)
    view.watch(process, buttons, config.iterations)
    return process


# 3. Fine-tune on this correction ----------------------------------------------------------------------


class FineTuneWidget(QWidget):
    """One click: save the corrected labels, fine-tune the current model on them plus a folder's
    unlabeled scans (separate process), select the new model and re-predict the scan."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        from semiseg.methods import METHODS

        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.process = None
        self.job: ThreadJob | None = None
        self.state: dict[str, Any] = {}
        self.correction_path: Path | None = None
        self.new_checkpoint: str | None = None
        self.image = LayerChoice(napari_viewer, Image, accept=_is_scan)
        self.labels = LayerChoice(napari_viewer, Labels, accept=_user_labels)
        self.model = CheckpointPicker(self.session)
        self.folder = FolderField("folder of unlabeled scans (or a dataset folder)", "Choose the folder of unlabeled scans")
        self.use_labels = QCheckBox("also train on the folder's labeled scans, if any")
        self.use_labels.setChecked(True)
        self.method = QComboBox()
        self.method.addItem("same as the model", None)
        for name, method in sorted(METHODS.items()):
            self.method.addItem(name, name)
            self.method.setItemData(self.method.count() - 1, method.summary, Qt.ItemDataRole.ToolTipRole)
        self.iterations = QSpinBox()
        self.iterations.setRange(1, 100_000)
        self.iterations.setValue(50)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(4)
        self.lr.setRange(0.0001, 1.0)
        self.lr.setSingleStep(0.005)
        self.lr.setValue(0.01)
        self.device = DevicePicker()
        self.output = FolderField("where corrections and fine-tuned models go", "Choose the output folder",
                                  str(_default_runs() / "fine-tuning"))
        box, form = _form()
        form.addRow("Scan", self.image)
        form.addRow("Corrected labels", self.labels)
        form.addRow("Start from", self.model)
        form.addRow("Unlabeled scans", self.folder)
        form.addRow("", self.use_labels)
        form.addRow("Method", self.method)
        form.addRow("Iterations", self.iterations)
        form.addRow("Learning rate", self.lr)
        form.addRow("Device", self.device)
        form.addRow("Output", self.output)
        self.buttons = _JobButtons("Fine-tune on this correction")
        self.view = _TrainingView()
        self.view.sparkline.setVisible(False)
        self.view.on_event = self._event
        layout = QVBoxLayout(self)
        layout.addWidget(box)
        layout.addWidget(self.buttons)
        layout.addWidget(self.view)
        layout.addStretch(1)
        self.buttons.start.clicked.connect(self.run)
        self.buttons.cancel.clicked.connect(self.cancel)
        self._preselect_correction()
        self.session.labels_painted.connect(self._painted)

    def _preselect_correction(self) -> None:
        """The label layer painted last; else any but Segment's reference."""
        painted, reference = self.session.last_painted(), self.session.reference()
        if painted is not None and painted is not reference:
            self.labels.set_layer(painted)
        elif self.labels.layer() is reference:
            others = [layer for layer in self.labels.layers() if layer is not reference]
            if others:
                self.labels.set_layer(others[-1])

    def _painted(self, layer) -> None:
        try:
            if layer is not self.session.reference():
                self.labels.set_layer(layer)
        except RuntimeError:  # this widget is closed; the session outlives it
            pass

    def run(self) -> None:
        from semiseg.models import read_record
        from semiseg.napari.finetune import FineTuneRequest, check_labels, finetune_config, image_on_disk, save_correction
        from semiseg.napari.preflight import check_unlabeled_folder

        if (self.process is not None and self.process.running) or (self.job is not None and self.job.running):
            return
        image, labels, checkpoint = self.image.layer(), self.labels.layer(), self.model.path()
        try:
            if image is None or labels is None:
                raise InputError("choose the scan and the corrected Labels layer")
            if not checkpoint:
                raise InputError("choose the model to start from (Segment or Train first, or Browse…)")
            if not self.folder.text():
                raise InputError("choose the folder of unlabeled scans to train with")
            if not self.output.text():
                raise InputError("choose an output folder")
            self.device.device()
            check_unlabeled_folder(self.folder.text())
            volume = volume_from_layer(image)
            correction = volume_from_layer(labels, copy=True)
            if correction.shape != volume.shape:
                raise InputError(f"'{labels.name}' has shape {correction.shape}, the scan {volume.shape}; choose the scan's labels")
            check_labels(correction.array, read_record(checkpoint).class_names, labels.name)
            if not correction.array.any():
                show_warning(f"semiseg: '{labels.name}' is empty: fine-tuning will learn that this scan holds no structure")
            output = Path(self.output.text()).expanduser()
            # The correction is saved before anything else runs: whatever happens next, it is on disk.
            correction_volume = Volume(labels_array(correction.array, labels.name), volume.geometry)
            self.correction_path = save_correction(correction_volume, output, image.name)
            labels.metadata = {**labels.metadata, "correction_file": str(self.correction_path)}
            image_path = image_on_disk(volume, image.metadata.get("source_path"), output, image.name)
            run_dir = output / f"{image.name}-{Path(checkpoint).name}-{_stamp()}"
            config = finetune_config(FineTuneRequest(
                checkpoint=str(checkpoint), folder=str(Path(self.folder.text()).expanduser()), output=str(run_dir),
                image_path=str(image_path), label_path=str(self.correction_path), method=self.method.currentData(),
                iterations=self.iterations.value(), lr=self.lr.value(), device=self.device.name(),
                use_folder_labels=self.use_labels.isChecked()))
        except SemisegError as error:
            show_error(f"semiseg: {_one_line(error)}")
            return
        except OSError as error:
            show_error(f"semiseg: {error.filename or ''} {error.strerror or error}")
            return
        self.state = {"image": image, "labels": labels, "checkpoint": checkpoint, "device": self.device.device()}
        self.new_checkpoint = None
        self.process = _start_training_process(config, self.view, self.buttons, f"correction saved: {self.correction_path}",
                                               f"correction saved to {self.correction_path.name}; starting fine-tuning…")

    def cancel(self) -> None:
        if self.process is not None and self.process.running:
            self.process.stop()
            self.state["cancelled"] = True
            self.buttons.cancel.setEnabled(False)
            self.buttons.status.setText("stopping; the correction stays saved")
        elif self.job is not None and self.job.running:
            self.job.stop()
            self.buttons.cancel.setEnabled(False)

    def _event(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "end":
            self.new_checkpoint = event.get("checkpoint")
        elif kind == "error":
            show_error(f"semiseg: fine-tuning failed: {event.get('message')}")
            self.buttons.status.setText(f"failed: {event.get('message')} (the correction stays saved: {self.correction_path})")
        elif kind == "exit":
            if self.new_checkpoint and checkpoints.is_checkpoint(self.new_checkpoint) and not self.state.get("cancelled"):
                self.session.finish_run(self.new_checkpoint)
                self._repredict()
                return
            self.buttons.busy(False)
            if self.state.get("cancelled"):
                self.buttons.status.setText(f"stopped; the correction stays saved: {self.correction_path}")
            elif event.get("returncode") not in (0, None) and "failed" not in self.buttons.status.text():
                show_error(f"semiseg: fine-tuning failed: {event.get('error')}")
                self.buttons.status.setText(f"failed: {event.get('error')}")

    def _repredict(self) -> None:
        image = self.state["image"]
        if image not in self.viewer.layers:
            self.buttons.busy(False)
            self.buttons.status.setText(f"fine-tuned: {self.new_checkpoint} (the scan's layer was closed, so no new prediction)")
            return
        try:
            volume = volume_from_layer(image)
        except SemisegError as error:
            self.buttons.busy(False)
            show_error(f"semiseg: {_one_line(error)}")
            return
        self.buttons.status.setText("fine-tuned; predicting the scan again…")
        self.buttons.set_fraction(0.0)
        self.job = ThreadJob(f"semiseg: re-predicting {image.name}",
                             _segment_function(volume, self.new_checkpoint, self.state["device"], False),
                             self._repredicted, lambda e: self.buttons.set_fraction(e.get("fraction")))
        self.job.start()

    def _repredicted(self, status: str, value) -> None:
        self.buttons.busy(False)
        image, labels = self.state["image"], self.state["labels"]
        if status != "ok":
            self.buttons.status.setText(f"fine-tuned ({self.new_checkpoint}); re-prediction {status}: {value or ''}")
            if status == "error":
                show_error(f"semiseg: {value}")
            return
        if labels in self.viewer.layers and labels.name == f"{image.name} prediction":
            # The user corrected the prediction layer itself: it stays as the correction.
            labels.name = f"{image.name} correction"
            labels.metadata = {**labels.metadata, "role": "correction"}
        show_segmentation(self.viewer, image, value, protect=(labels,))
        if labels in self.viewer.layers:
            self.labels.set_layer(labels)  # the prediction became the active layer; the correction stays chosen here
        self.buttons.set_fraction(1.0)
        self.buttons.status.setText(f"done: correction saved as {self.correction_path.name}; new model {self.new_checkpoint} "
                                    "(selected); prediction updated")
        show_info(f"semiseg: fine-tuned model {self.new_checkpoint}; prediction updated")

    def closeEvent(self, event) -> None:  # noqa: N802
        if self.process is not None and self.process.running:
            self.process.stop()
        super().closeEvent(event)


# 4. Review queue --------------------------------------------------------------------------------------


class ReviewWidget(QWidget):
    """Predict a folder of scans, rank them most uncertain first, open the next one to review."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.job: ThreadJob | None = None
        self.folder = FolderField("folder of unlabeled scans", "Choose a folder of scans to review")
        self.model = CheckpointPicker(self.session)
        self.device = DevicePicker()
        box, form = _form()
        form.addRow("Scans", self.folder)
        form.addRow("Model", self.model)
        form.addRow("Device", self.device)
        self.buttons = _JobButtons("Rank by uncertainty")
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["#", "scan", "uncertainty", "reviewed"])
        self.table.verticalHeader().setVisible(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setMinimumHeight(160)
        self.open_next = QPushButton("Open next most uncertain")
        self.open_next.setEnabled(False)
        layout = QVBoxLayout(self)
        layout.addWidget(box)
        layout.addWidget(self.buttons)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.open_next)
        self.buttons.start.clicked.connect(self.rank)
        self.buttons.cancel.clicked.connect(lambda: self.job.stop() if self.job else None)
        self.open_next.clicked.connect(self.next)
        self.table.cellDoubleClicked.connect(lambda row, column: self.open_entry(self.queue.entries[row]) if self.queue else None)
        self.session.review_changed.connect(self.refresh)
        self.refresh()

    @property
    def queue(self):
        """The window's review queue: every Review widget of the window shows the same one."""
        return self.session.review_queue

    def rank(self) -> None:
        from semiseg.models import read_record
        from semiseg.napari.review import ReviewQueue, list_scans

        if self.job is not None and self.job.running:
            return
        folder, checkpoint = self.folder.text(), self.model.path()
        try:
            if not folder:
                raise InputError("choose a folder of scans")
            if not checkpoint:
                raise InputError("choose a model first (Train, or Browse…)")
            device = self.device.device()
            list_scans(folder)
            queue = ReviewQueue(Path(folder).expanduser(), checkpoint, read_record(checkpoint).weights_sha256)
        except SemisegError as error:
            show_error(f"semiseg: {_one_line(error)}")
            return

        def run(progress, should_stop):
            model = checkpoints.MODELS.get(checkpoint, device)
            return queue.rank(model, device, jobs.segment, progress, should_stop)

        self.session.review_queue = queue
        self.buttons.busy(True)
        self.buttons.set_fraction(0.0)
        self.buttons.status.setText("predicting the scans…")
        self.job = ThreadJob(f"semiseg: ranking {Path(folder).name}", run, self._ranked, self._progress)
        self.job.start()

    def _progress(self, event: dict) -> None:
        self.buttons.set_fraction(event.get("fraction"))
        self.buttons.status.setText(event.get("text", ""))

    def _ranked(self, status: str, value) -> None:
        self.buttons.busy(False)
        if status == "error":
            show_error(f"semiseg: {value}")
            self.buttons.status.setText(f"failed: {value}")
            return
        if status == "cancelled":
            self.buttons.status.setText("cancelled; scans predicted so far are kept for next time")
            return
        self.buttons.set_fraction(1.0)
        failed = [e for e in self.queue.entries if e.error]
        self.buttons.status.setText(f"{len(self.queue.entries) - len(failed)} scans ranked, most uncertain first"
                                    + (f"; {len(failed)} could not be read (hover them)" if failed else ""))
        self.session.review_changed.emit()

    def refresh(self) -> None:
        entries = self.queue.entries if self.queue else []
        try:
            self.table.setRowCount(len(entries))
            for row, entry in enumerate(entries):
                score = "error" if entry.error else ("" if entry.score is None else f"{entry.score:.4f}")
                for column, text in enumerate([str(row + 1), entry.name, score, "✓" if entry.reviewed else ""]):
                    item = QTableWidgetItem(text)
                    item.setToolTip(entry.error or entry.scan)
                    self.table.setItem(row, column, item)
            self.open_next.setEnabled(self.queue is not None and self.queue.next_unreviewed() is not None)
        except RuntimeError:  # this widget is closed; the session outlives it
            pass

    def next(self):
        entry = self.queue.next_unreviewed() if self.queue else None
        if entry is None:
            show_info("semiseg: every ranked scan has been reviewed")
            return None
        return self.open_entry(entry)

    def open_entry(self, entry):
        from semiseg.io import read_volume
        from semiseg.napari._reader import read_layers

        if entry.labels is None:
            show_error(f"semiseg: {entry.name} has no prediction ({entry.error or 'not ranked yet'})")
            return None
        try:
            data, attributes, _ = read_layers(entry.scan)[0]
            labels = read_volume(entry.labels)
            entropy = read_volume(entry.entropy) if entry.entropy else None
        except SemisegError as error:
            show_error(f"semiseg: {_one_line(error)}")
            return None
        image = self.viewer.add_image(data, **attributes)
        record = read_record_safe(self.queue.checkpoint)
        names = record.class_names if record is not None else None
        common = {"source_path": entry.scan, "image_path": entry.scan, "image_layer": image.name, "checkpoint": self.queue.checkpoint,
                  "checkpoint_sha256": record and record.weights_sha256, "method": record and record.method}
        placement = placement_of(image)
        prediction = labels.array.astype(np.uint8, copy=False)
        self.viewer.add_labels(prediction, name=f"{image.name} prediction", opacity=0.6, features=label_features(names), **placement,
                               metadata=geometry_metadata(labels.geometry, labels.shape, role="prediction", class_names=jsonable_names(names),
                                                          uncertainty_score=entry.score, written_digest=data_digest(prediction), **common))
        if entropy is not None:
            self.viewer.add_image(entropy.array, name=f"{image.name} entropy", colormap=UNCERTAINTY_COLORMAP, contrast_limits=[0.0, 1.0],
                                  opacity=0.6, blending="additive", visible=False, **placement,
                                  metadata=geometry_metadata(entropy.geometry, entropy.shape, role="entropy", **common))
        self.viewer.layers.selection.active = self.viewer.layers[f"{image.name} prediction"]
        self.queue.mark_reviewed(entry)
        self.session.review_changed.emit()
        self.table.selectRow(self.queue.entries.index(entry))
        self.buttons.status.setText(f"opened {entry.name} (uncertainty {entry.score:.4f})")
        return image


def read_record_safe(path: str | None):
    from semiseg.models import read_record

    try:
        return read_record(path) if path else None
    except SemisegError:
        return None


# 5. Export --------------------------------------------------------------------------------------------


class ExportWidget(QWidget):
    """Save label maps on their scans' grids, each with a sidecar JSON naming the model and its hash."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        from semiseg.napari.export import EXPORT_SUFFIXES

        self.viewer = napari_viewer
        self.list = QListWidget()
        self.list.setMinimumHeight(120)
        self.folder = FolderField("folder to export into", "Choose the export folder")
        self.format = QComboBox()
        self.format.addItems(list(EXPORT_SUFFIXES))
        box, form = _form()
        form.addRow("Folder", self.folder)
        form.addRow("Format", self.format)
        self.export_checked = QPushButton("Export checked")
        self.export_all = QPushButton("Export all")
        row = QHBoxLayout()
        row.addWidget(self.export_checked)
        row.addWidget(self.export_all)
        self.status = _status_label()
        group = QGroupBox("Label layers")
        group_layout = QVBoxLayout(group)
        group_layout.addWidget(self.list)
        layout = QVBoxLayout(self)
        layout.addWidget(group, 1)
        layout.addWidget(box)
        layout.addLayout(row)
        layout.addWidget(self.status)
        self.export_checked.clicked.connect(lambda: self.export(only_checked=True))
        self.export_all.clicked.connect(lambda: self.export(only_checked=False))
        self._watched: set[int] = set()
        events = napari_viewer.layers.events
        for event in (events.inserted, events.removed, events.reordered):
            event.connect(self.refresh)
        self.refresh()

    def refresh(self, event=None) -> None:
        try:
            checked = {self.list.item(i).text() for i in range(self.list.count()) if self.list.item(i).checkState() == Qt.CheckState.Checked}
            known = {self.list.item(i).text() for i in range(self.list.count())}
            self.list.clear()
            for layer in self.viewer.layers:
                if isinstance(layer, Labels):
                    item = QListWidgetItem(layer.name)
                    role = layer.metadata.get("role")
                    default = role in ("prediction", "correction") and layer.name not in known
                    item.setCheckState(Qt.CheckState.Checked if layer.name in checked or default else Qt.CheckState.Unchecked)
                    item.setToolTip(f"{role or 'labels'}; from {layer.metadata.get('checkpoint') or layer.metadata.get('source_path') or 'this session'}")
                    self.list.addItem(item)
                    if id(layer) not in self._watched:
                        self._watched.add(id(layer))
                        layer.events.name.connect(self.refresh)
        except RuntimeError:
            pass

    def chosen_layers(self, only_checked: bool) -> list:
        names = [self.list.item(i).text() for i in range(self.list.count())
                 if not only_checked or self.list.item(i).checkState() == Qt.CheckState.Checked]
        return [layer for layer in self.viewer.layers if isinstance(layer, Labels) and layer.name in names]

    def confirm_overwrite(self, paths: list[Path]) -> bool:
        listed = "\n".join(str(p) for p in paths[:8]) + (f"\n… and {len(paths) - 8} more" if len(paths) > 8 else "")
        answer = QMessageBox.question(self, "Replace existing files?", f"These files exist already:\n{listed}\n\nReplace them?",
                                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def export(self, only_checked: bool = True) -> list[Path]:
        from semiseg.napari.export import existing, export, export_item, targets

        layers = self.chosen_layers(only_checked)
        folder = self.folder.text()
        try:
            if not layers:
                raise InputError("no label layer to export" + (" is checked" if only_checked else ""))
            if not folder:
                raise InputError("choose the export folder")
            folder_path = Path(folder).expanduser()
            folder_path.mkdir(parents=True, exist_ok=True)
            items = [export_item(layer, self.viewer.layers) for layer in layers]
            suffix = self.format.currentText()
            clashes = existing(targets(items, folder_path, suffix))
            if clashes and not self.confirm_overwrite(clashes):
                self.status.setText("nothing exported (existing files kept)")
                return []
            written = export(items, folder_path, suffix, overwrite=bool(clashes))
        except SemisegError as error:
            show_error(f"semiseg: {_one_line(error)}")
            return []
        except OSError as error:
            show_error(f"semiseg: cannot export: {error.strerror or error} {error.filename or ''}")
            return []
        models = {item.metadata.get("checkpoint_sha256") for item in items if item.metadata.get("checkpoint_sha256")}
        self.status.setText(f"exported {len(written)} label map(s) to {folder_path}: " + ", ".join(p.name for p in written)
                            + ", each with a .json sidecar" + (f" naming the model (weights SHA-256 {', '.join(m[:12] + '…' for m in models)})" if models else ""))
        show_info(f"semiseg: exported {len(written)} label map(s) to {folder_path}")
        return written
