"""CT display windows (level and width in Hounsfield units) and telling a CT from other scans (no Qt here).

A scan is a CT when its metadata says so (`modality`), else when its intensities are in HU: the
same test as the model/scan mismatch warnings (air at about -1000 HU puts the 0.5th percentile far
below zero; MR intensities are never that negative).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from semiseg.compatibility import CT_LOW_PERCENTILE_BELOW

# (level, width) in HU: the usual radiology presets.
CT_WINDOWS = {"soft tissue": (40.0, 400.0), "bone": (400.0, 1800.0), "lung": (-600.0, 1500.0)}
DEFAULT_CT_WINDOW = "soft tissue"
SAMPLED_VOXELS = 1_000_000


def window_limits(name: str) -> tuple[float, float]:
    """napari contrast limits (low, high) of a CT window."""
    level, width = CT_WINDOWS[name]
    return level - width / 2, level + width / 2


def window_of(limits) -> str | None:
    """The preset whose limits these are, if any."""
    return next((name for name in CT_WINDOWS if np.allclose(limits, window_limits(name))), None)


def is_ct(array: np.ndarray, metadata: Mapping[str, Any] | None = None) -> bool:
    modality = (metadata or {}).get("modality")
    if modality:
        return str(modality).upper() == "CT"
    array = np.asarray(array)
    step = max(1, int(round((array.size / SAMPLED_VOXELS) ** (1 / array.ndim)))) if array.ndim else 1
    sample = array[(slice(None, None, step),) * array.ndim]  # a strided view: no copy of a large scan
    return sample.size > 0 and float(np.percentile(sample, 0.5)) < CT_LOW_PERCENTILE_BELOW
