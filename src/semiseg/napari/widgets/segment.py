"""The Segment widget: segment a scan with a model; uncertainty maps, uncertain regions, and against a
reference an error map with per-class metrics."""

from __future__ import annotations

import time

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QAbstractItemView, QCheckBox, QComboBox, QHeaderView, QLabel, QTableWidget, QTableWidgetItem, QVBoxLayout

from semiseg.compatibility import mismatch_warnings
from semiseg.errors import InputError, SemisegError
from semiseg.models import read_record
from semiseg.napari import jobs
from semiseg.napari.layers import ERROR_COLORS, ERROR_NAMES, format_metric, names_from_metadata, volume_from_layer
from semiseg.napari.session import session_for
from semiseg.napari.widgets.channels import ChannelRows
from semiseg.napari.widgets.common import DevicePicker, DockPanel, JobButtons, LayerChoice, ThreadJob, VolumeTable, fit_height, form, grey_label, later
from semiseg.napari.widgets.display import is_scan, show_segmentation, user_labels, volume_columns
from semiseg.napari.widgets.formatting import duration, one_line, score_note
from semiseg.napari.widgets.regions import RegionList
from semiseg.napari.widgets.session_view import CheckpointPicker
from semiseg.napari.windows import CT_WINDOWS, is_ct, window_limits, window_of

FULL_RANGE = "full range"


class SegmentWidget(DockPanel):
    """Segment a scan with a checkpoint; uncertainty maps; error map and metrics against a reference."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.job: ThreadJob | None = None
        self.last_seconds: float | None = None

        self.image = LayerChoice(napari_viewer, Image, accept=is_scan, follow_active=True)
        self.model = CheckpointPicker(self.session)
        self.device = DevicePicker()
        self.tta = QCheckBox("test-time augmentation (8 flips; 8× slower)")
        self.reference = LayerChoice(napari_viewer, Labels, none_text="none", accept=user_labels)
        self.reference.setToolTip("A reference (ground-truth) label map on the same grid: adds an error map and per-class metrics")
        self.reference.currentIndexChanged.connect(lambda index: self.session.set_reference(self.reference.layer()))
        self.window = QComboBox()
        self.window.addItems([*CT_WINDOWS, FULL_RANGE])
        self.window.setToolTip("CT display window (level/width in HU) of the scan layer")
        box, rows = form()
        rows.addRow("Scan", self.image)
        rows.addRow("Window", self.window)
        self.form = rows
        rows.addRow("Model", self.model)
        rows.addRow("Device", self.device)
        rows.addRow("", self.tta)
        rows.addRow("Reference", self.reference)
        self.estimate = grey_label()
        self.estimate.setToolTip("Network calls x the seconds of one call measured on this device at the model's first use; "
                                 "memory: the whole-volume buffers plus one batch of windows")
        rows.addRow("Estimate", self.estimate)
        self.buttons = JobButtons("Segment")
        self.errors = QLabel()
        self.errors.setWordWrap(True)
        self.table = QTableWidget(0, 5)
        self.table.setHorizontalHeaderLabels(["class", "Dice", "Jaccard", "HD95 mm", "ASD mm"])
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setVisible(False)
        self.volumes = VolumeTable()
        self.regions = RegionList(napari_viewer)
        self.prediction = None  # the prediction layer of the last segmentation
        layout = QVBoxLayout(self.body)
        layout.addWidget(box)
        layout.addWidget(self.buttons)
        self.controls = self.buttons
        layout.addWidget(self.errors)
        layout.addWidget(self.table)
        layout.addWidget(self.volumes)
        layout.addWidget(self.regions)
        layout.addStretch(1)
        self.buttons.start.clicked.connect(self.run)
        self.buttons.cancel.clicked.connect(self.cancel)
        self.window.textActivated.connect(self.apply_window)
        self.channels = ChannelRows(napari_viewer, rows, self.image, self.model)  # a model of several channels
        self.image.currentIndexChanged.connect(self._scan_chosen)
        self._scan_chosen()
        self.session.checkpoint_changed.connect(self.channels.model_chosen)
        self.channels.model_chosen()
        self.model.combo.currentIndexChanged.connect(self.show_estimate)
        self.device.combo.currentTextChanged.connect(self.show_estimate)
        self.tta.toggled.connect(self.show_estimate)
        self.volume_timer = later(self, self.show_volumes)
        self.reference.currentIndexChanged.connect(self._volumes_changed)
        self.session.labels_painted.connect(self._volumes_changed)

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
            volume = self.channels.volume(layer)
            reference_layer = self.reference.layer()
            reference = None
            if reference_layer is not None:
                reference = np.array(np.asarray(reference_layer.data), copy=True)
                if reference.shape != volume.shape:
                    raise InputError(f"the reference '{reference_layer.name}' has shape {reference.shape}, the scan {volume.shape}; choose the scan's label map")
            warnings = mismatch_warnings(volume, read_record(checkpoint).plan, source=layer.metadata.get("source_path"),
                                         reference_class_names=names_from_metadata(reference_layer.metadata) if reference_layer is not None else None)
        except SemisegError as error:
            show_error(f"semiseg: {one_line(error)}")
            self.buttons.status.setText(f"not started: {one_line(error)}")  # never an earlier run's outcome
            return
        self.buttons.busy(True)
        self.buttons.set_fraction(0.0)
        for warning in warnings:
            show_warning(f"semiseg: {warning}")
        self.buttons.status.setText("\n".join([f"segmenting '{layer.name}' on {device}…"] + [f"warning: {w}" for w in warnings]))
        self.table.setVisible(False)
        self.errors.setText("")
        function = jobs.segment_job(volume, checkpoint, device, self.tta.isChecked(), reference)
        self.job = ThreadJob(f"semiseg: segmenting {layer.name}", function,
                             lambda status, value: self._done(status, value, layer, clicked), self._progress)
        self.job.start()

    def cancel(self) -> None:
        if self.job is not None:
            self.job.stop()
            self.buttons.cancel.setEnabled(False)
            self.buttons.status.setText("cancelling…")

    def show_estimate(self, *args) -> None:
        """Time and peak memory of segmenting the chosen scan, once this model was measured on this device."""
        scan, checkpoint = self.image.layer(), self.model.path()
        try:
            known = jobs.known_estimate(volume_from_layer(scan), checkpoint, self.device.device(), self.tta.isChecked()) \
                if scan is not None and checkpoint else None
        except SemisegError:
            known = None
        if known is None:
            self.estimate.setText("measured at the first run of this model on this device")
            self.estimate.setStyleSheet("color: gray;")
        else:
            self._show_estimate(*known)

    def _show_estimate(self, estimate, available: int | None) -> None:
        self.estimate.setText(estimate.describe(available))
        self.estimate.setStyleSheet("color: gray;" if estimate.fits(available) else "color: #d55e00;")

    def _progress(self, event: dict) -> None:
        self.buttons.set_fraction(event.get("fraction"))
        if event.get("stage") == "estimate":
            estimate, available = event["estimate"], event["available"]
            self._show_estimate(estimate, available)
            if not estimate.fits(available):
                show_warning(f"semiseg: {estimate.describe(available)}")
            return
        if event.get("text"):
            eta = event.get("eta_s")
            self.buttons.status.setText(event["text"] + (f" · ETA {duration(eta)}" if eta is not None else ""))

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
        self.prediction = layers["prediction"]
        self.show_volumes()
        self.regions.show_regions(layer, layers["prediction"], result)
        self.last_seconds = time.perf_counter() - clicked
        self.buttons.set_fraction(1.0)
        self.buttons.status.setText(
            f"done in {self.last_seconds:.1f} s on {result.device} (model {result.method}"
            f"{', TTA' if result.tta else ''}); uncertainty score {result.score:.3f}")
        if result.metrics is not None:
            self._show_metrics(result)

    def _scan_chosen(self, *args) -> None:
        """Offer the CT windows for a CT only, showing the one the scan is displayed in."""
        self.show_estimate()
        self.channels.preselect()
        scan = self.image.layer()
        ct = scan is not None and is_ct(scan.data, scan.metadata)
        self.form.setRowVisible(self.window, ct)
        if ct:
            self.window.setCurrentText(window_of(scan.contrast_limits) or FULL_RANGE)

    def apply_window(self, name: str) -> None:
        scan = self.image.layer()
        if scan is None:
            return
        if name == FULL_RANGE:
            data = np.asarray(scan.data)
            scan.contrast_limits_range = scan.contrast_limits = (float(data.min()), float(data.max()))
        else:
            scan.contrast_limits = window_limits(name)

    def _volumes_changed(self, *args) -> None:
        try:
            self.volume_timer.start()
        except RuntimeError:  # this widget is closed; the session outlives it
            pass

    def show_volumes(self) -> None:
        """Per-class volumes of the prediction as predicted, as corrected (once painted on) and of the reference."""
        if self.prediction is None or self.prediction not in self.viewer.layers:
            self.volumes.setVisible(False)
            return
        self.volumes.show_columns(*volume_columns(self.prediction, self.prediction, self.reference.layer()))

    def _show_metrics(self, result: jobs.SegmentResult) -> None:
        counts = result.error_counts or {}
        self.errors.setText(
            "errors (voxels): " + ", ".join(
                f"<span style='color: rgb({int(255 * c[0])},{int(255 * c[1])},{int(255 * c[2])})'>■</span> {name} {counts.get(name, 0):,}"
                for value, name in ERROR_NAMES.items() if value for c in [ERROR_COLORS[value]]))
        note = score_note(result.checkpoint, self.prediction.metadata.get("source_path") if self.prediction is not None else None)
        if note:
            self.errors.setText(self.errors.text() + f"<br><span style='color: #d55e00;'>{note}</span>")
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
        fit_height(self.table)

