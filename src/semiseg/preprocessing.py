"""The preprocessing plan: computed once from the training data, saved with the model, applied to
every scan at training and inference, and undone on the way back to a scan's own grid."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from semiseg.datasets import Case, Dataset, Split
from semiseg.errors import InputError
from semiseg.io import Geometry, Volume, check_same_grid, read_header, read_scan, read_volume
from semiseg.labels import channels_to_values, check_label_mapping, values_to_channels

CT_PERCENTILES = (0.5, 99.5)
# The raw intensity range recorded for the mismatch warnings: robust low end, median, robust high end.
TRAINING_PERCENTILES = (0.5, 50.0, 99.5)
VOXELS_SAMPLED_PER_SCAN = 20_000
# nnU-Net's planning rules: an axis whose spacing is over 3x the others' (and whose voxels are under a
# third of theirs) is a low-resolution axis; an axis is pooled, and convolved 3 wide, only while its
# spacing is within 2x the finest axis's.
ANISOTROPY = 3.0
POOLING_RATIO = 2.0
LOW_RESOLUTION_PERCENTILE = 10
_TRAINING_STATISTICS = ("training_percentiles", "training_spacing_range")
# Fields a plan holds only when set (an older plan without them is written back as it was read).
_OPTIONAL = (*_TRAINING_STATISTICS, "label_values", "ignore_label", "low_resolution_axis", "pooling", "kernel_sizes")
# Fields of multi-channel plans only: written when set and, unlike the above, part of the cache key.
_CHANNEL_FIELDS = ("channel_names", "channel_normalization")
_AXES = "zyx"


@dataclass
class Plan:
    class_names: dict[int, str]
    patch_size: tuple[int, int, int]  # (z, y, x) voxels on the target grid
    target_spacing: tuple[float, float, float] | None  # (z, y, x) mm; None keeps each scan's grid
    normalization: str  # "zscore" (per scan, MR) or "ct" (global clip + z-score)
    intensity_clip: tuple[float, float] | None = None
    intensity_mean: float = 0.0
    intensity_std: float = 1.0
    # What the training scans looked like, for warnings only (None in plans written before they were
    # recorded): raw-intensity percentiles TRAINING_PERCENTILES pooled over the training scans, and
    # the smallest and largest (z, y, x) spacing in mm among them.
    training_percentiles: tuple[float, float, float] | None = None
    training_spacing_range: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    # The label value each output channel stands for, e.g. (0, 1, 2, 5); None in plans written
    # before the mapping, whose channel i is label value i.
    label_values: tuple[int, ...] | None = None
    # The label value of unannotated voxels (nnU-Net's "ignore"), left out of the loss and the
    # metrics; None: every voxel of a label is annotated.
    ignore_label: int | None = None
    # Anisotropic data, planned as nnU-Net plans it: the low-resolution axis (0 = z) whose target
    # spacing is the 10th percentile of the training spacings rather than the median; and for the
    # networks that take them, the (z, y, x) strides of each downsampling and the kernel sizes of
    # each stage (None: the network pools every axis alike).
    low_resolution_axis: int | None = None
    pooling: tuple[tuple[int, int, int], ...] | None = None
    kernel_sizes: tuple[tuple[int, int, int], ...] | None = None
    # Scans of several channels (multi-parametric MRI): their names in input order (None: one
    # channel), and the normalisation of channels 1, 2, ... as {"normalization", "intensity_clip",
    # "intensity_mean", "intensity_std"}; channel 0's is the fields above.
    channel_names: tuple[str, ...] | None = None
    channel_normalization: tuple[dict, ...] | None = None

    @property
    def in_channels(self) -> int:
        return len(self.channel_names) if self.channel_names else 1

    def describe_channels(self) -> str:
        """The input channels and their normalisation in one line (`semiseg info`)."""
        if not self.channel_names:
            return f"input: one channel ({self.normalization} normalisation)"
        kinds = [self.normalization] + [n["normalization"] for n in self.channel_normalization or ()]
        return "input: " + ", ".join(f"{i}={name} ({kind})" for i, (name, kind) in enumerate(zip(self.channel_names, kinds)))

    def check_channels(self, volume: Volume, where: str) -> None:
        """Refuse a scan whose channel count is not the model's, naming what is missing."""
        if volume.channels == self.in_channels:
            return
        names = self.channel_names or ("image",)
        if volume.channels < self.in_channels:
            missing = ", ".join(f"{name} (channel {i}, file _{i:04d})" for i, name in enumerate(names) if i >= volume.channels)
            raise InputError(f"{where}: {volume.channels} channel(s), but this model takes {self.in_channels} "
                             f"({', '.join(names)}); missing: {missing}")
        raise InputError(f"{where}: {volume.channels} channels, but this model takes {self.in_channels} ({', '.join(names)})")

    @property
    def channel_values(self) -> tuple[int, ...]:
        """The label value of each output channel."""
        return self.label_values if self.label_values is not None else tuple(range(max(self.class_names) + 1))

    @property
    def num_classes(self) -> int:
        return len(self.channel_values)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["class_names"] = {str(k): v for k, v in self.class_names.items()}
        for key in (*_OPTIONAL, *_CHANNEL_FIELDS):
            if data[key] is None:
                del data[key]  # an older plan is written back as it was read
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        data = dict(data)
        data["class_names"] = {int(k): v for k, v in data["class_names"].items()}
        data["patch_size"] = tuple(data["patch_size"])
        for key in ("target_spacing", "intensity_clip", "training_percentiles", "label_values", "channel_names", "channel_normalization"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        for key in ("training_spacing_range", "pooling", "kernel_sizes"):
            if data.get(key) is not None:
                data[key] = tuple(tuple(row) for row in data[key])
        return cls(**data)

    def key(self) -> str:
        """Identifies what preprocessing produced a cached image (the patch size, classes, label
        mapping and the training statistics kept for warnings do not matter)."""
        ignored = ("patch_size", "class_names", *_OPTIONAL)
        fields = {k: v for k, v in self.to_dict().items() if k not in ignored}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    # Images ---------------------------------------------------------------------------------
    def normalize(self, array: np.ndarray) -> np.ndarray:
        """A (z, y, x) scan, or (channel, z, y, x), each channel by its own rule."""
        if array.ndim == 4:
            return np.stack([_normalized(channel, self._channel_rule(i)) for i, channel in enumerate(array)])
        return _normalized(array, self._channel_rule(0))

    def _channel_rule(self, index: int) -> dict:
        if index == 0:
            return {"normalization": self.normalization, "intensity_clip": self.intensity_clip,
                    "intensity_mean": self.intensity_mean, "intensity_std": self.intensity_std}
        return self.channel_normalization[index - 1]  # type: ignore[index]

    def target_grid(self, geometry: Geometry, shape: tuple[int, int, int]) -> tuple[tuple[float, ...], tuple[int, ...]] | None:
        """(spacing xyz, size xyz) of the resampled grid, or None when the scan is already on it."""
        if self.target_spacing is None:
            return None
        target_xyz = tuple(reversed(self.target_spacing))
        if np.allclose(geometry.spacing, target_xyz, rtol=0.01):
            return None
        size_xyz = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(reversed(shape), geometry.spacing, target_xyz))
        return target_xyz, size_xyz

    def preprocess_image(self, volume: Volume) -> np.ndarray:
        """Float32 (z, y, x), or (channel, z, y, x), on the target grid, normalised."""
        return self.normalize(self.resample_image(volume))

    def resample_image(self, volume: Volume) -> np.ndarray:
        """The scan's intensities on the target grid (not normalised)."""
        return _resample(volume, self.target_grid(volume.geometry, volume.shape), sitk.sitkLinear)

    def preprocess_label(self, label: Volume, image: Volume) -> np.ndarray:
        """Uint8 channel indices (z, y, x) on the target grid; ignored voxels hold IGNORE_INDEX."""
        resampled = _resample(label, self.target_grid(image.geometry, image.shape), sitk.sitkNearestNeighbor)
        return values_to_channels(resampled, self.channel_values, self.ignore_label)

    def describe_geometry(self) -> str:
        """The spacing and pooling choices in one line (`semiseg info`)."""
        spacing = "as each scan" if self.target_spacing is None else " x ".join(f"{v:g}" for v in self.target_spacing) + " mm (z, y, x)"
        low = "none" if self.low_resolution_axis is None else f"{_AXES[self.low_resolution_axis]} (its 10th-percentile spacing)"
        pooling = "2x2x2 at every stage" if self.pooling is None else ", ".join("x".join(map(str, s)) for s in self.pooling) + " (z, y, x strides)"
        return f"target spacing: {spacing}  low-resolution axis: {low}  pooling per stage: {pooling}"

    def label_map(self, channels: np.ndarray) -> np.ndarray:
        """Predicted channel indices -> the label values the user's labels use."""
        return channels_to_values(channels, self.channel_values)

    def restore(self, probabilities: np.ndarray, source: Volume) -> np.ndarray:
        """Class probabilities (C, z, y, x) on the target grid -> on the source scan's grid."""
        grid = self.target_grid(source.geometry, source.shape)
        if grid is None:
            return probabilities
        spacing_xyz, _ = grid
        reference = sitk.Image([int(n) for n in reversed(source.shape)], sitk.sitkFloat32)
        source.geometry.apply_to(reference)
        restored = []
        for channel in probabilities:
            image = sitk.GetImageFromArray(channel.astype(np.float32))
            Geometry(spacing_xyz, source.geometry.origin, source.geometry.direction).apply_to(image)
            restored.append(sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0)))
        return np.stack(restored)


def _normalized(array: np.ndarray, rule: dict) -> np.ndarray:
    array = array.astype(np.float32, copy=False)
    if rule["normalization"] == "ct":
        lo, hi = rule["intensity_clip"]
        return (np.clip(array, lo, hi) - rule["intensity_mean"]) / max(rule["intensity_std"], 1e-8)
    return (array - array.mean()) / max(float(array.std()), 1e-8)


def _resample(volume: Volume, grid, interpolator) -> np.ndarray:
    if grid is None:
        return volume.array
    if volume.channels > 1:
        return np.stack([_resample(volume.channel(i), grid, interpolator) for i in range(volume.channels)])
    spacing_xyz, size_xyz = grid
    image = sitk.GetImageFromArray(volume.array)
    volume.geometry.apply_to(image)
    resampled = sitk.Resample(
        image, [int(s) for s in size_xyz], sitk.Transform(), interpolator, volume.geometry.origin, spacing_xyz, volume.geometry.direction, 0
    )
    return sitk.GetArrayFromImage(resampled)


# Reading cases ----------------------------------------------------------------------------------

def read_case(case: Case) -> tuple[Volume, Volume | None]:
    """The case's image (all its channels) and label volumes, the label checked against the image's grid."""
    image = read_scan(case.image_files)
    if case.label is None:
        return image, None
    label = read_volume(case.label, "label")
    if not np.issubdtype(label.array.dtype, np.integer):
        rounded = np.rint(label.array)
        if not np.array_equal(rounded, label.array):
            raise InputError(f"{case.label}: label values are not integers")
        label = Volume(rounded.astype(np.int32), label.geometry)
    check_same_grid(image, label, case.label)
    return image, label


def check_label_values(label: np.ndarray, class_names: dict[int, str], where: str, ignore_label: int | None = None) -> None:
    values = np.unique(label)
    unknown = sorted(set(values.tolist()) - set(class_names) - {ignore_label})
    if unknown:
        ignored = f" (ignore label {ignore_label})" if ignore_label is not None else ""
        raise InputError(
            f"{where}: label values {unknown[:5]} are outside the declared classes {sorted(class_names)}{ignored}"
        )


# Computing the plan -----------------------------------------------------------------------------

def compute_plan(
    dataset: Dataset,
    split: Split,
    size_multiple: int,
    patch_size: tuple[int, int, int] | None = None,
    max_patch: tuple[int, int, int] = (96, 160, 160),
    ignore_label: int | None = None,
    per_axis_pooling: bool = False,
) -> Plan:
    """Target spacing, intensity normalisation, patch size, classes and their channels from the
    training cases; `ignore_label` is the value of unannotated voxels (None: no such value). With
    `per_axis_pooling` (a network that takes per-axis strides), the log2(size_multiple)
    downsamplings pool each axis by nnU-Net's rule and the patch is a multiple of each axis's pooling."""
    by_id = {c.case_id: c for c in dataset.cases}
    train_ids = split.labeled + split.unlabeled
    headers = [_header(by_id[i]) for i in train_ids]
    spacings = np.array([g.spacing_zyx for g, _ in headers])
    target, low_resolution_axis = full_resolution_spacing(spacings, np.array([shape for _, shape in headers]))
    uniform = np.allclose(spacings, spacings[0], rtol=0.01)
    if uniform:  # no resampling at all
        target, low_resolution_axis = tuple(float(v) for v in np.median(spacings, axis=0)), None
    shapes = np.array([np.array(shape) * np.array(g.spacing_zyx) / np.array(target) for g, shape in headers])
    pooling = kernel_sizes = None
    multiples = (size_multiple,) * 3
    if per_axis_pooling:
        pooling, kernel_sizes = pooling_schedule(target, int(np.log2(size_multiple)))
        multiples = tuple(int(np.prod([stage[axis] for stage in pooling])) for axis in range(3))

    class_names = dict(dataset.class_names) or _class_names_from_labels([by_id[i] for i in split.labeled], ignore_label)
    if 0 not in class_names:
        class_names[0] = "background"
    label_values = tuple(sorted(class_names))
    check_label_mapping(label_values, ignore_label)
    if patch_size is None:
        median = np.median(shapes[: len(split.labeled)], axis=0)
        patch_size = tuple(int(max(k, min(cap, (m // k) * k))) for m, cap, k in zip(median, max_patch, multiples))
    elif len(patch_size) != 3 or any(int(p) < 1 for p in patch_size):
        raise InputError(f"patch size {tuple(patch_size)}: give three positive sizes (z y x)")
    elif any(p % k for p, k in zip(patch_size, multiples)):
        sides = f"{multiples[0]}" if len(set(multiples)) == 1 else " x ".join(map(str, multiples)) + " (z, y, x)"
        raise InputError(f"patch size {patch_size} must be a multiple of {sides} on every side for this network")

    plan = Plan(class_names, tuple(int(p) for p in patch_size), None if uniform else target, "zscore",
                label_values=label_values, ignore_label=ignore_label, low_resolution_axis=low_resolution_axis,
                pooling=pooling, kernel_sizes=kernel_sizes)
    samples = training_intensity_samples([by_id[i] for i in train_ids])
    # The mismatch warnings compare a scan's first channel with the training scans'.
    plan.training_percentiles = tuple(float(v) for v in np.percentile(samples[0], TRAINING_PERCENTILES))
    plan.training_spacing_range = spacing_range(spacings)
    names = channel_names(dataset, len(samples))
    rules = [channel_rule(values, dataset.modality == "CT" if len(samples) == 1 else name == "CT") for values, name in zip(samples, names)]
    plan.normalization, plan.intensity_clip, plan.intensity_mean, plan.intensity_std = (
        rules[0]["normalization"], rules[0]["intensity_clip"], rules[0]["intensity_mean"], rules[0]["intensity_std"])
    if len(samples) > 1:
        plan.channel_names, plan.channel_normalization = names, tuple(rules[1:])
    return plan


def channel_names(dataset: Dataset, channels: int) -> tuple[str, ...]:
    """The dataset's names for its channels, "channel i" where it names none."""
    named = dataset.channel_names if len(dataset.channel_names) == channels else ()
    return named or tuple(f"channel {i}" for i in range(channels))


def channel_rule(samples: np.ndarray, ct: bool) -> dict:
    """A channel's normalisation: z-score per scan, or for CT (as 3D-CPS does) a clip to the 0.5-99.5
    percentiles of all training voxels, unlabeled included, and their mean and sd."""
    if not ct:
        return {"normalization": "zscore", "intensity_clip": None, "intensity_mean": 0.0, "intensity_std": 1.0}
    lo, hi = np.percentile(samples, CT_PERCENTILES)
    clipped = np.clip(samples, lo, hi)
    return {"normalization": "ct", "intensity_clip": (float(lo), float(hi)),
            "intensity_mean": float(clipped.mean()), "intensity_std": float(clipped.std())}


def full_resolution_spacing(spacings_zyx: np.ndarray, shapes_zyx: np.ndarray) -> tuple[tuple[float, float, float], int | None]:
    """The target spacing of (N, 3) scan spacings and shapes, and its low-resolution axis (or None).

    The median of each axis; but when the coarsest axis's median spacing is over ANISOTROPY times
    the others' and its voxels under 1/ANISOTROPY of theirs (a 0.7 x 0.7 x 5 mm CT), that axis takes
    the 10th percentile of its spacings, never finer than the other axes: the thinner-sliced scans
    keep more of their detail than at the median, and the axis stays a coarse one (it is not
    resampled to the fine axes' spacing)."""
    target = np.median(spacings_zyx, axis=0).astype(float)
    axis = int(np.argmax(target))
    others = [a for a in range(3) if a != axis]
    median_shape = np.median(shapes_zyx, axis=0)
    if target[axis] > ANISOTROPY * target[others].max() and median_shape[axis] * ANISOTROPY < median_shape[others].min():
        target[axis] = max(float(np.percentile(spacings_zyx[:, axis], LOW_RESOLUTION_PERCENTILE)), float(target[others].max()))
        return tuple(float(v) for v in target), axis  # type: ignore[return-value]
    return tuple(float(v) for v in target), None  # type: ignore[return-value]


def pooling_schedule(spacing_zyx: tuple[float, float, float], downsamplings: int
                     ) -> tuple[tuple[tuple[int, int, int], ...], tuple[tuple[int, int, int], ...]]:
    """(z, y, x) strides of each downsampling and kernel sizes of each stage (one more), by nnU-Net's
    rule: an axis is pooled, and convolved 3 wide, only while its spacing is within POOLING_RATIO
    times the finest; a coarser axis keeps stride 1 and kernel 1 until the others have caught up."""
    spacing = np.asarray(spacing_zyx, dtype=float)
    strides, kernels = [], []
    for _ in range(downsamplings + 1):
        fine = spacing <= POOLING_RATIO * spacing.min()
        kernels.append(tuple(3 if f else 1 for f in fine))
        strides.append(tuple(2 if f else 1 for f in fine))
        spacing = np.where(fine, spacing * 2, spacing)
    return tuple(strides[:-1]), tuple(kernels)  # type: ignore[return-value]


def training_intensity_samples(cases: list[Case]) -> list[np.ndarray]:
    """Raw voxel values of each channel sampled from each case's image (at most VOXELS_SAMPLED_PER_SCAN
    per scan and channel), pooled over the cases: one array per channel."""
    per_case = []
    for case in cases:
        volume = read_scan(case.image_files)
        per_case.append([sample_voxels(volume.channel(i).array, case.case_id) for i in range(volume.channels)])
    counts = {len(channels) for channels in per_case}
    if len(counts) > 1:
        found = ", ".join(f"{case.case_id}: {len(channels)}" for case, channels in zip(cases, per_case))
        raise InputError(f"the training scans differ in their number of channels ({found}); every scan needs the same channels")
    return [np.concatenate(channel) for channel in zip(*per_case)]


def spacing_range(spacings_zyx: np.ndarray) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(smallest, largest) spacing on each (z, y, x) axis of an (N, 3) array of spacings."""
    return tuple(float(v) for v in spacings_zyx.min(axis=0)), tuple(float(v) for v in spacings_zyx.max(axis=0))  # type: ignore[return-value]


def _header(case: Case) -> tuple[Geometry, tuple[int, int, int]]:
    return read_header(case.image) or _header_by_reading(case)


def _header_by_reading(case: Case) -> tuple[Geometry, tuple[int, int, int]]:
    volume = read_scan(case.image_files)
    return volume.geometry, volume.shape


def sample_voxels(array: np.ndarray, seed_text: str) -> np.ndarray:
    flat = array.reshape(-1).astype(np.float32)
    if flat.size <= VOXELS_SAMPLED_PER_SCAN:
        return flat
    rng = np.random.default_rng(int(hashlib.sha256(seed_text.encode(errors="surrogateescape")).hexdigest()[:8], 16))
    return flat[rng.choice(flat.size, VOXELS_SAMPLED_PER_SCAN, replace=False)]


def _class_names_from_labels(cases: list[Case], ignore_label: int | None) -> dict[int, str]:
    values: set[int] = set()
    for case in cases:
        _, label = read_case(case)
        values |= set(np.unique(label.array).tolist())  # type: ignore[union-attr]
    return {v: ("background" if v == 0 else f"class {v}") for v in sorted(values - {ignore_label})}


# The on-disk cache of preprocessed arrays -------------------------------------------------------

def cache_root() -> Path:
    return Path(os.environ.get("SEMISEG_CACHE", Path.home() / ".cache" / "semiseg"))


def cached_case(case: Case, plan: Plan, with_label: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Preprocessed (image, label) of a case, memory-mapped from the cache, computed once."""
    # The token changes with the image file, the label file, the classes the label is checked
    # against and their channels: an edited label or a changed class list or mapping must not reuse
    # a stale cached label (channel i = value i without ignore, the mapping of older plans, adds nothing).
    identity = plan.channel_values == tuple(range(plan.num_classes)) and plan.ignore_label is None
    mapping = "" if identity else f"|{plan.channel_values}|{plan.ignore_label}"
    images = "|".join(_file_token(path) for path in case.image_files)
    token = hashlib.sha256(
        f"{images}|{_file_token(case.label)}|{sorted(plan.class_names)}{mapping}".encode(errors="surrogateescape")
    ).hexdigest()[:12]
    folder = cache_root() / "preprocessed" / plan.key()
    image_path = folder / f"{case.case_id}-{token}.image.npy"
    label_path = folder / f"{case.case_id}-{token}.label.npy"
    if not image_path.exists() or (with_label and not label_path.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        image, label = read_case(case)
        plan.check_channels(image, case.image)
        _save_atomic(image_path, plan.preprocess_image(image))
        if label is not None:
            check_label_values(label.array, plan.class_names, case.label or case.image, plan.ignore_label)
            _save_atomic(label_path, plan.preprocess_label(label, image))
    image_array = np.load(image_path, mmap_mode="r")
    label_array = np.load(label_path, mmap_mode="r") if with_label else None
    return image_array, label_array


def _file_token(path: str | None) -> str:
    if path is None:
        return "none"
    source = Path(path)
    try:
        stat = source.stat()
    except OSError as error:
        raise InputError(f"{source}: cannot read it ({error.strerror})") from None
    if source.is_dir():  # a DICOM series: its newest file and the number of files
        entries = [p.stat() for p in source.iterdir() if p.is_file()]
        return f"{source.resolve()}|{len(entries)}|{max((e.st_mtime_ns for e in entries), default=0)}|{sum(e.st_size for e in entries)}"
    return f"{source.resolve()}|{stat.st_mtime_ns}|{stat.st_size}"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array))
    os.replace(temporary, path)
