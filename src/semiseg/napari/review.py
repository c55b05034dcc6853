"""The review queue (no Qt here): predict every scan of a folder, rank them most uncertain first, and
hand out the next one not reviewed yet. Predictions are kept on disk in the cache
($SEMISEG_CACHE/review/<folder+model key>/), with queue.json recording scores and what was
reviewed, so a queue survives a restart and scans already predicted are not predicted again."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from semiseg.datasets import case_id_of, channel_files, files_by_case
from semiseg.errors import InputError, SemisegError
from semiseg.io import is_dicom_folder, read_scan, strip_suffix, volume_suffix, write_volume
from semiseg.preprocessing import cache_root


@dataclass
class QueueEntry:
    scan: str
    name: str
    score: float | None = None
    labels: str | None = None  # predicted label map (cache file)
    entropy: str | None = None
    error: str | None = None
    reviewed: bool = False


def list_scans(folder: str | os.PathLike, channels: int = 1) -> list[Path]:
    """The folder's scans; for a model of several channels, one per case: its first channel's file
    (case_0000, whose case_0001, ... come with it) or a 4D NIfTI."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (choose a folder of scans)")
    entries = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    files = [p for p in entries if p.is_file() and volume_suffix(p) not in (None, ".h5")]
    if not files and any(p.is_file() for p in entries) and is_dicom_folder(folder):
        return [folder]  # the folder is one DICOM series
    from semiseg.napari._reader import might_be_dicom_folder

    scans = files + [p for p in entries if p.is_dir() and might_be_dicom_folder(p) and is_dicom_folder(p)]
    if not scans:
        raise InputError(f"{folder}: no scans found (volume files or DICOM series folders)")
    if channels > 1:
        return sorted(files[0] for files in files_by_case(scans, folder).values())
    return sorted(scans)


def entry_files(scan: str | os.PathLike, channels: int) -> list[Path]:
    """A queue entry's files: its scan and, for a model of several channels, the channel files beside it."""
    return channel_files(scan) if channels > 1 else [Path(scan)]


class ReviewQueue:
    def __init__(self, folder: str | os.PathLike, checkpoint: str, weights_sha256: str | None, tta: bool = False) -> None:
        self.folder = Path(folder)
        self.checkpoint = str(checkpoint)
        key = hashlib.sha256(f"{self.folder.resolve()}|{weights_sha256 or checkpoint}|{tta}".encode()).hexdigest()[:16]
        self.cache = cache_root() / "review" / key
        self.entries: list[QueueEntry] = []
        self.tta = tta
        self._load()

    @property
    def state_file(self) -> Path:
        return self.cache / "queue.json"

    def _load(self) -> None:
        try:
            data = json.loads(self.state_file.read_text())
            self.entries = [QueueEntry(**e) for e in data.get("entries", [])]
        except (OSError, ValueError, TypeError):
            self.entries = []

    def save(self) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        temporary = self.state_file.with_name(f".queue.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"folder": str(self.folder), "checkpoint": self.checkpoint,
                                         "entries": [asdict(e) for e in self.entries]}, indent=1))
        os.replace(temporary, self.state_file)

    def rank(self, model, device, predict: Callable[..., Any], progress: Callable[[dict], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> list[QueueEntry]:
        """Predict the scans not predicted yet (`predict(volume, model, device, tta, progress=, should_stop=)`
        returns a SegmentResult); sort all by uncertainty, most uncertain first."""
        report = progress or (lambda event: None)
        should_stop = should_stop or (lambda: False)
        known = {e.scan: e for e in self.entries}
        channels = model.plan.in_channels
        scans = list_scans(self.folder, channels)
        entries = [known.get(str(p)) or QueueEntry(str(p), (case_id_of(p) if channels > 1 else strip_suffix(p)) if p.is_file() else p.name)
                   for p in scans]
        self.cache.mkdir(parents=True, exist_ok=True)
        for index, entry in enumerate(entries):
            done = entry.score is not None and entry.labels and Path(entry.labels).is_file()
            if done:
                continue

            def scan_progress(event: dict, index=index, entry=entry) -> None:
                fraction = (index + event.get("fraction", 0.0)) / len(entries)
                report({"fraction": fraction, "text": f"{entry.name} ({index + 1}/{len(entries)}): {event.get('text', '')}"})

            try:
                volume = read_scan(entry_files(entry.scan, channels))
                result = predict(volume, model, device, self.tta, progress=scan_progress, should_stop=should_stop)
            except SemisegError as error:
                entry.error = " ".join(str(error).split())
                continue
            stem = f"{index:04d}_{entry.name}"
            entry.labels = str(write_volume(result.prediction.labels, self.cache / f"{stem}_labels.nii.gz", overwrite=True))
            entry.entropy = str(write_volume(result.prediction.entropy, self.cache / f"{stem}_entropy.nii.gz", overwrite=True))
            entry.score = result.score
            entry.error = None
            self.entries = entries
            self.save()
        self.entries = sorted(entries, key=lambda e: (e.score is None, -(e.score or 0.0), e.name))
        self.save()
        return self.entries

    def for_model(self, checkpoint: str, weights_sha256: str | None) -> ReviewQueue:
        """The same folder's queue under another model (after fine-tuning), to rank again: scans
        reviewed here stay reviewed there."""
        queue = ReviewQueue(self.folder, checkpoint, weights_sha256, self.tta)
        known = {e.scan: e for e in queue.entries}
        for entry in self.entries:
            if entry.reviewed:
                known.setdefault(entry.scan, QueueEntry(entry.scan, entry.name)).reviewed = True
        queue.entries = list(known.values())
        return queue

    def next_unreviewed(self) -> QueueEntry | None:
        return next((e for e in self.entries if not e.reviewed and e.score is not None), None)

    def mark_reviewed(self, entry: QueueEntry, reviewed: bool = True) -> None:
        entry.reviewed = reviewed
        self.save()
