"""Label values as users have them, and the contiguous channels the networks predict.

A dataset may label its classes 0, 1, 2, 5 (or 0, 10, 20): the networks predict one channel per
class, so the plan records the label value of each channel (`Plan.label_values`) and labels are
mapped to channels on the way in and back to values on the way out. An ignore value (nnU-Net's
`ignore` label, e.g. 255 for unannotated voxels of a partially annotated scan) is no class: its
voxels carry IGNORE_INDEX in the preprocessed label arrays and training batches, and they are left
out of the supervised loss and the metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from semiseg.errors import InputError

# The channel index of ignored voxels in preprocessed (uint8) label arrays and training batches.
IGNORE_INDEX = 255
# Channels 0..254: a class count that leaves IGNORE_INDEX free in a uint8 label array.
MAX_CLASSES = IGNORE_INDEX


def check_label_mapping(values: Sequence[int], ignore_label: int | None) -> None:
    """Refuse a class list the channels cannot hold, or an ignore value that is also a class."""
    if len(values) > MAX_CLASSES:
        raise InputError(f"{len(values)} classes: semiseg trains at most {MAX_CLASSES} classes (background included)")
    negative = [v for v in [*values, ignore_label] if v is not None and v < 0]
    if negative:
        raise InputError(f"label value {negative[0]}: label values are not negative")
    if ignore_label is not None and ignore_label in values:
        raise InputError(f"ignore label {ignore_label} is also a class ({', '.join(map(str, values))}); give a value no class uses")


def values_to_channels(label: np.ndarray, values: Sequence[int], ignore_label: int | None) -> np.ndarray:
    """A label map of class values -> uint8 channel indices (the ignore value -> IGNORE_INDEX).
    Every value must be a class or the ignore value (checked before, with the file named)."""
    if list(values) == list(range(len(values))) and ignore_label is None:
        return label.astype(np.uint8)  # channel i is value i: the mapping of plans without one
    table = np.asarray([*values, *([] if ignore_label is None else [ignore_label])], dtype=np.int64)
    order = np.argsort(table)
    channels = np.append(np.arange(len(values)), IGNORE_INDEX)[order].astype(np.uint8)
    return channels[np.searchsorted(table[order], label)]


def channels_to_values(channels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Channel indices -> class values, in the smallest unsigned type that holds them (uint8 up to
    255), so that a prediction holds the user's own label values."""
    table = np.asarray(values)
    return table.astype(np.min_scalar_type(int(table.max())))[channels]
