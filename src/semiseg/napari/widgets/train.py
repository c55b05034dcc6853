"""The Train widget: train a method on a dataset folder in a separate process, with live progress
and a clean Cancel (a second press, after a while, forces the stop)."""

from __future__ import annotations

from pathlib import Path

from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QCheckBox, QComboBox, QHBoxLayout, QLineEdit, QSpinBox, QVBoxLayout, QWidget

from semiseg.config import default_of, parse_options
from semiseg.errors import InputError, SemisegError
from semiseg.napari import checkpoints
from semiseg.napari.session import session_for
from semiseg.napari.widgets.common import DevicePicker, DockPanel, FolderField, JobButtons, ThreadJob, form, grey_label, method_choice
from semiseg.napari.widgets.formatting import default_runs, one_line, stamp
from semiseg.napari.widgets.training_view import TrainingView

def evidence_table(method: str) -> str:
    """Rich text for what the benchmark measured for one method: a row per labeled count and budget, each
    against supervised-only at the same budget and given the method's training time."""
    from semiseg.methods import evidence

    def against(delta: float | None, p_value: float | None, budget: str = "") -> str:
        return "" if delta is None or p_value is None else f"{delta:+.3f}{budget}<br>p {p_value:.2g}"

    body = ""
    for row in evidence.measured(method):
        same_time = row.equal_time or {}
        longer = against(same_time.get("delta"), same_time.get("p_value"), f"&nbsp;at&nbsp;{same_time.get('supervised_iterations')}")
        setting = evidence.setting(row, budget=False).strip()
        body += (f"<tr><td>{row.labeled}&nbsp;·&nbsp;{row.iterations}{'<br>' + setting if setting else ''}</td>"
                 f"<td>{row.dice:.3f}<br>{evidence.spread(row, '&nbsp;')}({row.seeds})</td>"
                 f"<td>{against(row.delta, row.p_value)}</td><td>{longer}</td></tr>")
    if not body:
        return "not benchmarked yet"
    time = evidence.relative_time(method)
    return ("<table cellspacing=3><tr><th align=left>labeled · iterations</th><th align=left>Dice ± sd (seeds)</th>"
            f"<th align=left>vs supervised</th><th align=left>vs supervised given its time</th></tr>{body}</table>"
            + (f"{time:.1f}x supervised's time per iteration" if time is not None else ""))


def measured_table(rows: list[tuple[str, str, str]]) -> str:
    """Rich text for the benchmark overview: one row per method."""
    if not rows:
        return "no benchmark results shipped"
    body = "".join(f"<tr><td>{method}</td><td>{dice}</td><td>{time}</td></tr>" for method, dice, time in rows)
    return f"<table><tr><th align=left>method</th><th align=left>Dice (vs supervised) @labeled</th><th>time</th></tr>{body}</table>"


# Patch (z, y, x) offered when the user turns the automatic choice off before a run has made one.
MANUAL_PATCH = (64, 96, 96)


class TrainWidget(DockPanel):
    """Train a method on a dataset folder, in a separate process, with live progress and clean Cancel."""

    FORCE_AFTER_S = 60.0

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        from semiseg.methods import evidence, method_class
        from semiseg.networks import NETWORKS

        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.process = None
        self.describe_job: ThreadJob | None = None
        self.data = FolderField("dataset folder (imagesTr/labelsTr, images/labels, LA h5, or scans)", "Choose a dataset folder")
        self.found = grey_label("Choose a dataset folder to see what it holds.")
        self.found.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        self.method = method_choice()
        # What the benchmark measured for the chosen method, so the trade-off is seen before starting.
        self.method_evidence = grey_label()
        self.method_evidence.setToolTip(evidence.benchmark_note())
        self.method_evidence.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        self.method.currentTextChanged.connect(lambda name: self.method_evidence.setText(evidence_table(name)))
        # Every measured method at once: Dice (difference to supervised-only) per labeled count, relative time.
        self.methods_measured = grey_label(measured_table(evidence.overview()))
        self.methods_measured.setToolTip(evidence.benchmark_note())
        self.network = QComboBox()
        self.network.addItems(sorted(NETWORKS))
        self.network.setToolTip("set to the chosen method's own network (as `semiseg train` without --network); choose another to override")
        # As on the command line: a method trains on its paper's network unless another is chosen after it.
        self.method.currentTextChanged.connect(lambda name: self.network.setCurrentText(method_class(name).paper_network))
        self.method.setCurrentText(default_of("method"))
        self.method_evidence.setText(evidence_table(self.method.currentText()))
        self.network.setCurrentText(method_class(self.method.currentText()).paper_network)
        self.network_options = QLineEdit()
        self.network_options.setPlaceholderText("e.g. base_filters=8 (default: the network's own)")
        self.labeled = QLineEdit(default_of("labeled"))
        self.labeled.setToolTip("labeled cases used with their labels: a count (8), a percentage (10%), or a list file of case ids; all other scans train unlabeled")
        self.validation = QSpinBox()
        self.validation.setRange(0, 10_000)
        self.validation.setValue(2)
        self.ignore_label = QSpinBox()
        self.ignore_label.setRange(0, 2**31 - 1)
        self.ignore_label.setSpecialValueText("none")  # 0 is background, never the ignore value
        self.ignore_label.setToolTip("the label value of voxels nobody annotated (e.g. 255 in partially annotated scans): "
                                     "left out of the losses and the metrics")
        self.iterations = QSpinBox()
        self.iterations.setRange(1, 1_000_000)
        self.iterations.setValue(default_of("iterations"))  # semiseg train's default, set by the budget study
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
                                  str(default_runs() / f"run-{stamp()}"))
        self.resume = QCheckBox("continue the run already in the output folder")
        box, rows = form()
        rows.addRow("Dataset", self.data)
        rows.addRow("", self.found)
        rows.addRow("Method", self.method)
        rows.addRow("", self.method_evidence)
        rows.addRow("Measured", self.methods_measured)
        rows.addRow("Network", self.network)
        rows.addRow("Network options", self.network_options)
        rows.addRow("Labeled", self.labeled)
        rows.addRow("Validation cases", self.validation)
        rows.addRow("Not annotated", self.ignore_label)
        rows.addRow("Iterations", self.iterations)
        rows.addRow("Validate every", self.validate_every)
        rows.addRow("Patch (z y x)", patch_box)
        rows.addRow("Batch size", self.batch)
        rows.addRow("Loader workers", self.workers)
        rows.addRow("Device", self.device)
        rows.addRow("Output", self.output)
        rows.addRow("", self.resume)
        self.buttons = JobButtons("Start training")
        self.view = TrainingView(self.buttons, "training")
        self.view.on_event = self._event
        layout = QVBoxLayout(self.body)
        layout.addWidget(box)
        layout.addWidget(self.buttons)
        self.controls = self.buttons
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
            ignore_label=self.ignore_label.value() or None,
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
            show_error(f"semiseg: {one_line(error)}")
            return
        self.process = self.view.start(config, f"same as: {cli_command(config)}", "starting the training process…")

    def cancel(self) -> None:
        if self.process is None:
            return
        if self.process.stop_requested_at is not None and self.buttons.cancel.text().startswith("Force"):
            self.view.kill()
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
        elif kind == "exit":
            self.force_timer.stop()
            self.buttons.busy(False)
            out = Path(self.output.text()).expanduser()
            if out.parent == default_runs() and out.name.startswith("run-") and (out / "last").exists():
                self.output.set_text(str(default_runs() / f"run-{stamp()}"))  # ready for the next run
            if self.view.result is not None:
                self.buttons.set_fraction(1.0 if self.view.result.get("type") == "end" else self.buttons.progress.value() / 1000)

    def closeEvent(self, event) -> None:  # noqa: N802
        if self.process is not None and self.process.running:
            self.process.stop()  # clean stop: the child saves its last checkpoint
        super().closeEvent(event)

