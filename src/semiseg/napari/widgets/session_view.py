"""The window's session as the widgets show it: the model picker every widget shares.

Each widget holds a `CheckpointPicker` over the one `Session` of its napari window, so a model
chosen, browsed to, trained or fine-tuned in one widget is the choice in all of them.
"""

from __future__ import annotations

from pathlib import Path

from napari.utils.notifications import show_error
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QFileDialog, QHBoxLayout, QPushButton, QSizePolicy, QVBoxLayout, QWidget

from semiseg.checkpoint import verify
from semiseg.errors import SemisegError
from semiseg.napari import checkpoints
from semiseg.napari.session import Session
from semiseg.napari.widgets.common import grey_label


class CheckpointPicker(QWidget):
    """Recent checkpoints (and the bundled default), a Browse button, and what the chosen one is."""

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.combo = QComboBox()
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.combo.setMinimumContentsLength(14)
        self.combo.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.browse = QPushButton("Browse…")
        self.browse.setToolTip("Choose a checkpoint folder (one holding model.json and model.safetensors)")
        self.info = grey_label()
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.combo, 1)
        row.addWidget(self.browse)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addLayout(row)
        layout.addWidget(self.info)
        self.combo.currentIndexChanged.connect(self._chosen)
        self.browse.clicked.connect(self._browse)
        session.checkpoints_changed.connect(self.refresh)
        session.checkpoint_changed.connect(self.refresh)
        self.refresh()

    def refresh(self, *args) -> None:
        try:
            self.combo.blockSignals(True)
            self.combo.clear()
            paths = self.session.checkpoints()
            for path in paths:
                self.combo.addItem(checkpoints.checkpoint_label(path), path)
                self.combo.setItemData(self.combo.count() - 1, path, Qt.ItemDataRole.ToolTipRole)
            if not paths:
                self.combo.addItem("no model yet: train one, or Browse…", None)
            elif self.session.checkpoint in paths:
                self.combo.setCurrentIndex(paths.index(self.session.checkpoint))
            self.combo.blockSignals(False)
            path = self.path()
            self.info.setText(checkpoints.describe_checkpoint(path) if path else "No bundled default model in this installation.")
        except RuntimeError:
            pass

    def path(self) -> str | None:
        return self.combo.currentData()

    def _chosen(self, index: int) -> None:
        self.session.select(self.combo.itemData(index))
        self.refresh()

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a checkpoint folder", self.path() or str(Path.home()))
        if folder:
            self.choose(folder)

    def choose(self, folder: str) -> bool:
        try:
            verify(folder)  # a corrupt checkpoint is refused here, not when a job loads it
            self.session.add(folder)
        except SemisegError as error:
            show_error(f"semiseg: {error}")
            return False
        return True
