"""The uncertain regions of the Segment widget's last prediction, as a list to review one by one."""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QDoubleSpinBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from semiseg.napari.jobs import SegmentResult
from semiseg.regions import DEFAULT_THRESHOLD, Region, uncertain_regions


class RegionList(QWidget):
    """The uncertain regions of a prediction (semiseg.regions), most summed uncertainty first.

    Clicking a row moves the view to the region's centre; Accept marks it reviewed, Correct selects
    the prediction layer in paint mode with the region's class as the brush. The uncertainty
    threshold is the user's: changing it recomputes the regions.
    """

    REVIEWED = "✓"

    def __init__(self, viewer) -> None:
        super().__init__()
        self.viewer = viewer
        self.regions: list[Region] = []
        self.scan = self.prediction = None
        self.result: SegmentResult | None = None
        self.title = QLabel()
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.05, 0.95)
        self.threshold.setSingleStep(0.05)
        self.threshold.setDecimals(2)
        self.threshold.setValue(DEFAULT_THRESHOLD)
        self.threshold.setToolTip("Voxels above this uncertainty (0..1) form the regions")
        header = QHBoxLayout()
        header.addWidget(self.title, 1)
        header.addWidget(QLabel("threshold"))
        header.addWidget(self.threshold)
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
        layout.addLayout(header)
        layout.addWidget(self.table)
        layout.addLayout(buttons)
        self.table.itemSelectionChanged.connect(self.go_to_selected)
        self.accept.clicked.connect(self.accept_selected)
        self.correct.clicked.connect(self.correct_selected)
        self.threshold.valueChanged.connect(self.recompute)
        self.setVisible(False)

    def show_regions(self, scan, prediction, result: SegmentResult) -> None:
        """The regions of a segmentation (computed with it, at the default threshold, or again at the user's)."""
        self.scan, self.prediction, self.result = scan, prediction, result
        if self.threshold.value() == DEFAULT_THRESHOLD:
            self._fill(result.regions)
        else:
            self.recompute()

    def recompute(self, *args) -> None:
        if self.result is None:
            return
        prediction = self.result.prediction
        uncertainty = prediction.disagreement if self.result.regions_map == "disagreement" else prediction.entropy
        self._fill(uncertain_regions(uncertainty, prediction.labels, self.result.class_names, threshold=self.threshold.value()))

    def _fill(self, regions: list[Region]) -> None:
        self.regions = regions
        self.title.setText(f"{len(regions)} uncertain region{'s' * (len(regions) != 1)} ({self.result.regions_map} > {self.threshold.value():g})")
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

