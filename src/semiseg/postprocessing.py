"""Post-processing of label maps shared by the LA protocol's evaluation and BCP's pseudo-labels."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_component(labels: np.ndarray) -> np.ndarray:
    """Keep, for each foreground class, only its largest 26-connected component (what the papers'
    getLargestCC does with skimage.measure.label's default full connectivity)."""
    labels = np.asarray(labels)
    out = np.zeros_like(labels)
    structure = np.ones((3,) * labels.ndim, dtype=bool)
    for value in np.unique(labels):
        if value == 0:
            continue
        components, count = ndimage.label(labels == value, structure=structure)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        out[components == int(sizes.argmax())] = value
    return out
