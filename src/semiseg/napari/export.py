"""Exporting label maps (no Qt here): each to a file on its scan's grid, with a sidecar JSON naming
the checkpoint that predicted it and the SHA-256 of that checkpoint's weights."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from semiseg import __version__
from semiseg.errors import InputError, OutputExistsError
from semiseg.io import WRITABLE_SUFFIXES, Volume, write_volume
from semiseg.napari.layers import data_digest, geometry_from, labels_array, layer_array
from semiseg.napari.placement import grid_metadata, layer_world_matrix

EXPORT_SUFFIXES = (".nii.gz", ".nrrd", ".mha", ".nii")


@dataclass
class ExportItem:
    name: str
    volume: Volume
    metadata: dict[str, Any]


def export_item(layer, layers) -> ExportItem:
    """A label layer with the geometry of its scan: its own recorded one, else that of the open scan
    whose grid it shares (refused when there is none)."""
    array = np.array(layer_array(layer), copy=True)
    metadata = grid_metadata(layer.name, array.shape, layer_world_matrix(layer), layer.metadata, layers)
    return ExportItem(layer.name, Volume(array, geometry_from(metadata, array.shape, name=layer.name)), metadata)


def safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name.strip())
    return cleaned.strip("._") or "labels"


def targets(items: list[ExportItem], folder: str | os.PathLike, suffix: str) -> list[tuple[Path, Path]]:
    """(label file, sidecar) per item; refuses two items that would share a file name."""
    if suffix not in WRITABLE_SUFFIXES:
        raise InputError(f"cannot export to {suffix} (use {', '.join(EXPORT_SUFFIXES)})")
    folder = Path(folder)
    result, seen = [], {}
    for item in items:
        stem = safe_name(item.name)
        if stem.lower() in seen:
            raise InputError(f"'{seen[stem.lower()]}' and '{item.name}' would be exported to the same file {stem}{suffix}; rename one layer")
        seen[stem.lower()] = item.name
        result.append((folder / f"{stem}{suffix}", folder / f"{stem}.json"))
    return result


def existing(paths: list[tuple[Path, Path]]) -> list[Path]:
    return [p for pair in paths for p in pair if p.exists()]


def sidecar(item: ExportItem, label_file: Path) -> dict[str, Any]:
    meta = item.metadata
    checkpoint = None
    if meta.get("checkpoint"):
        checkpoint = {"path": meta["checkpoint"], "weights_sha256": meta.get("checkpoint_sha256"), "method": meta.get("method")}
    written = meta.get("written_digest")
    return {
        "file": label_file.name,
        "layer": item.name,
        "role": meta.get("role"),
        "source_image": meta.get("image_path") or (meta.get("source_path") if meta.get("role") in ("prediction", "correction") else None),
        "source_file": meta.get("source_path"),
        "checkpoint": checkpoint,
        "edited_after_prediction": (data_digest(item.volume.array) != written) if written else None,
        "class_names": meta.get("class_names"),
        "geometry": item.volume.geometry.to_dict(),
        "shape_zyx": list(item.volume.shape),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "semiseg_version": __version__,
    }


def export(items: list[ExportItem], folder: str | os.PathLike, suffix: str = ".nii.gz", overwrite: bool = False) -> list[Path]:
    """Write every item and its sidecar; without overwrite, refuses (before writing anything) when any
    target exists."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: the export folder does not exist")
    pairs = targets(items, folder, suffix)
    clashes = existing(pairs)
    if clashes and not overwrite:
        more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        raise OutputExistsError(f"{clashes[0]} exists{more}; refusing to overwrite it")
    written = []
    for item, (label_file, json_file) in zip(items, pairs):
        volume = Volume(labels_array(item.volume.array, item.name), item.volume.geometry)
        written.append(write_volume(volume, label_file, overwrite=overwrite))
        temporary = json_file.with_name(f".{json_file.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(sidecar(item, label_file), indent=2))
        os.replace(temporary, json_file)
    return written
