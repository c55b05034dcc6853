"""npe2 reader: NIfTI/NRRD/MHA/MHD files, DICOM series folders and LA h5 files.

A scan opens as an Image layer placed physically (napari's `affine` = spacing × direction, origin,
z y x: world coordinates are ITK's physical LPS coordinates), with its full geometry and source path in `layer.metadata`; a label file (a file in a folder named
labels*, a `_seg`/`_label`/`_mask` name, or whole-number data with few distinct values) opens as a
Labels layer on the same grid. An LA h5 file gives both its `image` and its `label`. A 4D NIfTI of
several channels (MSD BrainTumour, Prostate) gives one image layer per channel, named with nnU-Net's
channel suffix (`case_0000`, `case_0001`, ...) and its channel index in `layer.metadata["channel"]`,
so that Segment finds each channel of a model of several.
"""

from __future__ import annotations

from pathlib import Path

from semiseg.datasets import LA_CLASS_NAMES, channel_names_near, class_names_near, image_for_label
from semiseg.errors import SemisegError
from semiseg.io import Volume, is_dicom_folder, read_scan, read_volume, strip_suffix, volume_suffix
from semiseg.napari.layers import jsonable_names, looks_like_labels, volume_layer_data
from semiseg.napari.windows import CT_WINDOWS, DEFAULT_CT_WINDOW


def might_be_dicom_folder(folder: Path) -> bool:
    """Cheap pre-check before asking GDCM (which warns on stderr about every folder that is not
    DICOM): a DICOM series folder holds files that are not volume files (x.dcm, or no suffix)."""
    try:
        return any(p.is_file() and volume_suffix(p) is None and not p.name.startswith(".") for p in folder.iterdir())
    except OSError:
        return False


def _readable(path: str) -> bool:
    candidate = Path(path)
    if candidate.is_dir():
        return might_be_dicom_folder(candidate) and is_dicom_folder(candidate)
    if candidate.suffix.lower() == ".dcm":
        return is_dicom_folder(candidate.parent)
    return volume_suffix(candidate) is not None


def get_reader(path):
    """Return a reader for the path(s) if every one is a volume semiseg reads, else None."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(_readable(str(p)) for p in paths):
        return None
    return read_paths


# npe2's "read, and nothing to add" value. A reader that returns no layers (or declines in
# get_reader, which napari asks only after choosing this plugin by file name) makes napari raise
# "returned no data" / "refused the file" on top of the plugin's own message.
NOTHING_TO_ADD = [(None,)]


def read_paths(path) -> list[tuple]:
    """The layers of every path that reads; a path that does not gets a one-line message instead."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    _ensure_session()
    layers: list[tuple] = []
    for item in paths:
        try:
            layers += read_layers(item)
        except SemisegError as error:
            # A user-facing problem (corrupt file, not 3D, ...): one line, no traceback.
            from napari.utils.notifications import show_error

            show_error(f"semiseg: {error}")
    for _, attributes, kind in (layer for layer in layers if len(layer) == 3):
        if kind == "image" and attributes["metadata"].get("modality") == "CT":
            from napari.utils.notifications import show_info

            show_info(f"semiseg: {attributes['name']} is a CT: shown in the {DEFAULT_CT_WINDOW} window "
                      f"({', '.join(CT_WINDOWS)} in Segment > Window)")
    return layers or NOTHING_TO_ADD


def _ensure_session() -> None:
    """The window's session (created by a widget, else here): it moves the view onto a scan opened
    at another physical place than the ones before it."""
    from napari import current_viewer

    from semiseg.napari.session import session_for

    viewer = current_viewer()
    if viewer is not None:
        session_for(viewer)


def read_layers(path: str | Path) -> list[tuple]:
    """LayerData tuples for one file or DICOM folder (a .dcm file reads its folder's series)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".dcm":
        path = path.parent
    if path.is_dir():
        volume = read_volume(path)
        return [volume_layer_data(volume, path.name, "image", str(path))]
    name = strip_suffix(path)
    if volume_suffix(path) == ".h5":
        import h5py

        volume = read_volume(path, "image")
        layers = [volume_layer_data(volume, f"{path.parent.name}/{name}" if name == "mri_norm2" else name, "image", str(path))]
        with h5py.File(path, "r") as handle:
            has_label = "label" in handle
        if has_label:
            label = read_volume(path, "label")
            layers.append(volume_layer_data(label, f"{layers[0][1]['name']} label", "labels", str(path), image_path=str(path),
                                            class_names=jsonable_names(LA_CLASS_NAMES)))
        return layers
    volume = read_scan(path)
    if volume.channels > 1:
        return channel_layers(volume, name, path)
    if looks_like_labels(path, volume.array):
        names = class_names_near(path)
        image = image_for_label(path)
        image_path = str(image) if image is not None else None
        return [volume_layer_data(volume, f"{name} labels", "labels", str(path), class_names=jsonable_names(names),
                                  image_path=image_path)]
    return [volume_layer_data(volume, name, "image", str(path))]


def channel_layers(volume: Volume, name: str, path: Path) -> list[tuple]:
    """One image layer per channel of a scan, named by nnU-Net's suffix and, when the dataset.json
    beside the file (or one folder up) names as many channels, by the channel's name."""
    names = channel_names_near(path)  # none: the suffixes still say which channel is which
    if len(names) != volume.channels:
        names = ()
    layers = []
    for index in range(volume.channels):
        label = f"{name}_{index:04d}" + (f" ({names[index]})" if names else "")
        layers.append(volume_layer_data(volume.channel(index), label, "image", str(path), channel=index,
                                        channel_name=names[index] if names else None))
    return layers
