"""The Fine-tune widget: one click saves the corrected labels, fine-tunes the current model on them
plus a folder's unlabeled scans (separate process), checks the new model against the old one on
held-out cases (the guard), selects it unless it got worse and re-predicts the scan."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import QCheckBox, QDoubleSpinBox, QGroupBox, QPushButton, QSpinBox, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from semiseg.errors import InputError, SemisegError
from semiseg.finetuning import BeforeAfter, FineTuneRequest
from semiseg.io import Volume
from semiseg.napari import checkpoints, jobs
from semiseg.napari.layers import labels_array, volume_from_layer
from semiseg.napari.session import session_for
from semiseg.napari.widgets.channels import ChannelRows
from semiseg.napari.widgets.common import (
    DevicePicker, DockPanel, FolderField, JobButtons, LayerChoice, ThreadJob, VolumeTable, fit_height, form, grey_label, later, method_choice,
)
from semiseg.napari.widgets.display import is_scan, prediction_of, scan_of, show_segmentation, user_labels, volume_columns
from semiseg.napari.widgets.formatting import default_runs, one_line, stamp
from semiseg.napari.widgets.session_view import CheckpointPicker
from semiseg.napari.widgets.training_view import TrainingView

# The engine's fine-tuning recipe (benchmarks/results/finetune_recipes.md): the widget's starting values.
RECIPE = {field.name: field.default for field in fields(FineTuneRequest)}


class GuardPanel(QGroupBox):
    """The before/after check: each model's mean Dice on the held-out cases, the verdict, and a way to
    take a rejected model anyway."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Before / after (held-out cases)", parent)
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["model", "mean Dice", "cases lower"])
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.verdict = grey_label()
        self.use_anyway = QPushButton("Use the new model anyway")
        self.use_anyway.setVisible(False)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table)
        layout.addWidget(self.verdict)
        layout.addWidget(self.use_anyway)
        self.setVisible(False)

    def show_result(self, result: BeforeAfter | None, text: str, rejected: bool) -> None:
        rows = [] if result is None else [("before", result.before_mean, ""), ("after", result.after_mean, str(result.cases_worse))]
        self.table.setRowCount(len(rows))
        for row, cells in enumerate(rows):
            for column, value in enumerate(cells):
                self.table.setItem(row, column, QTableWidgetItem(f"{value:.4f}" if isinstance(value, float) else value))
        self.table.setVisible(bool(rows))
        fit_height(self.table)
        self.verdict.setText(text)
        self.verdict.setStyleSheet("color: #d9534f;" if rejected else "color: gray;")
        self.use_anyway.setVisible(rejected)
        self.setVisible(True)

    def rows(self) -> list[list[str]]:
        return [[self.table.item(r, c).text() for c in range(self.table.columnCount())] for r in range(self.table.rowCount())]


class FineTuneWidget(DockPanel):
    """One click: save the corrected labels, fine-tune the current model on them plus a folder's
    unlabeled scans (separate process), select the new model and re-predict the scan."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.process = None
        self.job: ThreadJob | None = None
        self.state: dict[str, Any] = {}
        self.correction_path: Path | None = None
        self.new_checkpoint: str | None = None
        self.image = LayerChoice(napari_viewer, Image, accept=is_scan)
        self.labels = LayerChoice(napari_viewer, Labels, accept=user_labels)
        self.model = CheckpointPicker(self.session)
        self.folder = FolderField("folder of unlabeled scans (or a dataset folder)", "Choose the folder of unlabeled scans")
        self.use_labels = QCheckBox("also train on the folder's labeled scans, if any")
        self.use_labels.setChecked(True)
        self.method = method_choice(("same as the model", None))
        self.iterations = QSpinBox()
        self.iterations.setRange(1, 100_000)
        self.iterations.setValue(RECIPE["iterations"])
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(4)
        self.lr.setRange(0.0001, 1.0)
        self.lr.setSingleStep(0.005)
        self.lr.setValue(RECIPE["lr"])
        self.device = DevicePicker()
        self.output = FolderField("where corrections and fine-tuned models go", "Choose the output folder",
                                  str(default_runs() / "fine-tuning"))
        box, rows = form()
        rows.addRow("Scan", self.image)
        rows.addRow("Corrected labels", self.labels)
        rows.addRow("Start from", self.model)
        rows.addRow("Unlabeled scans", self.folder)
        rows.addRow("", self.use_labels)
        rows.addRow("Method", self.method)
        rows.addRow("Iterations", self.iterations)
        rows.addRow("Learning rate", self.lr)
        rows.addRow("Device", self.device)
        rows.addRow("Output", self.output)
        self.channels = ChannelRows(napari_viewer, rows, self.image, self.model)  # a model of several channels
        self.volumes = VolumeTable()
        self.buttons = JobButtons("Fine-tune on this correction")
        self.view = TrainingView(self.buttons, "fine-tuning")
        self.view.sparkline.setVisible(False)
        self.view.on_event = self._event
        self.guard = GuardPanel()
        self.guard.use_anyway.clicked.connect(self._use_anyway)
        layout = QVBoxLayout(self.body)
        layout.addWidget(box)
        layout.addWidget(self.volumes)
        layout.addWidget(self.buttons)
        self.controls = self.buttons
        layout.addWidget(self.guard)
        layout.addWidget(self.view)
        layout.addStretch(1)
        self.buttons.start.clicked.connect(self.run)
        self.buttons.cancel.clicked.connect(self.cancel)
        self.volume_timer = later(self, self.show_volumes)
        self.labels.currentIndexChanged.connect(self._labels_chosen)
        self.image.currentIndexChanged.connect(lambda index: self.volume_timer.start())
        self.image.currentIndexChanged.connect(self.channels.preselect)
        self.session.checkpoint_changed.connect(self.channels.model_chosen)
        self.channels.model_chosen()
        self._preselect_correction()
        self._labels_chosen()
        self.session.labels_painted.connect(self._painted)
        self.show_volumes()

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
                self.volume_timer.start()
        except RuntimeError:  # this widget is closed; the session outlives it
            pass

    def _labels_chosen(self, *args) -> None:
        """The Scan box follows the scan of the chosen corrected labels."""
        labels = self.labels.layer()
        scan = scan_of(labels, self.image.layers()) if labels is not None else None
        if scan is not None:
            self.image.set_layer(scan)
        self.volume_timer.start()

    def show_volumes(self) -> None:
        """Per-class volumes of the scan's prediction (as the model made it) beside the correction's."""
        image, labels = self.image.layer(), self.labels.layer()
        prediction = prediction_of(self.viewer, image) if image is not None else None
        self.volumes.show_columns(*volume_columns(prediction, labels))

    def run(self) -> None:
        from semiseg.models import read_record
        from semiseg.finetuning import finetune_config, image_on_disk, save_correction
        from semiseg.napari.preflight import check_unlabeled_folder
        from semiseg.preprocessing import check_label_values

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
            volume = self.channels.volume(image)
            correction = volume_from_layer(labels, copy=True)
            if correction.shape != volume.shape:
                raise InputError(f"'{labels.name}' has shape {correction.shape}, the scan {volume.shape}; choose the scan's labels")
            plan = read_record(checkpoint).plan
            check_label_values(correction.array, plan.class_names, f"'{labels.name}'", plan.ignore_label)  # the ignore value marks "not annotated"
            if not correction.array.any():
                show_warning(f"semiseg: '{labels.name}' is empty: fine-tuning will learn that this scan holds no structure")
            output = Path(self.output.text()).expanduser()
            # The correction is saved before anything else runs: whatever happens next, it is on disk.
            correction_volume = Volume(labels_array(correction.array, labels.name), volume.geometry)
            self.correction_path = save_correction(correction_volume, output, image.name)
            labels.metadata = {**labels.metadata, "correction_file": str(self.correction_path)}
            image_path = image_on_disk(volume, self.channels.source_path(image), output, image.name)
            run_dir = output / f"{image.name}-{Path(checkpoint).name}-{stamp()}"
            config = finetune_config(FineTuneRequest(
                checkpoint=str(checkpoint), folder=str(Path(self.folder.text()).expanduser()), output=str(run_dir),
                image_path=str(image_path), label_path=str(self.correction_path), method=self.method.currentData(),
                iterations=self.iterations.value(), lr=self.lr.value(), device=self.device.name(),
                replay=self.use_labels.isChecked()))
        except SemisegError as error:
            show_error(f"semiseg: {one_line(error)}")
            return
        except OSError as error:
            show_error(f"semiseg: {error.filename or ''} {error.strerror or error}")
            return
        self.state = {"image": image, "volume": volume, "labels": labels, "checkpoint": checkpoint, "device": self.device.device(),
                      "device_name": self.device.name(), "folder": str(Path(self.folder.text()).expanduser())}
        self.new_checkpoint = None
        self.guard.setVisible(False)
        self.view.failure_note = f" (the correction stays saved: {self.correction_path})"
        self.process = self.view.start(config, f"correction saved: {self.correction_path}",
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
        elif kind == "exit":
            if self.new_checkpoint and checkpoints.is_checkpoint(self.new_checkpoint) and not self.state.get("cancelled"):
                self._accept_new_model(self.new_checkpoint)
                return
            self.buttons.busy(False)
            if self.state.get("cancelled"):
                self.buttons.status.setText(f"stopped; the correction stays saved: {self.correction_path}")

    def _accept_new_model(self, checkpoint: str) -> None:
        """The guard: score the old and the new model on held-out labeled cases neither trained on (the
        model's validation cases, else the folder's labeled scans); the new one replaces the old one
        everywhere and re-predicts the scan unless it got worse."""
        from semiseg.finetuning import compare_before_after, guard_cases
        from semiseg.training import Cancelled

        before, device = self.state["checkpoint"], self.state["device_name"]

        def check(progress, should_stop):
            cases = guard_cases(before, checkpoint, self.state["folder"])
            if not cases:
                return None
            done, total = [0], 2 * len(cases)

            def on_case() -> None:
                done[0] += 1
                progress({"fraction": done[0] / total, "text": f"checking the new model: {done[0]}/{total} predictions"})
                if should_stop():
                    raise Cancelled

            return compare_before_after(before, checkpoint, cases, device, on_case=on_case)

        self.buttons.status.setText("fine-tuned; checking the new model against the old one on held-out cases…")
        self.buttons.set_fraction(0.0)
        self.job = ThreadJob("semiseg: checking the fine-tuned model", check, self._checked, self._check_progress)
        self.job.start()

    def _check_progress(self, event: dict) -> None:
        self.buttons.set_fraction(event.get("fraction"))
        self.buttons.status.setText(event.get("text", ""))

    def _checked(self, status: str, value) -> None:
        if status == "ok" and value is None:
            self.guard.show_result(None, "Not checked: no held-out labeled case to compare on (the model's validation cases "
                                         "are not on disk and the folder has no labeled scan the models did not train on). "
                                         "The new model is selected unchecked.", rejected=False)
        elif status == "ok" and not value.worse:
            self.guard.show_result(value, value.verdict() + "; the new model is selected", rejected=False)
        else:
            self._keep_old_model(status, value)
            return
        self._use_new_model()

    def _keep_old_model(self, status: str, value) -> None:
        """The new model got worse, or could not be checked: it joins the model list, unselected."""
        if status == "ok":
            text = f"{value.verdict()}."
        elif status == "cancelled":
            text = "Check stopped."
        else:
            text = f"Check failed ({value})."
        text += f" The new model ({self.new_checkpoint}) is kept aside, not selected."
        self.guard.show_result(value if status == "ok" else None, text, rejected=True)
        self.session.add(self.new_checkpoint, select=False)
        self.buttons.busy(False)
        self.buttons.status.setText(f"fine-tuned, but {'it got worse' if status == 'ok' else 'not checked'}: "
                                    f"kept {self.state['checkpoint']}; the correction stays saved: {self.correction_path}")
        if status == "error":
            show_error(f"semiseg: {text}")
        else:
            show_warning(f"semiseg: {text}")

    def _use_anyway(self) -> None:
        self.guard.use_anyway.setVisible(False)
        self.guard.verdict.setText(self.guard.verdict.text() + " Then used anyway, at your request.")
        self.buttons.busy(True)
        self._use_new_model()

    def _use_new_model(self) -> None:
        self.session.finish_run(self.new_checkpoint)
        self._repredict()

    def _repredict(self) -> None:
        image = self.state["image"]
        if image not in self.viewer.layers:
            self.buttons.busy(False)
            self.buttons.status.setText(f"fine-tuned: {self.new_checkpoint} (the scan's layer was closed, so no new prediction)")
            return
        volume = self.state["volume"]  # the scan (all its channels) the correction was made on
        self.buttons.status.setText("fine-tuned; predicting the scan again…")
        self.buttons.set_fraction(0.0)
        self.job = ThreadJob(f"semiseg: re-predicting {image.name}",
                             jobs.segment_job(volume, self.new_checkpoint, self.state["device"], False),
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
        self.show_volumes()
        self.buttons.set_fraction(1.0)
        self.buttons.status.setText(f"done: correction saved as {self.correction_path.name}; new model {self.new_checkpoint} "
                                    "(selected); prediction updated")
        show_info(f"semiseg: fine-tuned model {self.new_checkpoint}; prediction updated")

    def closeEvent(self, event) -> None:  # noqa: N802
        if self.process is not None and self.process.running:
            self.process.stop()
        super().closeEvent(event)

