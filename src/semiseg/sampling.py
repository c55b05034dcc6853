"""Training patches: foreground-oversampled crops with MONAI augmentations, or (augmentation
"ua-mt") the UA-MT code's uniform random crop with a random quarter turn and flip in the axial plane.

Every sample is a pure function of (seed, sample index): the index is the global sample counter,
so a resumed run, any number of loader workers, or any number of DDP ranks draw exactly the
patches an uninterrupted single-process run would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.data import set_track_meta
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from torch.utils.data import Dataset, Sampler

from semiseg.errors import InputError
from semiseg.labels import IGNORE_INDEX

FOREGROUND_RATIO = 0.33  # nnU-Net's share of patches forced to contain foreground
FOREGROUND_POINTS = 10_000  # stored candidate centres per class and case
AUGMENTATIONS = ("default", "ua-mt")


@dataclass
class Volumes:
    """Preprocessed arrays (z, y, x), or (channel, z, y, x) for scans of several channels, with labels
    (z, y, x) for the labeled pool."""

    images: list[np.ndarray]
    labels: list[np.ndarray] | None = None


def _spatial(keys: list[str], patch_size: tuple[int, int, int]) -> Compose:
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    # Quarter turns only in a plane where the patch is square, so the patch keeps its shape.
    square = [(a, b) for a, b in ((1, 2), (0, 2), (0, 1)) if patch_size[a] == patch_size[b]]
    turns = [RandRotate90d(keys, prob=0.5, spatial_axes=square[0])] if square else []
    return Compose(
        [
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys, prob=0.5, spatial_axis=2),
            *turns,
            RandAffined(
                keys,
                prob=0.2,
                rotate_range=(0.26, 0.26, 0.26),  # +-15 degrees
                scale_range=(0.1, 0.1, 0.1),
                mode=modes,
                padding_mode="zeros",
            ),
        ]
    )


def _strong_intensity() -> Compose:
    """Intensity perturbations for the strong view; spatially aligned with the weak one."""
    return Compose(
        [
            RandGaussianNoised("image", prob=0.5, std=0.1),
            RandGaussianSmoothd("image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
            RandScaleIntensityd("image", prob=0.5, factors=0.25),
            RandShiftIntensityd("image", prob=0.5, offsets=0.25),
            RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5)),
        ]
    )


class PatchDataset(Dataset):
    """Index i -> one augmented patch drawn with a generator seeded by (seed, i)."""

    def __init__(self, volumes: Volumes, patch_size: tuple[int, int, int], seed: int, augment: bool = True, strong_view: bool = True,
                 augmentation: str = "default"):
        if augmentation not in AUGMENTATIONS:
            raise InputError(f"unknown augmentation '{augmentation}' (use {', '.join(AUGMENTATIONS)})")
        self.volumes = volumes
        self.strong_view = strong_view  # the strong view is ~half of a patch's CPU cost: only for methods that read it
        self.patch_size = np.array(patch_size)
        self.seed = seed
        self.ua_mt = augment and augmentation == "ua-mt"
        keys = ["image", "label"] if volumes.labels is not None else ["image"]
        self.spatial = _spatial(keys, tuple(patch_size)) if augment and not self.ua_mt else None
        self.strong = _strong_intensity()
        with_foreground = volumes.labels is not None and not self.ua_mt  # UA-MT crops uniformly
        self.foreground = [_foreground_points(label, seed) for label in volumes.labels] if with_foreground else None

    def __len__(self) -> int:
        return 2**62  # indices are sample counters, never exhausted

    def _strong_channel(self, channel: torch.Tensor, seed: int) -> torch.Tensor:
        """One channel's strong view: each channel draws its own perturbations (T2 and ADC are not one contrast)."""
        self.strong.set_random_state(seed=seed)
        return torch.as_tensor(np.asarray(self.strong({"image": channel[None].clone()})["image"]))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        set_track_meta(False)  # plain tensors: MONAI's metadata tracking triples the cost of a patch
        rng = np.random.default_rng([self.seed, index])
        case = int(rng.integers(len(self.volumes.images)))
        image = self.volumes.images[case]
        label = self.volumes.labels[case] if self.volumes.labels is not None else None
        centre = None
        if self.foreground is not None and rng.random() < FOREGROUND_RATIO:
            classes = [points for points in self.foreground[case] if len(points)]
            if classes:
                points = classes[int(rng.integers(len(classes)))]
                centre = points[int(rng.integers(len(points)))]
        if self.ua_mt:
            sample = _ua_mt_patch({"image": image, "label": label}, self.patch_size, rng)
        else:
            corner = _corner(image.shape[-3:], self.patch_size, centre, rng)
            sample = {key: _crop(array, self.patch_size, corner) for key, array in (("image", image), ("label", label)) if array is not None}
        sample = {key: (array if array.ndim == 4 else array[None]).astype(np.float32) for key, array in sample.items()}
        transform_seed = int(rng.integers(2**31))
        if self.spatial is not None:
            self.spatial.set_random_state(seed=transform_seed)
            sample = self.spatial(sample)
        sample = {k: torch.as_tensor(np.asarray(v)) for k, v in sample.items()}
        if self.strong_view:  # its own seed: skipping it leaves every other draw unchanged
            sample["image_strong"] = torch.cat([self._strong_channel(channel, transform_seed + 1 + index)
                                                for index, channel in enumerate(sample["image"])])
        if "label" in sample:
            sample["label"] = sample["label"].round().long()
        return sample


def _ua_mt_patch(arrays: dict[str, np.ndarray | None], patch: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """UA-MT's RandomRotFlip then RandomCrop: the volume turned by k quarter turns in the axial
    (y, x) plane and flipped along y or x, then a uniformly placed crop. Cropping first (the patch's
    y and x sides swapped for odd k) and turning the crop draws the same patches at a patch's cost."""
    turns, flip_axis = int(rng.integers(4)), int(rng.integers(1, 3))
    source_patch = patch[[0, 2, 1]] if turns % 2 else patch
    shape = next(a for a in arrays.values() if a is not None).shape[-3:]
    corner = _corner(shape, source_patch, None, rng)
    # Axes counted from the end: an image of several channels has one more in front.
    return {key: np.ascontiguousarray(np.flip(np.rot90(_crop(array, source_patch, corner), turns, axes=(-2, -1)), flip_axis - 3))
            for key, array in arrays.items() if array is not None}


def _foreground_points(label: np.ndarray, seed: int) -> list[np.ndarray]:
    """Up to FOREGROUND_POINTS voxel coordinates per foreground class (unannotated voxels are none)."""
    rng = np.random.default_rng(seed)
    points = []
    for value in np.unique(label):
        if value in (0, IGNORE_INDEX):
            continue
        coords = np.argwhere(label == value)
        if len(coords) > FOREGROUND_POINTS:
            coords = coords[rng.choice(len(coords), FOREGROUND_POINTS, replace=False)]
        points.append(coords)
    return points


def _corner(shape, patch: np.ndarray, centre, rng: np.random.Generator) -> np.ndarray:
    """Patch corner in the (padded) array: random, or placing `centre` mid-patch."""
    padded = np.maximum(np.array(shape), patch)
    high = padded - patch
    if centre is None:
        return np.array([int(rng.integers(h + 1)) for h in high])
    offset = (padded - np.array(shape)) // 2
    return np.clip(np.asarray(centre) + offset - patch // 2, 0, high)


def _crop(array: np.ndarray, patch: np.ndarray, corner: np.ndarray) -> np.ndarray:
    """Crop `patch` voxels at `corner` from the last three axes, zero-padding (centred) arrays smaller than the patch."""
    pad = np.maximum(patch - np.array(array.shape[-3:]), 0)
    if pad.any():
        array = np.pad(array, [(0, 0)] * (array.ndim - 3) + [(p // 2, p - p // 2) for p in pad])
    return np.ascontiguousarray(array[(Ellipsis, *(slice(int(c), int(c + p)) for c, p in zip(corner, patch)))])


class IterationBatches(Sampler[list[int]]):
    """Batch sampler: iteration t on rank r gets sample indices t*B*W + r*B + [0, B).

    B is the per-rank batch and W the number of ranks, so the global batch of W ranks equals one
    process's batch of B*W, and a run resumed at iteration t continues the same sequence.
    """

    def __init__(self, start: int, stop: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.start, self.stop, self.batch_size = start, stop, batch_size
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        for iteration in range(self.start, self.stop):
            first = (iteration * self.world_size + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)
