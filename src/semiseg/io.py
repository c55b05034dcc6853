"""Reading and writing 3D volumes with their physical geometry.

Arrays are numpy-ordered (z, y, x), as SimpleITK returns them; geometry is kept in SimpleITK
order (x, y, z) so that a written file gets back exactly the source image's header.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import secrets
import struct
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from semiseg.errors import InputError, OutputExistsError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".h5")
WRITABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
# Refuse before allocating: 1024^3 voxels of float32 is already 4 GiB.
MAX_VOXELS = 1024**3
GEOMETRY_TOLERANCE = 1e-4
# NIfTI datatype code -> bytes per voxel, and the float codes whose values are checked for NaN/inf.
_NIFTI_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8, 2304: 4}
_NIFTI_FLOATS = {16: "f4", 64: "f8"}
_CHUNK_BYTES = 1 << 22


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a voxel grid, in SimpleITK (x, y, z) order."""

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return tuple(reversed(self.spacing))  # type: ignore[return-value]

    @property
    def origin_zyx(self) -> tuple[float, float, float]:
        return tuple(reversed(self.origin))  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, data: dict) -> Geometry:
        return cls(
            spacing=tuple(float(v) for v in data["spacing"]),
            origin=tuple(float(v) for v in data["origin"]),
            direction=tuple(float(v) for v in data["direction"]),
        )

    @classmethod
    def of_image(cls, image: sitk.Image) -> Geometry:
        return cls(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))

    def apply_to(self, image: sitk.Image) -> None:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    def matches(self, other: Geometry, tolerance: float = GEOMETRY_TOLERANCE) -> bool:
        return all(
            np.allclose(a, b, atol=tolerance, rtol=0)
            for a, b in ((self.spacing, other.spacing), (self.origin, other.origin), (self.direction, other.direction))
        )


@dataclass
class Volume:
    """A 3D array in (z, y, x) order with the geometry of its grid; a scan of several channels
    (multi-parametric MRI) holds them first: (channel, z, y, x)."""

    array: np.ndarray
    geometry: Geometry

    @property
    def shape(self) -> tuple[int, int, int]:
        """The grid's (z, y, x) size, whatever the channels."""
        return self.array.shape[-3:]  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        return 1 if self.array.ndim == 3 else self.array.shape[0]

    def channel(self, index: int) -> Volume:
        """One channel as a 3D volume on the same grid."""
        return self if self.array.ndim == 3 else Volume(self.array[index], self.geometry)


def volume_suffix(path: str | os.PathLike) -> str | None:
    """The recognised volume suffix of a file name (".nii.gz", ".nrrd", ...), or None."""
    name = Path(path).name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), None)


def strip_suffix(path: str | os.PathLike) -> str:
    """File name without its volume suffix: "case_01.nii.gz" -> "case_01"."""
    name = Path(path).name
    suffix = volume_suffix(name)
    return name[: -len(suffix)] if suffix else Path(name).stem


def is_dicom_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    with _itk_name(path) as name:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(name))


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a non-UTF-8 byte kept by Python as a lone surrogate
        return False
    return True


@contextmanager
def _itk_name(path: Path) -> Iterator[str]:
    """A name SimpleITK can open for path. ITK aborts the process on a file name that is not valid
    UTF-8, so such a path is reached through a temporary symbolic link with a plain name."""
    if _utf8(str(path)):
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="semiseg-") as folder:
        link = Path(folder) / ("volume" + (volume_suffix(path) or ""))
        os.symlink(os.fsencode(path.absolute()), link)
        yield str(link)


def read_volume(path: str | os.PathLike, dataset: str = "image") -> Volume:
    """Read a NIfTI/NRRD/MHA/MHD file, a DICOM series folder, or one dataset of an LA h5 file.

    Raises InputError with a one-line explanation for anything that is not a usable 3D volume.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        return _checked(path, _read_dicom_series(path))
    suffix = volume_suffix(path)
    if suffix is None:
        raise InputError(f"{path}: not a supported volume ({', '.join(VOLUME_SUFFIXES)} or a DICOM folder)")
    if suffix == ".h5":
        return _checked(path, _read_h5(path, dataset))
    return _checked(path, _read_sitk_file(path))


def read_scan(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> Volume:
    """A scan of one or several channels: one file per channel (nnU-Net's case_0000, case_0001, ...,
    on one grid), or one 4D NIfTI holding the channels on its 4th axis (MSD BrainTumour, Prostate).
    One 3D file gives a 3D volume; several channels give (channel, z, y, x)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if len(paths) == 1:
        path = Path(paths[0])
        stack = _read_channel_stack(path) if path.is_file() and volume_suffix(path) in (".nii", ".nii.gz") else None
        return stack if stack is not None else read_volume(path)
    return stack_channels([read_volume(path) for path in paths], [str(path) for path in paths])


def stack_channels(volumes: Sequence[Volume], names: Sequence[str]) -> Volume:
    """3D volumes of one scan's channels as one (channel, z, y, x) volume, refusing a channel on
    another grid (`names` say which in the message)."""
    first = volumes[0]
    for name, volume in zip(names[1:], volumes[1:]):
        if volume.shape != first.shape or not volume.geometry.matches(first.geometry):
            raise InputError(f"{name}: this channel's grid (shape {volume.shape}, spacing/origin/direction) differs from "
                             f"{names[0]}'s (shape {first.shape}); the channels of a scan must share one grid")
    return Volume(np.stack([v.array for v in volumes]), first.geometry)


def _read_channel_stack(path: Path) -> Volume | None:
    """A 4D NIfTI of several 3D channels as (channel, z, y, x); None when the file is not one."""
    with _opened(path) as reader:
        if reader is None:
            return None  # read_volume gives the reason
        size = reader.GetSize()
        if len(size) != 4 or size[3] < 2 or reader.GetNumberOfComponents() != 1:
            return None
        _check_header(path, size[:3], 1)
        _check_nifti_payload(path, volume_suffix(path) == ".nii.gz")
        try:
            image = reader.Execute()
        except RuntimeError as error:
            raise InputError(f"{_shown(path)}: the file is corrupt or truncated ({_first_line(error)})") from None
    channels = [sitk.Extract(image, [*size[:3], 0], [0, 0, 0, c]) for c in range(size[3])]
    volume = Volume(np.stack([sitk.GetArrayFromImage(c) for c in channels]), Geometry.of_image(channels[0]))
    return _checked(path, volume)


def read_header(path: str | os.PathLike) -> tuple[Geometry, tuple[int, int, int]] | None:
    """Geometry and (z, y, x) shape of a volume file from its header alone (of one channel, for a
    4D NIfTI of several channels); None when the header cannot say (unreadable, h5, a folder): read
    the volume then."""
    with _opened(Path(path)) as reader:
        if reader is None or reader.GetDimension() not in (3, 4):
            return None
    image = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    image.SetSpacing(reader.GetSpacing()[:3])
    image.SetOrigin(reader.GetOrigin()[:3])
    direction = np.array(reader.GetDirection()).reshape(reader.GetDimension(), -1)[:3, :3]
    image.SetDirection(direction.ravel().tolist())
    return Geometry.of_image(image), tuple(reversed(reader.GetSize()[:3]))


def read_header_size(path: str | os.PathLike) -> tuple[int, ...] | None:
    """The image size the file's header gives, (x, y, z[, channels]) as ITK orders it; None when
    the header cannot say."""
    with _opened(Path(path)) as reader:
        return None if reader is None else tuple(int(n) for n in reader.GetSize())


@contextmanager
def _opened(path: Path) -> Iterator[sitk.ImageFileReader | None]:
    """A reader of the file with its header read, usable (Execute) inside the block; None when the
    header does not read (or the file is h5, a folder, not a volume)."""
    if not path.is_file() or volume_suffix(path) in (None, ".h5"):
        yield None
        return
    with _itk_name(path) as name:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            yield None
            return
        yield reader


def _read_sitk_file(path: Path) -> Volume:
    with _itk_name(path) as name:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError as error:
            raise InputError(f"{_shown(path)}: cannot read the header ({_first_line(error)})") from None
        _check_header(path, reader.GetSize(), reader.GetNumberOfComponents())
        suffix = volume_suffix(path)
        if suffix in (".nii", ".nii.gz"):
            _check_nifti_payload(path, suffix == ".nii.gz")
        try:
            image = reader.Execute()
        except RuntimeError as error:
            raise InputError(f"{_shown(path)}: the file is corrupt or truncated ({_first_line(error)})") from None
    return _volume_from_image(path, image)


def _shown(path: Path) -> str:
    """The path for a message, with undecodable bytes escaped so that printing it cannot fail."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


def _read_dicom_series(path: Path) -> Volume:
    with _itk_name(path) as name:
        return _read_dicom_series_named(path, name)


def _read_dicom_series_named(path: Path, name: str) -> Volume:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(name)
    if not series_ids:
        dcm_files = [entry for entry in path.iterdir() if entry.suffix.lower() == ".dcm"]
        if dcm_files:
            raise InputError(
                f"{path}: a folder with no DICOM series: its {len(dcm_files)} .dcm files are corrupt or not DICOM"
            )
        raise InputError(f"{path}: a folder with no DICOM series (give a volume file or a DICOM series folder)")
    # Several series in one folder: read the one with most slices, the usual acquisition.
    files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(name, sid) for sid in series_ids), key=len)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"{path}: cannot read the DICOM series ({_first_line(error)})") from None
    return _volume_from_image(path, image)


def _read_h5(path: Path, dataset: str) -> Volume:
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            if dataset not in handle:
                raise InputError(f"{path}: no '{dataset}' dataset (found: {', '.join(handle.keys()) or 'none'})")
            data = handle[dataset]
            if not isinstance(data, h5py.Dataset):
                raise InputError(f"{path}: '{dataset}' is an HDF5 group, not a dataset")
            if data.dtype.kind not in "biuf":
                raise InputError(f"{path}: '{dataset}' holds {data.dtype} values; expected numbers")
            if data.ndim != 3:
                raise InputError(f"{path}: '{dataset}' has shape {data.shape}; expected a 3D volume")
            _check_header(path, tuple(reversed(data.shape)), 1)
            array = np.asarray(data[()])
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        # h5py reports damaged files through all of these (found by scripts/fuzz_readers.py).
        raise InputError(f"{path}: not a readable HDF5 file ({_first_line(error)})") from None
    # The LA benchmark stores (x, y, z); keep the project's (z, y, x) order. It carries no
    # spacing: distances on it are in voxels, as the papers report them.
    return Volume(np.ascontiguousarray(array.transpose(2, 1, 0)), Geometry())


def _check_header(path: Path, size: tuple[int, ...], components: int) -> None:
    size = tuple(int(s) for s in size)
    if components != 1:
        raise InputError(f"{path}: {components} components per voxel; expected a single-channel volume")
    spatial = list(size)
    while len(spatial) > 3 and spatial[-1] == 1:  # a 4D file with one time point is a 3D volume
        spatial.pop()
    if len(spatial) != 3:
        raise InputError(f"{path}: a {len(size)}D image of size {size}; expected a 3D volume")
    if min(spatial) < 1:
        raise InputError(f"{path}: the volume is empty (size {size})")
    if math.prod(spatial) > MAX_VOXELS:
        raise InputError(f"{path}: size {size} is over the {MAX_VOXELS:,}-voxel limit")


def _nifti_layout(header: bytes) -> tuple[tuple[int, ...], int, int, str] | None:
    """(dims, datatype, data offset, byte order) of a NIfTI-1 or NIfTI-2 header, or None if not one."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack_from(order + "i", header, 0)[0] == 348:
            dim = struct.unpack_from(order + "8h", header, 40)
            datatype = struct.unpack_from(order + "h", header, 70)[0]
            vox_offset = struct.unpack_from(order + "f", header, 108)[0]
            offset = max(int(vox_offset), 352) if math.isfinite(vox_offset) else 352
            break
        if len(header) >= 540 and struct.unpack_from(order + "i", header, 0)[0] == 540:
            dim = struct.unpack_from(order + "8q", header, 16)
            datatype = struct.unpack_from(order + "h", header, 12)[0]
            offset = max(struct.unpack_from(order + "q", header, 168)[0], 544)
            break
    else:
        return None
    if not 1 <= dim[0] <= 7:
        return None
    return tuple(dim[1 : dim[0] + 1]), datatype, offset, order


def _check_nifti_payload(path: Path, compressed: bool) -> None:
    """Refuse a NIfTI file whose data is short, empty, or holds NaN/inf.

    ITK's NIfTI reader does none of this: it zero-fills data missing from a truncated file,
    reads a zero dimension as one, and silently turns NaN and inf into 0.
    """
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as stream:
            header = stream.read(540)
            layout = _nifti_layout(header)
            if layout is None:
                return  # not a header this check understands: ITK's own checks apply
            dims, datatype, offset, order = layout
            if min(dims) < 1:
                raise InputError(f"{path}: the volume is empty (NIfTI dimensions {dims})")
            if datatype not in _NIFTI_BYTES:
                return
            expected = math.prod(dims) * _NIFTI_BYTES[datatype]
            float_type = np.dtype(order + _NIFTI_FLOATS[datatype]) if datatype in _NIFTI_FLOATS else None
            if not compressed and float_type is None:
                received = max(os.path.getsize(path) - offset, 0)
                bad = 0
            else:
                if offset > len(header):
                    stream.read(offset - len(header))
                received, bad = _scan_payload(stream, header[offset:], expected, float_type)
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"{path}: the file is corrupt or truncated ({_first_line(error)})") from None
    if received < expected:
        raise InputError(
            f"{path}: the file is truncated: its header announces {expected:,} bytes of voxel data, "
            f"it holds {received:,}"
        )
    if bad:
        raise InputError(f"{path}: {bad} voxels are NaN or infinite")


def _scan_payload(stream, first: bytes, expected: int, float_type: np.dtype | None) -> tuple[int, int]:
    """Bytes of voxel data available (up to expected) and, for floats, how many values are not finite."""
    received, bad, carry = 0, 0, b""
    chunk = first[:expected]
    while True:
        received += len(chunk)
        if float_type is not None and chunk:
            data = carry + chunk
            usable = len(data) - len(data) % float_type.itemsize
            values = np.frombuffer(data, float_type, count=usable // float_type.itemsize)
            bad += int(values.size - np.count_nonzero(np.isfinite(values)))
            carry = data[usable:]
        if received >= expected:
            return received, bad
        chunk = stream.read(min(_CHUNK_BYTES, expected - received))
        if not chunk:
            return received, bad


def _volume_from_image(path: Path, image: sitk.Image) -> Volume:
    if image.GetNumberOfComponentsPerPixel() != 1:
        components = image.GetNumberOfComponentsPerPixel()
        raise InputError(f"{path}: {components} components per voxel; expected a single-channel volume")
    if image.GetDimension() > 3:
        # A 4D file with one time point is a 3D volume; anything else was refused in the header check.
        size = list(image.GetSize())
        if any(s != 1 for s in size[3:]):
            raise InputError(f"{path}: a {len(size)}D image of size {tuple(size)}; expected a 3D volume")
        image = sitk.Extract(image, size[:3] + [0] * (len(size) - 3), [0] * len(size))
    if image.GetDimension() != 3:
        raise InputError(f"{path}: a {image.GetDimension()}D image; expected a 3D volume")
    return Volume(sitk.GetArrayFromImage(image), Geometry.of_image(image))


def _checked(path: Path, volume: Volume) -> Volume:
    if volume.array.ndim not in (3, 4) or min(volume.array.shape) < 1:
        raise InputError(f"{path}: expected a non-empty 3D volume, got shape {volume.array.shape}")
    if np.issubdtype(volume.array.dtype, np.floating) and not np.isfinite(volume.array).all():
        bad = int((~np.isfinite(volume.array)).sum())
        raise InputError(f"{path}: {bad} voxels are NaN or infinite")
    return volume


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # ITK errors put the useful sentence in a "Description:" or "ITK ERROR:" line (the "Reason:"
    # line after it is often a stale errno), SimpleITK's in "sitk::ERROR:", Python's in the last.
    for marker in ("Description:", "ITK ERROR:", "sitk::ERROR:"):
        useful = [line for line in lines if marker in line]
        if useful:
            text = useful[0].split(marker, 1)[1].strip()
            return re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", text) or "unknown error"
    return lines[-1] if lines else type(error).__name__


def check_same_grid(image: Volume, label: Volume, label_name: str) -> None:
    """Refuse a label whose grid differs from its image's."""
    if image.shape != label.shape:
        raise InputError(f"{label_name}: label shape {label.shape} differs from its image's {image.shape} (z, y, x)")
    if not image.geometry.matches(label.geometry):
        raise InputError(f"{label_name}: label geometry (spacing/origin/direction) differs from its image's")


def _image_for_writing(volume: Volume, path: Path) -> sitk.Image:
    array = np.asarray(volume.array)
    if array.ndim == 4 and array.shape[0] > 1:  # channels: a 4D NIfTI, as read_scan reads it
        if volume_suffix(path) not in (".nii", ".nii.gz"):
            raise InputError(f"{path}: a scan of {array.shape[0]} channels is written as a 4D NIfTI (.nii.gz)")
        return sitk.JoinSeries([_image_for_writing(volume.channel(c), path) for c in range(array.shape[0])])
    if array.ndim != 3 or 0 in array.shape:
        raise InputError(f"{path}: can only write a non-empty 3D array, got shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)  # a mask: SimpleITK has no boolean pixel type
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    if array.dtype.kind not in "iuf" or array.dtype.itemsize > 8:
        raise InputError(f"{path}: cannot write {array.dtype} voxels (use an integer, float32 or float64 array)")
    geometry = volume.geometry
    lengths = (len(geometry.spacing), len(geometry.origin), len(geometry.direction))
    values = np.asarray([*geometry.spacing, *geometry.origin, *geometry.direction], dtype=float)
    if lengths != (3, 3, 9) or not np.isfinite(values).all() or min(geometry.spacing) <= 0:
        raise InputError(f"{path}: invalid geometry to write ({geometry})")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.astype(array.dtype.newbyteorder("="), copy=False)))
    try:
        geometry.apply_to(image)
    except RuntimeError as error:
        raise InputError(f"{path}: invalid geometry to write ({_first_line(error)})") from None
    return image


def _new_temporary(path: Path, suffix: str) -> Path:
    """An empty, new hidden file beside path, created with the umask's usual permissions (unlike mkstemp's 0600)."""
    for _ in range(100):
        temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp{suffix}"
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        except OSError as error:
            raise InputError(f"{path}: cannot write in {path.parent} ({error.strerror})") from None
        return temporary
    raise InputError(f"{path}: cannot create a temporary file in {path.parent}")


def write_volume(volume: Volume, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write atomically (temporary file, fsync, rename) so a crash never leaves a partial file.

    A boolean mask is written as uint8 and float16 as float32; other dtypes are kept. A scan of
    several channels is written as a 4D NIfTI (channels on the 4th axis).
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix not in WRITABLE_SUFFIXES:
        raise InputError(f"{path}: cannot write this format (use {', '.join(WRITABLE_SUFFIXES)})")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name to write")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; refusing to overwrite it (ask for overwrite to replace it)")
    if not path.parent.is_dir():
        raise InputError(f"{path.parent}: the output folder does not exist")
    image = _image_for_writing(volume, path)
    if suffix == ".mhd":
        if not _utf8(str(path)):
            raise InputError(f"{_shown(path)}: a MetaImage header cannot name its data file in a non-UTF-8 path; use .mha or .nii.gz")
        # An .mhd header names a raw file beside it: write both in place (no atomic pair rename).
        try:
            sitk.WriteImage(image, str(path), True)
        except RuntimeError as error:
            raise InputError(f"{path}: cannot write it ({_first_line(error)})") from None
        return path
    temporary = _new_temporary(path, suffix)
    try:
        with _itk_name(temporary) as name:
            sitk.WriteImage(image, name, True)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except RuntimeError as error:
        raise InputError(f"{path}: cannot write it ({_first_line(error)})") from None
    finally:
        if temporary.exists():
            temporary.unlink()
    return path
