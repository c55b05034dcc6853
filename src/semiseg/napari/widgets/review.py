"""The Review queue widget: predict a folder of scans, rank them most uncertain first, open the next."""

from __future__ import annotations

from pathlib import Path

from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QPushButton, QTableWidget, QTableWidgetItem, QVBoxLayout

from semiseg.errors import InputError, SemisegError
from semiseg.napari import checkpoints, jobs
from semiseg.napari.checkpoints import read_record_or_none
from semiseg.napari.session import session_for
from semiseg.napari.widgets.common import DevicePicker, DockPanel, FolderField, JobButtons, ThreadJob, form
from semiseg.napari.widgets.display import show_prediction
from semiseg.napari.widgets.formatting import one_line
from semiseg.napari.widgets.session_view import CheckpointPicker


class ReviewWidget(DockPanel):
    """Predict a folder of scans, rank them most uncertain first, open the next one to review."""

    def __init__(self, napari_viewer) -> None:
        super().__init__(takes_spare_height=True)
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.job: ThreadJob | None = None
        self.folder = FolderField("folder of unlabeled scans", "Choose a folder of scans to review")
        self.model = CheckpointPicker(self.session)
        self.device = DevicePicker()
        box, rows = form()
        rows.addRow("Scans", self.folder)
        rows.addRow("Model", self.model)
        rows.addRow("Device", self.device)
        self.buttons = JobButtons("Rank by uncertainty")
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
        layout = QVBoxLayout(self.body)
        layout.addWidget(box)
        layout.addWidget(self.buttons)
        self.controls = self.buttons
        layout.addWidget(self.table, 1)
        layout.addWidget(self.open_next)
        self.buttons.start.clicked.connect(self.rank)
        self.buttons.cancel.clicked.connect(lambda: self.job.stop() if self.job else None)
        self.open_next.clicked.connect(self.next)
        self.table.cellDoubleClicked.connect(lambda row, column: self.open_entry(self.queue.entries[row]) if self.queue else None)
        self.session.review_changed.connect(self.refresh)
        self.session.run_finished.connect(self._model_changed)
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
            record = read_record(checkpoint)
            list_scans(folder, record.plan.in_channels)
            queue = ReviewQueue(Path(folder).expanduser(), checkpoint, record.weights_sha256)
        except SemisegError as error:
            show_error(f"semiseg: {one_line(error)}")
            return
        self._start_ranking(queue, "predicting the scans…")

    def _model_changed(self, checkpoint: str) -> None:
        """A run (fine-tuning, training) produced the window's new model: the ranking of the queue was the
        old model's, so rank again with the new one, keeping what was reviewed."""
        from semiseg.models import read_record

        queue = self.queue
        try:
            if queue is None or queue.checkpoint == checkpoint or (self.job is not None and self.job.running):
                return
            self._start_ranking(queue.for_model(checkpoint, read_record(checkpoint).weights_sha256),
                                "the model changed: ranking the scans again with it…")
        except SemisegError as error:
            show_error(f"semiseg: {one_line(error)}")
        except RuntimeError:  # this widget is closed; the session outlives it
            pass

    def _start_ranking(self, queue, status: str) -> None:
        try:
            device = self.device.device()
        except SemisegError as error:
            show_error(f"semiseg: {one_line(error)}")
            return

        def run(progress, should_stop):
            model = checkpoints.MODELS.get(queue.checkpoint, device)
            return queue.rank(model, device, jobs.segment, progress, should_stop)

        self.session.review_queue = queue
        self.buttons.busy(True)
        self.buttons.set_fraction(0.0)
        self.buttons.status.setText(status)
        self.job = ThreadJob(f"semiseg: ranking {queue.folder.name}", run, self._ranked, self._progress)
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
        from semiseg.napari.review import entry_files

        if entry.labels is None:
            show_error(f"semiseg: {entry.name} has no prediction ({entry.error or 'not ranked yet'})")
            return None
        try:
            record = read_record_or_none(self.queue.checkpoint)
            files = entry_files(entry.scan, record.plan.in_channels if record is not None else 1)
            channels = [layer for path in files for layer in read_layers(path)]  # a 4D NIfTI gives a layer per channel
            labels = read_volume(entry.labels)
            entropy = read_volume(entry.entropy) if entry.entropy else None
        except SemisegError as error:
            show_error(f"semiseg: {one_line(error)}")
            return None
        added = [self.viewer.add_image(data, **attributes) for data, attributes, _ in channels]
        image = added[0]
        model = {"checkpoint": self.queue.checkpoint, "checkpoint_sha256": record and record.weights_sha256, "method": record and record.method}
        layers = show_prediction(self.viewer, image, labels, record.class_names if record is not None else {}, entry.score, model,
                                 [("entropy", entropy)] if entropy is not None else [])
        self.viewer.layers.selection.active = layers["prediction"]
        self.queue.mark_reviewed(entry)
        self.session.review_changed.emit()
        self.table.selectRow(self.queue.entries.index(entry))
        self.buttons.status.setText(f"opened {entry.name} (uncertainty {entry.score:.4f})")
        return image

