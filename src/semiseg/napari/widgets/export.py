"""The Export widget: save label maps on their scans' grids, each with a JSON sidecar naming the model."""

from __future__ import annotations

from pathlib import Path

from napari.layers import Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QGroupBox, QHBoxLayout, QListWidget, QListWidgetItem, QMessageBox, QPushButton, QVBoxLayout

from semiseg.errors import InputError, SemisegError
from semiseg.napari.widgets.common import DockPanel, FolderField, form, status_label
from semiseg.napari.widgets.formatting import one_line


class ExportWidget(DockPanel):
    """Save label maps on their scans' grids, each with a sidecar JSON naming the model and its hash."""

    def __init__(self, napari_viewer) -> None:
        super().__init__(takes_spare_height=True)
        from semiseg.napari.export import EXPORT_SUFFIXES

        self.viewer = napari_viewer
        self.list = QListWidget()
        self.list.setMinimumHeight(120)
        self.folder = FolderField("folder to export into", "Choose the export folder")
        self.format = QComboBox()
        self.format.addItems(list(EXPORT_SUFFIXES))
        box, rows = form()
        rows.addRow("Folder", self.folder)
        rows.addRow("Format", self.format)
        self.export_checked = QPushButton("Export checked")
        self.export_all = QPushButton("Export all")
        row = QHBoxLayout()
        row.addWidget(self.export_checked)
        row.addWidget(self.export_all)
        self.status = status_label()
        group = QGroupBox("Label layers")
        group_layout = QVBoxLayout(group)
        group_layout.addWidget(self.list)
        layout = QVBoxLayout(self.body)
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
            show_error(f"semiseg: {one_line(error)}")
            return []
        except OSError as error:
            show_error(f"semiseg: cannot export: {error.strerror or error} {error.filename or ''}")
            return []
        models = {item.metadata.get("checkpoint_sha256") for item in items if item.metadata.get("checkpoint_sha256")}
        self.status.setText(f"exported {len(written)} label map(s) to {folder_path}: " + ", ".join(p.name for p in written)
                            + ", each with a .json sidecar" + (f" naming the model (weights SHA-256 {', '.join(m[:12] + '…' for m in models)})" if models else ""))
        show_info(f"semiseg: exported {len(written)} label map(s) to {folder_path}")
        return written
