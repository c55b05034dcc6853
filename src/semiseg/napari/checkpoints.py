"""Finding, remembering, describing and loading checkpoints for the widgets (no Qt here).

- the bundled default model: `resources/models/default` of a source checkout (found relative to the
  installed package, which an editable install keeps in the checkout), or $SEMISEG_DEFAULT_MODEL;
- recent checkpoints: a small JSON list in the user's config folder ($SEMISEG_CONFIG_DIR, else
  ~/.config/semiseg), newest first, only checkpoints whose weights still match their SHA-256;
- a cache of loaded models per (checkpoint, device), reloaded when model.json changes.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from semiseg.checkpoint import MODEL_JSON, MODEL_WEIGHTS, resolve, verify
from semiseg.errors import CheckpointError, SemisegError

if TYPE_CHECKING:
    from semiseg.models import ModelRecord

MAX_RECENT = 12


def default_model_path() -> Path | None:
    """The bundled default model if this installation has one, else None."""
    candidates = []
    if os.environ.get("SEMISEG_DEFAULT_MODEL"):
        candidates.append(Path(os.environ["SEMISEG_DEFAULT_MODEL"]))
    package = Path(__file__).resolve().parent
    candidates += [package / "models" / "default", package.parents[2] / "resources" / "models" / "default"]
    for candidate in candidates:
        if (candidate / MODEL_JSON).is_file():
            return candidate
    return None


def config_dir() -> Path:
    return Path(os.environ.get("SEMISEG_CONFIG_DIR") or Path.home() / ".config" / "semiseg")


def _recent_file() -> Path:
    return config_dir() / "recent-checkpoints.json"


def is_checkpoint(path: str | os.PathLike) -> bool:
    try:
        resolve(path)
    except SemisegError:
        return False
    return True


@functools.lru_cache(maxsize=64)
def _intact(folder: str, stamp: tuple) -> bool:
    try:
        verify(folder)
    except SemisegError:
        return False
    return True


def is_intact(path: str | os.PathLike) -> bool:
    """A checkpoint whose weights match their recorded SHA-256 (hashed again only when its files change)."""
    try:
        folder = resolve(path)
        stamp = tuple((s.st_size, s.st_mtime_ns) for s in ((folder / MODEL_JSON).stat(), (folder / MODEL_WEIGHTS).stat()))
    except (SemisegError, OSError):
        return False
    return _intact(str(folder), stamp)


def recent_checkpoints() -> list[str]:
    """The recent list, newest first; entries no longer intact (moved, corrupted) are dropped from it."""
    try:
        stored = json.loads(_recent_file().read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(stored, list):
        return []
    entries = [str(p) for p in stored if isinstance(p, str) and is_intact(p)]
    if entries != stored:
        _save_recent(entries)
    return entries


def remember_checkpoint(path: str | os.PathLike) -> list[str]:
    """Put a checkpoint first in the recent list (saved atomically); returns the new list."""
    folder = str(resolve(path))
    entries = [folder] + [p for p in recent_checkpoints() if str(Path(p)) != folder]
    entries = entries[:MAX_RECENT]
    _save_recent(entries)
    return entries


def _save_recent(entries: list[str]) -> None:
    target = _recent_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(entries, indent=1))
        os.replace(temporary, target)
    except OSError:
        pass  # an unwritable config folder only loses the list across sessions


def describe_record(record: ModelRecord) -> str:
    classes = ", ".join(v for k, v in sorted(record.class_names.items()) if k != 0)
    parts = [
        f"{record.method} / {record.network}",
        f"classes: {classes or '?'}",
        f"iteration {record.iteration} of {record.iterations}",
    ]
    if record.best_dice_mean is not None:
        parts.append(f"validation Dice {record.best_dice_mean:.3f}")
    return "; ".join(parts)


def read_record_or_none(path: str | os.PathLike | None) -> ModelRecord | None:
    """The checkpoint's record, or None when there is no path or it does not read."""
    from semiseg.models import read_record

    try:
        return read_record(path) if path else None
    except SemisegError:
        return None


def describe_checkpoint(path: str | os.PathLike) -> str:
    try:
        from semiseg.models import read_record

        return describe_record(read_record(path))
    except SemisegError as error:
        return str(error)


def checkpoint_label(path: str | os.PathLike) -> str:
    """Short text for a list: the run folder and the checkpoint name ("demo/best")."""
    folder = Path(path)
    if default_model_path() is not None and folder.resolve() == default_model_path().resolve():
        return "bundled default model"
    return f"{folder.parent.name}/{folder.name}" if folder.parent.name else folder.name


class ModelCache:
    """Loaded models by (checkpoint folder, device); thread-safe; reloads a changed checkpoint."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], tuple[float, Any]] = {}

    def get(self, path: str | os.PathLike, device) -> Any:
        from semiseg.models import load_model

        folder = resolve(path)
        try:
            stamp = (folder / MODEL_JSON).stat().st_mtime_ns
        except OSError as error:
            raise CheckpointError(f"{folder}: cannot read it ({error.strerror})") from None
        key = (str(folder), str(device))
        with self._lock:
            cached = self._models.get(key)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            model = load_model(folder, device)
            self._models[key] = (stamp, model)
            return model

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


MODELS = ModelCache()
