"""Small Qt pieces the widgets share: a scrolling dock panel, a layer picker, a device picker, a folder field, a form, the
start/cancel/progress row of a job, a background-job runner and a Dice sparkline."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qtpy.QtCore import QEvent, QObject, QPointF, QSize, Qt, QTimer, Signal
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF, QResizeEvent
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from semiseg.errors import SemisegError
from semiseg.napari.jobs import Cancelled
from semiseg.napari.layers import class_colors
from semiseg.napari.widgets.formatting import volume_rows

MINIMUM_DOCK_HEIGHT = 160  # pixels: a few rows of a form stay in view however the dock column is shared
SCREEN_SHARE = 0.35  # of the screen's height: the most a dock's controls ask for; taller ones scroll

# Pickers ------------------------------------------------------------------------------------------


class LayerChoice(QComboBox):
    """The viewer's layers of one kind, kept current as layers come, go and get renamed."""

    def __init__(self, viewer, kind: type, none_text: str | None = None, accept: Callable[[Any], bool] | None = None,
                 follow_active: bool = False, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.kind = kind
        self.none_text = none_text
        self.accept = accept or (lambda layer: True)
        self._layers: list[Any] = []
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(14)
        events = viewer.layers.events
        for event in (events.inserted, events.removed, events.moved, events.reordered):
            event.connect(self._on_layers)
        if follow_active:
            viewer.layers.selection.events.active.connect(self._on_active)
        for layer in viewer.layers:
            layer.events.name.connect(self.refresh)
        self.refresh()

    def _on_layers(self, event=None) -> None:
        value = getattr(event, "value", None)
        if value is not None and hasattr(value, "events"):
            value.events.name.connect(self.refresh)
        self.refresh()

    def _on_active(self, event=None) -> None:
        layer = getattr(event, "value", None)
        if layer is not None and isinstance(layer, self.kind) and self.accept(layer):
            self.set_layer(layer)

    def refresh(self, event=None) -> None:
        try:
            current = self.layer()
            layers = [layer for layer in self.viewer.layers if isinstance(layer, self.kind) and self.accept(layer)]
            self.blockSignals(True)
            self.clear()
            self._layers = ([None] if self.none_text is not None else []) + layers
            for layer in self._layers:
                self.addItem(self.none_text if layer is None else layer.name)
            if current is not None and current in layers:
                self.setCurrentIndex(self._layers.index(current))
            self.blockSignals(False)
            if current is not self.layer():
                self.currentIndexChanged.emit(self.currentIndex())
        except RuntimeError:  # the Qt widget is gone; the viewer outlived it
            pass

    def layer(self):
        index = self.currentIndex()
        return self._layers[index] if 0 <= index < len(self._layers) else None

    def layers(self) -> list:
        return [layer for layer in self._layers if layer is not None]

    def set_layer(self, layer) -> None:
        if layer in self._layers:
            self.setCurrentIndex(self._layers.index(layer))


class DevicePicker(QWidget):
    """auto / cpu / cuda / mps, and the device that choice resolves to here."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.combo = QComboBox()
        self.combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.resolved = QLabel()
        self.resolved.setStyleSheet("color: gray;")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.combo)
        layout.addWidget(self.resolved, 1)
        self.combo.currentTextChanged.connect(self._update)
        self._update()

    def name(self) -> str:
        return self.combo.currentText()

    def device(self):
        from semiseg.devices import resolve_device

        return resolve_device(self.name())

    def _update(self, *args) -> None:
        from semiseg.devices import describe

        try:
            self.resolved.setText(f"→ {describe(self.device())}")
            self.resolved.setToolTip("")
        except SemisegError as error:
            self.resolved.setText("→ not available")
            self.resolved.setToolTip(str(error))


class FolderField(QWidget):
    changed = Signal(str)

    def __init__(self, placeholder: str = "", caption: str = "Choose a folder", text: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.caption = caption
        self.edit = QLineEdit(text)
        self.edit.setPlaceholderText(placeholder)
        self.button = QPushButton("Browse…")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.edit, 1)
        layout.addWidget(self.button)
        self.button.clicked.connect(self._browse)
        self.edit.editingFinished.connect(lambda: self.changed.emit(self.text()))

    def text(self) -> str:
        return self.edit.text().strip()

    def set_text(self, text: str) -> None:
        self.edit.setText(text)
        self.changed.emit(self.text())

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, self.caption, self.text() or str(Path.home()))
        if folder:
            self.set_text(folder)


# Forms and job controls ---------------------------------------------------------------------------


class DockPanel(QScrollArea):
    """A dock widget whose rows go in `self.body` and scroll, except that the rows through `self.controls`
    (a widget's form and its start button) keep their whole height, up to a share of the screen.

    Qt's own minimum height counts one line per word-wrapped label, so with two widgets docked in one
    column napari squeezed a form to it and drew rows over one another; and a Segment widget showing
    metrics, volumes and regions made the window taller than a laptop screen."""

    def __init__(self, takes_spare_height: bool = False, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.body = QWidget()
        self.controls: QWidget | None = None  # the last row that must stay in view; None: all of them
        self.setWidgetResizable(True)
        self.setFrameShape(QScrollArea.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setWidget(self.body)
        # A scroll area is Expanding; only a widget with a list to fill (review queue, export) should take
        # a shared dock column's spare height, the others their rows' height.
        vertical = QSizePolicy.Policy.Expanding if takes_spare_height else QSizePolicy.Policy.Preferred
        self.setSizePolicy(QSizePolicy.Policy.Preferred, vertical)
        self.body.installEventFilter(self)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if watched is self.body and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()  # rows added, shown or rewrapped: the dock rereads the size hints below
        return super().eventFilter(watched, event)

    def rows_height(self, width: int, through: QWidget | None = None) -> int:
        """The height the body's rows take at a width, wrapped labels counted, down to `through`."""
        layout = self.body.layout()
        if layout is None:
            return self.body.sizeHint().height()
        margins = layout.contentsMargins()
        inner = width - margins.left() - margins.right()
        heights = []
        for index in range(layout.count()):
            item = layout.itemAt(index)
            if item.isEmpty():
                continue
            heights.append(item.heightForWidth(inner) if item.hasHeightForWidth() else item.sizeHint().height())
            if through is not None and item.widget() is through:
                break
        return margins.top() + margins.bottom() + sum(heights) + max(layout.spacing(), 0) * max(len(heights) - 1, 0)

    def sizeHint(self) -> QSize:
        width = self.minimumSizeHint().width()
        return QSize(width, self.rows_height(max(self.body.width(), width)))

    def minimumSizeHint(self) -> QSize:
        """As wide as the rows need (they never scroll sideways); as tall as the controls."""
        width = self.body.minimumSizeHint().width() + self.verticalScrollBar().sizeHint().width()
        screen = self.screen()
        cap = int(screen.availableGeometry().height() * SCREEN_SHARE) if screen is not None else MINIMUM_DOCK_HEIGHT
        controls = self.rows_height(max(self.body.width(), width), through=self.controls)
        return QSize(width, max(MINIMUM_DOCK_HEIGHT, min(controls, cap)))

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        if event.size().width() != event.oldSize().width():
            self.updateGeometry()  # labels rewrap at a new width, and the rows' height with them


def form() -> tuple[QWidget, QFormLayout]:
    """A form whose fields take the dock's width."""
    box = QWidget()
    layout = QFormLayout(box)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    return box, layout


def status_label() -> QLabel:
    label = QLabel()
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label


def grey_label(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    label.setStyleSheet("color: gray;")
    return label


class JobButtons(QWidget):
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
        self.status = status_label()
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


def method_choice(first: tuple[str, Any] | None = None) -> QComboBox:
    """The training methods by name (each one's summary as its tooltip), after an optional first
    (text, data) entry; each method's data is its name."""
    from semiseg.methods import METHODS

    combo = QComboBox()
    if first is not None:
        combo.addItem(*first)
    for name, method in sorted(METHODS.items()):
        combo.addItem(name, name)
        combo.setItemData(combo.count() - 1, method.summary, Qt.ItemDataRole.ToolTipRole)
    return combo


def later(parent: QWidget, function: Callable[[], None], milliseconds: int = 250) -> QTimer:
    """A single-shot timer calling function once after the last start() of a burst (e.g. paint strokes)."""
    timer = QTimer(parent)
    timer.setSingleShot(True)
    timer.setInterval(milliseconds)
    timer.timeout.connect(function)
    return timer


def fit_height(table: QTableWidget) -> None:
    """A table exactly as tall as its rows (the dock scrolls, not the table)."""
    table.setFixedHeight(table.horizontalHeader().height() + sum(table.rowHeight(i) for i in range(table.rowCount())) + 4)


class VolumeTable(QTableWidget):
    """Per-class volumes in mL, one column per label map compared (prediction, correction, reference);
    each class name with a swatch of its colour."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(0, 1, parent)
        self.verticalHeader().setVisible(False)
        self.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setVisible(False)

    def show_columns(self, columns: dict[str, dict[int, float]], class_names: dict[int, str]) -> None:
        rows = volume_rows(columns, class_names)
        colors = class_colors(class_names)
        self.setColumnCount(1 + len(columns))
        self.setHorizontalHeaderLabels(["class"] + [f"{name} mL" for name in columns])
        self.setRowCount(len(rows))
        for r, (class_id, cells) in enumerate(rows):
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if c == 0:
                    item.setData(Qt.ItemDataRole.DecorationRole, QColor.fromRgbF(*colors.get(class_id, colors[None])[:3]))
                else:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.setItem(r, c, item)
        self.setVisible(bool(rows))
        fit_height(self)

    def column(self, name: str) -> list[str]:
        """The texts of one column, top to bottom (for tests and screenshots)."""
        index = next(i for i in range(self.columnCount()) if self.horizontalHeaderItem(i).text() == f"{name} mL")
        return [self.item(r, index).text() for r in range(self.rowCount())]


# Background jobs ----------------------------------------------------------------------------------


class _Relay(QObject):
    progress = Signal(object)


class _NamedCall:
    """A callable that napari's task list shows by its description."""

    def __init__(self, description: str, function: Callable[[], Any]) -> None:
        self.description = description
        self.function = function

    def __call__(self):
        return self.function()

    def __str__(self) -> str:
        return self.description


class ThreadJob:
    """Run `function(progress=..., should_stop=...)` in a napari worker thread (it shows in napari's
    activity list, with napari's cancel). Outcomes arrive in the GUI thread: on_done("ok", value),
    on_done("error", one-line message) for semiseg's user errors, on_done("cancelled", None).
    Unexpected exceptions are left to napari, which reports them as bugs. A job whose widget is
    closed (on_done bound to a deleted QObject) is asked to stop and reports to no one."""

    def __init__(self, description: str, function: Callable[..., Any], on_done: Callable[[str, Any], None],
                 on_progress: Callable[[dict], None] | None = None) -> None:
        from napari.qt.threading import create_worker

        self.cancel_event = threading.Event()
        self.relay = _Relay()
        if on_progress is not None:
            self.relay.progress.connect(on_progress)
        self.on_done = on_done
        self.function = function
        self.outcome: tuple[str, Any] | None = None
        self.done = False
        self.worker = create_worker(_NamedCall(description, self._call), _progress={"desc": description}, _start_thread=False)
        self.worker.returned.connect(self._returned)
        self.worker.finished.connect(self._finished)
        self.owner_closed = False
        owner = getattr(on_done, "__self__", None)
        if isinstance(owner, QObject):
            owner.destroyed.connect(self._owner_closed)

    def _owner_closed(self, *_) -> None:
        self.owner_closed = True
        self.cancel_event.set()

    def should_stop(self) -> bool:
        return self.cancel_event.is_set() or self.worker.abort_requested

    def _call(self):
        try:
            return ("ok", self.function(progress=self.relay.progress.emit, should_stop=self.should_stop))
        except Cancelled:
            return ("cancelled", None)
        except SemisegError as error:
            return ("error", " ".join(str(error).split()))
        except MemoryError:
            return ("error", "out of memory (try the CPU, or a smaller scan)")
        except RuntimeError as error:
            if "out of memory" in str(error).lower():
                return ("error", "out of GPU memory; choose the CPU device")
            raise

    def _returned(self, outcome) -> None:
        self.outcome = outcome

    def _finished(self) -> None:
        self.done = True
        if self.owner_closed:
            return
        status, value = self.outcome or ("cancelled", None)  # napari's own cancel suppresses the result
        self.on_done(status, value)

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.cancel_event.set()

    @property
    def running(self) -> bool:
        return not self.done


# Validation-Dice sparkline ------------------------------------------------------------------------


class Sparkline(QWidget):
    """Validation Dice against iteration, 0..1, with the latest and best values written in."""

    def __init__(self, title: str = "validation Dice", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.title = title
        self.points: list[tuple[float, float]] = []
        self.iterations = 1
        self.setMinimumHeight(70)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def set_points(self, points: list[tuple[float, float]], iterations: int) -> None:
        self.points = list(points)
        self.iterations = max(iterations, 1)
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        rect = self.rect().adjusted(4, 16, -4, -4)
        text_color = self.palette().color(self.foregroundRole())
        painter.setPen(QPen(QColor(128, 128, 128), 1))
        painter.drawRect(rect)
        painter.setPen(text_color)
        if self.points:
            latest = self.points[-1][1]
            best = max(p[1] for p in self.points)
            caption = f"{self.title}: {latest:.3f} (best {best:.3f})"
        else:
            caption = f"{self.title}: none yet"
        painter.drawText(4, 12, caption)
        if not self.points:
            painter.end()
            return
        polygon = QPolygonF()
        for iteration, value in self.points:
            x = rect.left() + rect.width() * min(iteration / self.iterations, 1.0)
            y = rect.bottom() - rect.height() * min(max(value, 0.0), 1.0)
            polygon.append(QPointF(x, y))
        painter.setPen(QPen(QColor(230, 159, 0), 2))
        painter.drawPolyline(polygon)
        for point in polygon:
            painter.drawEllipse(point, 2.5, 2.5)
        painter.end()
