"""Training in a separate process, so the viewer never freezes and a crash there cannot take napari
down (no Qt here; the widgets poll it with a QTimer).

The child is `python -m semiseg.napari.train_runner CONFIG.json`; its trainer events arrive as JSON
lines on its stdout (a reader thread queues them). `stop()` asks for a clean stop by writing
"stop" to its stdin (the trainer ends its iteration and saves OUT/last); if the plugin's process
dies, the child's stdin closes and it stops the same way. `kill()` is the last resort only.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import semiseg

CONFIG_NAME = "napari-train-config.json"
STDERR_NAME = "napari-train-stderr.log"


def _child_environment() -> dict[str, str]:
    env = dict(os.environ)
    # The child must import this very semiseg, installed or not.
    source_root = str(Path(semiseg.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([source_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # never join a torchrun group the viewer happens to run in
    return env


def cli_command(config) -> str:
    """The `semiseg train` command line equivalent to a config (for the user's records)."""
    text = shlex.join(["semiseg", "train", *config.to_argv()])
    if config.unexpressed():
        text += "  # + starting from a checkpoint and corrections: the plugin only"
    return text


class TrainingProcess:
    def __init__(self, config) -> None:
        self.config = config
        self.output = Path(config.output)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.process: subprocess.Popen | None = None
        self.stop_requested_at: float | None = None
        self._reader: threading.Thread | None = None
        self._stderr = None
        self.last_error: str | None = None

    # Lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        config_path = self.output / CONFIG_NAME
        config_path.write_text(json.dumps(self.config.to_dict(), indent=2))
        self._stderr = open(self.output / STDERR_NAME, "ab")
        kwargs: dict[str, Any] = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True  # a Ctrl-C in napari's terminal is napari's, not the child's
        else:
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "semiseg.napari.train_runner", str(config_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=_child_environment(),
            text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs,
        )
        self._reader = threading.Thread(target=self._read, name="semiseg-training-events", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and "type" in event:
                if event["type"] == "error":
                    self.last_error = event.get("message")
                self.events.put(event)
        code = self.process.wait()
        self.events.put({"type": "exit", "returncode": code, "error": self.last_error or self._stderr_tail(code)})

    def _stderr_tail(self, code: int) -> str | None:
        if code == 0:
            return None
        try:
            lines = [line for line in (self.output / STDERR_NAME).read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return None
        return lines[-1].strip() if lines else None

    def poll(self) -> list[dict[str, Any]]:
        """Events received since the last poll (an {"type": "exit"} one comes last)."""
        events = []
        while True:
            try:
                events.append(self.events.get_nowait())
            except queue.Empty:
                return events

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Ask for a clean stop: the current iteration ends and the last checkpoint is saved."""
        if not self.running:
            return
        self.stop_requested_at = time.monotonic()
        try:
            assert self.process is not None and self.process.stdin is not None
            self.process.stdin.write("stop\n")
            self.process.stdin.flush()
        except (OSError, ValueError, AssertionError):
            if os.name == "posix" and self.process is not None:
                os.kill(self.process.pid, signal.SIGINT)

    def kill(self) -> None:
        """Last resort: ends the process at once (its previous checkpoint stays valid: saves are atomic)."""
        if self.running and self.process is not None:
            self.process.kill()

    def wait(self, timeout: float | None = None) -> int | None:
        if self.process is None:
            return None
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def close(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


def describe_dataset(folder: str) -> dict[str, Any]:
    """What a dataset folder holds, for the Train widget: the engine's description, counts, classes
    and the spacing of a few scans (read from their headers only)."""
    from semiseg.datasets import load_dataset
    from semiseg.io import read_header

    dataset = load_dataset(folder)
    spacings = []
    for case in dataset.cases[:5]:
        header = read_header(case.image)
        if header is not None:
            spacings.append(header[0].spacing_zyx)
    if spacings:
        spacing = " × ".join(f"{sum(s[i] for s in spacings) / len(spacings):.3g}" for i in range(3))
        spacing_text = f"spacing (z × y × x) ≈ {spacing} mm (first {len(spacings)} scans)"
    else:
        spacing_text = "spacing: per scan (h5/DICOM; not read here)"
    return {
        "description": dataset.describe(),
        "labeled": len(dataset.labeled),
        "unlabeled": len(dataset.unlabeled),
        "class_names": dataset.class_names,
        "spacing": spacing_text,
        "layout": dataset.layout,
    }
