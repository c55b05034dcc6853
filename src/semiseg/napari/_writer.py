"""npe2 writers: a Labels (or Image) layer to NIfTI/NRRD/MHA with its scan's exact geometry.

Overwriting, decided: napari reaches these writers through File > Save Selected Layers, whose
file dialog already asks "replace it?" when the name exists, or through `viewer.layers.save(path)`,
an explicit request in code (napari's own writers overwrite there too). So an existing file is
replaced -- atomically (temporary file, fsync, rename: never a half-written mask) -- with one
exception: a layer is never written over the scan it shows or was predicted from, which would
destroy the image. The Export widget, which has no such dialog, asks before replacing anything.

A layer without recorded geometry (napari's New Labels) is written with the geometry of the open
scan whose grid it shares, and refused when it shares none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from semiseg.errors import InputError, SemisegError
from semiseg.io import WRITABLE_SUFFIXES, Volume, volume_suffix, write_volume
from semiseg.napari.layers import labels_array, volume_from_attributes
from semiseg.napari.placement import grid_metadata, world_matrix


def _open_layers() -> list:
    """The layers of the current viewer: a layer without its own geometry takes that of the scan it lies on."""
    from napari import current_viewer

    viewer = current_viewer()
    return list(viewer.layers) if viewer is not None else []


def _protected(path: Path, attributes: dict[str, Any]) -> str | None:
    metadata = attributes.get("metadata") or {}
    target = path.resolve()
    for key in ("image_path",) + (("source_path",) if metadata.get("role") not in ("labels", "correction") else ()):
        source = metadata.get(key)
        if source and Path(source).exists() and Path(source).resolve() == target:
            return source
    return None


def _write(path: str, data, attributes: dict[str, Any], as_labels: bool) -> list[str]:
    from napari.utils.notifications import show_error

    target = Path(path)
    try:
        if volume_suffix(target) not in WRITABLE_SUFFIXES:
            raise InputError(f"{target.name}: choose a .nii.gz, .nii, .nrrd or .mha file name")
        protected = _protected(target, attributes)
        if protected:
            raise InputError(f"{target}: that is the scan this layer belongs to; save under another name")
        array = data[0] if attributes.get("multiscale") else data
        metadata = grid_metadata(attributes.get("name", "layer"), np.shape(array), world_matrix(attributes), attributes.get("metadata"), _open_layers())
        volume = volume_from_attributes(data, {**attributes, "metadata": metadata})
        if as_labels:
            volume = Volume(labels_array(volume.array, attributes.get("name", "labels")), volume.geometry)
        written = write_volume(volume, target, overwrite=True)
    except SemisegError as error:
        show_error(f"semiseg: not saved: {error}")
        return []
    return [str(written)]


def write_labels(path: str, data, attributes: dict[str, Any]) -> list[str]:
    return _write(path, data, attributes, as_labels=True)


def write_image(path: str, data, attributes: dict[str, Any]) -> list[str]:
    return _write(path, data, attributes, as_labels=False)
