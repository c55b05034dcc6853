"""One session per napari window, shared by all its dock widgets (no Qt here).

napari hands each dock widget its own proxy of the viewer (`PublicOnlyProxy`), so the session is
keyed on the viewer behind the proxy (`__wrapped__`). Widgets observe it through psygnal signals:
the chosen model, the list of models to choose from, the last training run, the review queue and
the label layer the user painted last. The reader makes sure the window has its session, which
brings every scan opened at another physical place into view.
"""

from __future__ import annotations

import weakref
from typing import Any

from psygnal import Signal

from semiseg.napari import checkpoints
from semiseg.napari.placement import bring_into_view


class Session:
    """What the widgets of one viewer window share."""

    checkpoint_changed = Signal(str)
    checkpoints_changed = Signal()
    run_finished = Signal(str)
    review_changed = Signal()
    labels_painted = Signal(object)

    def __init__(self, viewer: Any = None) -> None:
        self.checkpoint: str | None = None
        self.last_run: str | None = None
        self._review_queue = None
        self._painted: weakref.ref | None = None
        self._reference: weakref.ref | None = None
        self._viewer = weakref.ref(viewer) if viewer is not None else None
        options = self.checkpoints()
        if options:
            self.checkpoint = options[0]
        if viewer is not None:
            for layer in viewer.layers:
                self._watch(layer)
            viewer.layers.events.inserted.connect(lambda event: self._watch(event.value))
            # After napari's own handlers (they extend the dims' range to the new layer first).
            viewer.layers.events.inserted.connect(lambda event: self._show_new_scan(event.value), position="last")

    # Models ---------------------------------------------------------------------------------------
    def checkpoints(self) -> list[str]:
        """Recent intact checkpoints, then the bundled default; the chosen one first if neither lists it."""
        found = []
        default = checkpoints.default_model_path()
        for path in checkpoints.recent_checkpoints() + ([str(default)] if default and checkpoints.is_intact(default) else []):
            if path not in found:
                found.append(path)
        if self.checkpoint and self.checkpoint not in found and checkpoints.is_intact(self.checkpoint):
            found.insert(0, self.checkpoint)
        return found

    def add(self, path: str, select: bool = True) -> None:
        folder = str(checkpoints.remember_checkpoint(path)[0])
        self.checkpoints_changed.emit()
        if select:
            self.select(folder)

    def select(self, path: str | None) -> None:
        if path == self.checkpoint:
            return
        self.checkpoint = path
        self.checkpoint_changed.emit(path or "")

    def finish_run(self, checkpoint: str) -> None:
        """A training run ended with this model: remember it, select it everywhere."""
        self.last_run = checkpoint
        self.add(checkpoint)
        self.run_finished.emit(checkpoint)

    # Review queue ---------------------------------------------------------------------------------
    @property
    def review_queue(self):
        return self._review_queue

    @review_queue.setter
    def review_queue(self, queue) -> None:
        self._review_queue = queue
        self.review_changed.emit()

    # Label layers ---------------------------------------------------------------------------------
    def _watch(self, layer) -> None:
        paint = getattr(layer.events, "paint", None)  # Labels only: napari emits it for paint, fill and erase
        if paint is not None:
            reference = weakref.ref(layer)
            paint.connect(lambda event: self._painted_now(reference()))

    def _show_new_scan(self, layer) -> None:
        """A scan opened at another physical place than those before it is brought into view:
        napari keeps the slice and camera where they were, over empty space."""
        viewer = self._viewer() if self._viewer is not None else None
        if viewer is not None and layer.metadata.get("role") == "image" and "geometry" in layer.metadata and len(viewer.layers) > 1:
            bring_into_view(viewer, layer)

    def _painted_now(self, layer) -> None:
        if layer is not None:
            self._painted = weakref.ref(layer)
            self.labels_painted.emit(layer)

    def _alive(self, reference: weakref.ref | None):
        layer = reference() if reference is not None else None
        viewer = self._viewer() if self._viewer is not None else None
        return layer if layer is not None and (viewer is None or layer in viewer.layers) else None

    def last_painted(self):
        """The label layer the user painted last, while it is open."""
        return self._alive(self._painted)

    def set_reference(self, layer) -> None:
        """The reference (ground truth) chosen in Segment: never offered as a correction."""
        self._reference = weakref.ref(layer) if layer is not None else None

    def reference(self):
        return self._alive(self._reference)


_SESSIONS: dict[int, Session] = {}


def viewer_behind(viewer: Any) -> Any:
    """The viewer itself for napari's per-widget proxy of it."""
    return getattr(viewer, "__wrapped__", viewer)


def session_for(viewer: Any) -> Session:
    viewer = viewer_behind(viewer)
    key = id(viewer)
    if key not in _SESSIONS:
        _SESSIONS[key] = Session(viewer)
        try:
            weakref.finalize(viewer, _SESSIONS.pop, key, None)
        except TypeError:
            pass
    return _SESSIONS[key]
