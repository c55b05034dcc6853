"""The live view of a training process, shared by Train and Fine-tune.

Both widgets start `semiseg train` in its own process (`TrainingProcess`) and read the same events
from it; this one class turns them into the progress bar, status line, losses, validation-Dice
sparkline and log, and reports a failed run once. Each widget adds only what is its own through
`on_event` (Train: the chosen patch, the finished model; Fine-tune: re-predicting the scan).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from napari.utils.notifications import show_error
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QPlainTextEdit, QVBoxLayout, QWidget

from semiseg.napari.checkpoints import read_record_or_none
from semiseg.napari.widgets.common import JobButtons, Sparkline, grey_label
from semiseg.napari.widgets.formatting import duration


class TrainingView(QWidget):
    """Iteration, losses, ETA, validation-Dice sparkline and log of one training process at a time."""

    def __init__(self, buttons: JobButtons, what: str = "training", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.buttons = buttons
        self.what = what  # "training" or "fine-tuning", in failure messages
        self.process = None
        self.iterations = 1
        self.dice: list[tuple[float, float]] = []
        self.result: dict[str, Any] | None = None
        self.failed = False
        self.killed = False
        self.failure_note = ""  # appended to the status line of a failed run
        self.on_event: Callable[[dict[str, Any]], None] | None = None
        self.losses = grey_label()
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

    def start(self, config, first_line: str, status: str):
        """Start `semiseg train` for config in its own process and follow it; None if it cannot start."""
        from semiseg.napari.training_process import TrainingProcess

        process = TrainingProcess(config)
        try:
            process.start()
        except OSError as error:
            show_error(f"semiseg: cannot start the {self.what} process ({error})")
            return None
        self.log.clear()
        self.add_log(first_line)
        self.buttons.busy(True)
        self.buttons.set_fraction(None)
        self.buttons.status.setText(status)
        self.process = process
        self.iterations = config.iterations
        self.dice = []
        self.result = None
        self.failed = self.killed = False
        self.sparkline.set_points([], self.iterations)
        self.losses.setText("")
        self.timer.start()
        return process

    def add_log(self, text: str) -> None:
        self.log.appendPlainText(text)

    def poll(self) -> None:
        if self.process is None:
            return
        for event in self.process.poll():
            self.handle(event)

    def kill(self) -> None:
        """End the process at once (the user asked for it: not reported as a failure)."""
        if self.process is not None:
            self.killed = True
            self.process.kill()

    def fail(self, message: str) -> None:
        """Say once, in a notification and the status line, that the run failed."""
        if self.failed:
            return
        self.failed = True
        show_error(f"semiseg: {self.what} failed: {message}")
        self.buttons.status.setText(f"failed: {message}{self.failure_note}")

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
                                   f"{event.get('sec_per_iter', 0):.2f} s/it · ETA {duration(event.get('eta_s'))}")
            losses = event.get("losses") or {}
            self.losses.setText("losses: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        elif kind == "validation":
            self.dice.append((event["iteration"], event["dice_mean"]))
            self.sparkline.set_points(self.dice, self.iterations)
            self.add_log(f"iteration {event['iteration']}: validation Dice {event['dice_mean']:.4f}" + (" (best)" if event.get("best") else ""))
        elif kind == "checkpoint":
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
            self.fail(str(event.get("message")))
        elif kind == "exit":
            self.timer.stop()
            process, self.process = self.process, None
            if process is not None:
                process.close()
            returncode = event.get("returncode")
            if returncode not in (0, None) and self.result is None and not self.killed:
                self.fail(str(event.get("error") or f"the process ended with code {returncode}"))
        if self.on_event is not None:
            self.on_event(event)

    def _earlier_validations(self) -> list[tuple[float, float]]:
        """A resumed run's validation history so far, from its last checkpoint."""
        folder = getattr(self.process, "output", None)
        record = read_record_or_none(str(folder / "last")) if folder is not None else None
        history = record.validation_history if record is not None else []
        return [(h["iteration"], h["dice_mean"]) for h in history if "iteration" in h and "dice_mean" in h]
