"""Reading and writing volumes: real-data round trips, LA h5, bad inputs, atomic writes."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from semiseg import io
from semiseg.errors import InputError, OutputExistsError
from semiseg.io import Geometry, Volume, check_same_grid, read_volume, write_volume

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLES = ["example_ct.nii.gz", "example_ct_sm.nii.gz", "example_mr_sm.nii.gz", "example_seg.nii.gz"]
HIPPOCAMPUS = ["hippocampus_001.nii.gz", "hippocampus_004.nii.gz", "hippocampus_006.nii.gz"]
ROUND_TRIP_SUFFIXES = [".nii.gz", ".nrrd", ".mha"]


@pytest.fixture(scope="module")
def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


def data_file(shared_data: Path, relative: str) -> Path:
    path = shared_data / relative
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="module")
def dicom_volume(shared_data: Path) -> Volume:
    return read_volume(data_file(shared_data, "samples/example_ct_dicom"))


def assert_same_geometry(a: Geometry, b: Geometry, atol: float = 1e-6) -> None:
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=0, atol=atol)
    np.testing.assert_allclose(a.origin, b.origin, rtol=0, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, rtol=0, atol=atol)


def assert_round_trips(volume: Volume, folder: Path, suffixes=ROUND_TRIP_SUFFIXES) -> None:
    for suffix in suffixes:
        target = folder / f"copy{suffix}"
        assert write_volume(volume, target) == target
        back = read_volume(target)
        assert back.array.dtype == volume.array.dtype, suffix
        assert back.shape == volume.shape, suffix
        np.testing.assert_array_equal(back.array, volume.array)
        assert_same_geometry(back.geometry, volume.geometry)


def user_error(excinfo: pytest.ExceptionInfo, starts_with: str | os.PathLike, *phrases: str) -> str:
    """The message is one line, starts with the path and says what is wrong."""
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert message.startswith(str(starts_with)), message
    for phrase in phrases:
        assert phrase in message, message
    return message


def small_image(dtype=np.int16, shape=(6, 7, 8)) -> sitk.Image:
    array = np.arange(np.prod(shape)).reshape(shape).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.75, 2.0))
    image.SetOrigin((-10.0, 20.5, 3.25))
    return image


def small_volume(dtype=np.int16, shape=(6, 7, 8)) -> Volume:
    image = small_image(dtype, shape)
    return Volume(sitk.GetArrayFromImage(image), Geometry.of_image(image))


def nifti_bytes(tmp_path: Path, image: sitk.Image | None = None) -> bytearray:
    """An uncompressed single-file NIfTI-1 (little-endian, as ITK writes it) of a small image."""
    source = tmp_path / "source.nii"
    sitk.WriteImage(image if image is not None else small_image(), str(source))
    raw = bytearray(source.read_bytes())
    source.unlink()
    assert struct.unpack_from("<i", raw, 0)[0] == 348
    return raw


def set_nifti_dims(raw: bytearray, *dims: int) -> None:
    for axis, value in enumerate(dims, start=1):
        struct.pack_into("<h", raw, 40 + 2 * axis, value)


# --- round trips on real data -------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_round_trip(shared_data, tmp_path, name):
    volume = read_volume(data_file(shared_data, f"samples/{name}"))
    assert volume.array.ndim == 3
    assert_round_trips(volume, tmp_path)


@pytest.mark.parametrize("name", HIPPOCAMPUS)
def test_hippocampus_round_trip(shared_data, tmp_path, name):
    image = read_volume(data_file(shared_data, f"hippocampus/imagesTr/{name}"))
    label = read_volume(data_file(shared_data, f"hippocampus/labelsTr/{name}"))
    check_same_grid(image, label, name)
    assert set(np.unique(label.array)) <= {0, 1, 2}
    (tmp_path / "image").mkdir()
    (tmp_path / "label").mkdir()
    assert_round_trips(image, tmp_path / "image")
    assert_round_trips(label, tmp_path / "label")


def test_other_writable_formats_round_trip(shared_data, tmp_path):
    volume = read_volume(data_file(shared_data, "samples/example_seg.nii.gz"))
    assert_round_trips(volume, tmp_path, suffixes=[".nii", ".mhd"])


def test_dicom_series_geometry(dicom_volume):
    assert dicom_volume.shape == (20, 512, 512)
    np.testing.assert_allclose(dicom_volume.geometry.spacing, (0.98, 0.98, 2.0), atol=0.01)
    assert dicom_volume.geometry.spacing_zyx == tuple(reversed(dicom_volume.geometry.spacing))
    assert dicom_volume.array.dtype == np.int16


def test_dicom_series_round_trip(dicom_volume, tmp_path):
    assert_round_trips(dicom_volume, tmp_path)


def test_label_on_dicom_grid_keeps_its_geometry(dicom_volume, tmp_path):
    mask = dicom_volume.array > 0  # a boolean mask on the DICOM grid: written as uint8
    label = Volume(mask, dicom_volume.geometry)
    for suffix in ROUND_TRIP_SUFFIXES:
        back = read_volume(write_volume(label, tmp_path / f"label{suffix}"))
        assert back.array.dtype == np.uint8
        np.testing.assert_array_equal(back.array, mask.astype(np.uint8))
        assert_same_geometry(back.geometry, dicom_volume.geometry)
        check_same_grid(dicom_volume, back, f"label{suffix}")


# --- LA h5 --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def la_files(shared_data) -> list[Path]:
    ids = data_file(shared_data, "la/test.list").read_text().split()
    folder = shared_data / "la" / "2018LA_Seg_Training Set"
    present = [folder / case / "mri_norm2.h5" for case in ids if (folder / case / "mri_norm2.h5").exists()]
    if not present:
        pytest.skip("no LA test case present")
    return present[:2]


def test_la_h5_image_and_label(la_files):
    for path in la_files:
        image = read_volume(path)
        label = read_volume(path, dataset="label")
        with h5py.File(path, "r") as handle:
            raw_image, raw_label = handle["image"][()], handle["label"][()]
        assert image.shape == label.shape == tuple(reversed(raw_image.shape))
        np.testing.assert_array_equal(image.array, raw_image.transpose(2, 1, 0))
        np.testing.assert_array_equal(label.array, raw_label.transpose(2, 1, 0))
        assert image.array.dtype == np.float32 and label.array.dtype == np.uint8
        assert image.array.flags.c_contiguous
        assert set(np.unique(label.array)) == {0, 1}
        assert image.geometry == Geometry() == label.geometry
        check_same_grid(image, label, str(path))


def test_la_h5_missing_dataset(la_files):
    with pytest.raises(InputError) as excinfo:
        read_volume(la_files[0], dataset="mask")
    user_error(excinfo, la_files[0], "no 'mask' dataset", "found: image, label")


def test_h5_bad_datasets(tmp_path):
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as handle:
        handle["four_d"] = np.zeros((1, 5, 6, 7), np.float32)
        handle["two_d"] = np.zeros((5, 6), np.float32)
        handle["empty"] = np.zeros((0, 5, 6), np.float32)
        handle["nan"] = np.full((3, 4, 5), np.nan, np.float32)
        handle["text"] = np.array([b"a", b"b"])
        handle.create_group("group")
    cases = {
        "four_d": "expected a 3D volume",
        "two_d": "expected a 3D volume",
        "empty": "empty",
        "nan": "60 voxels are NaN or infinite",
        "text": "expected numbers",
        "group": "group, not a dataset",
    }
    for dataset, phrase in cases.items():
        with pytest.raises(InputError) as excinfo:
            read_volume(path, dataset=dataset)
        user_error(excinfo, path, phrase)


def test_h5_not_hdf5(tmp_path):
    path = tmp_path / "garbage.h5"
    path.write_bytes(b"not an hdf5 file" * 64)
    with pytest.raises(InputError) as excinfo:
        read_volume(path)
    user_error(excinfo, path, "not a readable HDF5 file")


# --- bad inputs ---------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "absent.nii.gz"
    with pytest.raises(InputError) as excinfo:
        read_volume(path)
    user_error(excinfo, path, "no such file")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "slice.png"
    path.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(InputError) as excinfo:
        read_volume(path)
    user_error(excinfo, path, "not a supported volume")


def test_corrupt_nifti_random_bytes(tmp_path):
    path = tmp_path / "random.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError) as excinfo:
        read_volume(path)
    user_error(excinfo, path, "cannot read the header")


def test_truncated_nifti_gz_file(shared_data, tmp_path):
    raw = data_file(shared_data, "samples/example_ct_sm.nii.gz").read_bytes()
    path = tmp_path / "half.nii.gz"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError) as excinfo:
        read_volume(path)
    user_error(excinfo, path, "corrupt or truncated")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_nifti_gz_payload(shared_data, tmp_path, keep):
    """A valid gzip stream holding a cut NIfTI: ITK alone would zero-fill the missing voxels."""
    payload = gzip.decompress(data_file(shared_data, "samples/example_ct_sm.nii.gz").read_bytes())
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(gzip.compress(payload[: int(len(payload) * keep)], compresslevel=1))
    with pytest.raises(InputError) as excinfo:
        read_volume(path)
    user_error(excinfo, path, "truncated", "header announces")


def test_truncated_uncompressed_nifti(tmp_path):
    raw = nifti_bytes(tmp_path)
    path = tmp_path / "cut.nii"
    path.write_bytes(raw[: len(raw) - 10])
    with pytest.raises(InputError) as excinfo:
        read_volume(path)
    user_error(excinfo, path, "truncated")


def test_nifti_dims_that_lie(tmp_path):
    raw = nifti_bytes(tmp_path)  # 8 x 7 x 6 int16
    set_nifti_dims(raw, 8, 7, 12)  # claims twice the slices the file holds
    path = tmp_path / "liar.nii"
    path.write_bytes(raw)
    with pytest.raises(InputError) as excinfo:
        read_volume(path)
    user_error(excinfo, path, "truncated", f"announces {8 * 7 * 12 * 2:,} bytes", f"holds {8 * 7 * 6 * 2:,}")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_huge_nifti_refused_before_reading(tmp_path, monkeypatch, suffix):
    raw = nifti_bytes(tmp_path)
    set_nifti_dims(raw, 5000, 5000, 5000)
    path = tmp_path / f"huge{suffix}"
    path.write_bytes(gzip.compress(bytes(raw)) if suffix == ".nii.gz" else raw)

    def no_read(*args, **kwargs):
        raise AssertionError("the voxel data must not be read")

    monkeypatch.setattr(sitk.ImageFileReader, "Execute", no_read)
    with pytest.raises(InputError) as excinfo:
        read_volume(path)
    user_error(excinfo, path, "(5000, 5000, 5000)", "voxel limit")


def test_huge_metaimage_header_refused(tmp_path):
    path = tmp_path / "huge.mha"
    path.write_bytes(
        b"ObjectType = Image\nNDims = 3\nDimSize = 5000 5000 5000\n"
        b"ElementType = MET_FLOAT\nElementDataFile = LOCAL\n" + bytes(64)
    )
    with pytest.raises(InputError) as excinfo:
        read_volume(path)
    user_error(excinfo, path, "voxel limit")


def test_voxel_limit_applies_to_real_files(shared_data, monkeypatch):
    path = data_file(shared_data, "samples/example_seg.nii.gz")
    monkeypatch.setattr(io, "MAX_VOXELS", 1000)
    with pytest.raises(InputError) as excinfo:
        read_volume(path)
    user_error(excinfo, path, "over the 1,000-voxel limit")


def test_zero_size_nifti(tmp_path):
    raw = nifti_bytes(tmp_path)
    set_nifti_dims(raw, 8, 7, 0)  # ITK alone reads a zero dimension as one slice
    path = tmp_path / "empty.nii"
    path.write_bytes(raw)
    with pytest.raises(InputError) as excinfo:
        read_volume(path)
    user_error(excinfo, path, "empty")


def test_zero_size_volume_is_not_written(tmp_path):
    path = tmp_path / "empty.nii.gz"
    with pytest.raises(InputError) as excinfo:
        write_volume(Volume(np.zeros((0, 4, 5), np.uint8), Geometry()), path)
    user_error(excinfo, path, "non-empty 3D")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_nan_and_inf_refused(tmp_path, suffix):
    """ITK's NIfTI reader silently turns NaN/inf into 0: the NIfTI cases check the raw data."""
    array = np.ones((4, 5, 6), np.float32)
    array[1, 2, 3] = np.nan
    array[2, 3, 4] = np.inf
    array[3, 4, 5] = -np.inf
    path = tmp_path / f"nan{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    with pytest.raises(InputError) as excinfo:
        read_volume(path)
    user_error(excinfo, path, "3 voxels are NaN or infinite")


def test_nan_in_float64_nifti(tmp_path):
    array = np.zeros((3, 4, 5), np.float64)
    array[0, 0, 0] = np.nan
    path = tmp_path / "nan64.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    with pytest.raises(InputError) as excinfo:
        read_volume(path)
    user_error(excinfo, path, "1 voxels are NaN or infinite")


def test_finite_float_nifti_is_read(tmp_path):
    array = np.random.default_rng(1).normal(size=(5, 6, 7)).astype(np.float32)
    path = tmp_path / "float.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    np.testing.assert_array_equal(read_volume(path).array, array)


def test_2d_image_refused(tmp_path):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.int16)), str(path))
    with pytest.raises(InputError) as excinfo:
        read_volume(path)
    user_error(excinfo, path, "2D image", "expected a 3D volume")


def test_single_slice_3d_is_accepted(tmp_path):
    path = tmp_path / "one_slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((1, 5, 6), np.int16)), str(path))
    assert read_volume(path).shape == (1, 5, 6)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_4d_with_three_time_points_refused(tmp_path, suffix):
    image = small_image()
    path = tmp_path / f"series{suffix}"
    sitk.WriteImage(sitk.JoinSeries([image, image, image]), str(path))
    with pytest.raises(InputError) as excinfo:
        read_volume(path)
    user_error(excinfo, path, "4D image", "expected a 3D volume")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_4d_with_one_time_point_is_3d(tmp_path, suffix):
    image = small_image()
    path = tmp_path / f"one_time_point{suffix}"
    sitk.WriteImage(sitk.JoinSeries([image]), str(path))
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))
    assert volume.array.dtype == np.int16
    assert_same_geometry(volume.geometry, Geometry.of_image(image))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_rgb_image_refused(tmp_path, suffix):
    rgb = np.random.default_rng(0).integers(0, 255, (4, 5, 6, 3)).astype(np.uint8)
    path = tmp_path / f"rgb{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    with pytest.raises(InputError) as excinfo:
        read_volume(path)
    user_error(excinfo, path, "3 components per voxel")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(InputError) as excinfo:
        read_volume(tmp_path)
    user_error(excinfo, tmp_path, "no DICOM series")


def test_folder_of_corrupt_dicom_files(tmp_path):
    rng = np.random.default_rng(0)
    for index in range(3):
        (tmp_path / f"slice_{index}.dcm").write_bytes(rng.bytes(2048))
    with pytest.raises(InputError) as excinfo:
        read_volume(tmp_path)
    user_error(excinfo, tmp_path, "no DICOM series", "3 .dcm files are corrupt or not DICOM")


def test_truncated_metaimage(tmp_path):
    path = tmp_path / "cut.mha"
    sitk.WriteImage(small_image(), str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(InputError) as excinfo:
        read_volume(path)
    message = user_error(excinfo, path, "corrupt or truncated")
    assert "No such file" not in message  # ITK's stale errno, not the cause


# --- writing ------------------------------------------------------------------------------


def test_write_refuses_existing_file(tmp_path):
    path = tmp_path / "out.nii.gz"
    write_volume(small_volume(), path)
    before = path.read_bytes()
    with pytest.raises(OutputExistsError) as excinfo:
        write_volume(small_volume(np.uint8), path)
    user_error(excinfo, path, "refusing to overwrite")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


def test_write_overwrite_replaces(tmp_path):
    path = tmp_path / "out.nrrd"
    write_volume(small_volume(), path)
    replacement = Volume(np.full((3, 4, 5), 7, np.uint8), Geometry(spacing=(2.0, 2.0, 2.0)))
    assert write_volume(replacement, path, overwrite=True) == path
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, replacement.array)
    assert back.array.dtype == np.uint8
    assert_same_geometry(back.geometry, replacement.geometry)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nrrd"]


def test_write_to_missing_folder(tmp_path):
    folder = tmp_path / "missing"
    with pytest.raises(InputError) as excinfo:
        write_volume(small_volume(), folder / "out.nii.gz")
    user_error(excinfo, folder, "does not exist")
    assert not folder.exists()


def test_write_onto_a_folder(tmp_path):
    path = tmp_path / "taken.nii.gz"
    path.mkdir()
    with pytest.raises(InputError) as excinfo:
        write_volume(small_volume(), path, overwrite=True)
    user_error(excinfo, path, "is a folder")
    assert path.is_dir() and list(path.iterdir()) == []


def test_write_unsupported_format(tmp_path):
    path = tmp_path / "out.h5"
    with pytest.raises(InputError) as excinfo:
        write_volume(small_volume(), path)
    user_error(excinfo, path, "cannot write this format")
    assert not path.exists()


def test_write_refuses_non_3d_and_bad_geometry(tmp_path):
    with pytest.raises(InputError) as excinfo:
        write_volume(Volume(np.zeros((4, 5), np.uint8), Geometry()), tmp_path / "flat.nii.gz")
    user_error(excinfo, tmp_path / "flat.nii.gz", "3D array")
    with pytest.raises(InputError) as excinfo:
        write_volume(Volume(np.zeros((3, 4, 5), np.uint8), Geometry(spacing=(1.0, 0.0, 1.0))), tmp_path / "g.nrrd")
    user_error(excinfo, tmp_path / "g.nrrd", "invalid geometry")
    with pytest.raises(InputError) as excinfo:
        write_volume(Volume(np.zeros((3, 4, 5), np.complex64), Geometry()), tmp_path / "c.nrrd")
    user_error(excinfo, tmp_path / "c.nrrd", "complex64")
    assert list(tmp_path.iterdir()) == []


def test_written_file_permissions_follow_umask(tmp_path):
    path = write_volume(small_volume(), tmp_path / "shared.nii.gz")
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_unicode_file_name_round_trip(tmp_path, suffix):
    volume = small_volume(np.float32)
    path = tmp_path / f"scan_é漢{suffix}"
    write_volume(volume, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, volume.array)
    assert_same_geometry(back.geometry, volume.geometry)


# --- atomicity ----------------------------------------------------------------------------


def test_no_temporary_left_after_success(tmp_path):
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        write_volume(small_volume(), tmp_path / f"out{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mha", "out.nii", "out.nii.gz", "out.nrrd"]


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_no_temporary_left_after_failure(tmp_path, monkeypatch, failure):
    existing = tmp_path / "kept.nii.gz"
    write_volume(small_volume(), existing)
    before = existing.read_bytes()

    def failing_write(image, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")  # a writer that dies halfway
        raise failure("disk on fire")

    monkeypatch.setattr(sitk, "WriteImage", failing_write)
    expected = InputError if failure is RuntimeError else failure
    for target, overwrite in ((tmp_path / "new.nii.gz", False), (existing, True)):
        with pytest.raises(expected) as excinfo:
            write_volume(small_volume(np.uint8), target, overwrite=overwrite)
        if expected is InputError:
            user_error(excinfo, target, "cannot write it", "disk on fire")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.nii.gz"]
        assert existing.read_bytes() == before


# --- grids --------------------------------------------------------------------------------


def test_check_same_grid_shape_mismatch():
    image = small_volume()
    label = Volume(np.zeros((6, 7, 9), np.uint8), image.geometry)
    with pytest.raises(InputError) as excinfo:
        check_same_grid(image, label, "case_01.nii.gz")
    user_error(excinfo, "case_01.nii.gz", "label shape (6, 7, 9)", "(6, 7, 8)")


@pytest.mark.parametrize(
    "change",
    [{"spacing": (0.5, 0.75, 2.5)}, {"origin": (-10.0, 20.5, 4.25)}, {"direction": (-1, 0, 0, 0, 1, 0, 0, 0, 1)}],
)
def test_check_same_grid_geometry_mismatch(change):
    image = small_volume()
    geometry = Geometry(**{**image.geometry.__dict__, **change})
    label = Volume(np.zeros(image.shape, np.uint8), geometry)
    with pytest.raises(InputError) as excinfo:
        check_same_grid(image, label, "case_01.nii.gz")
    user_error(excinfo, "case_01.nii.gz", "geometry")


def test_check_same_grid_tolerates_rounding():
    image = small_volume()
    nudged = Geometry(
        tuple(s + 1e-6 for s in image.geometry.spacing), tuple(o - 1e-6 for o in image.geometry.origin)
    )
    check_same_grid(image, Volume(np.zeros(image.shape, np.uint8), nudged), "label")
