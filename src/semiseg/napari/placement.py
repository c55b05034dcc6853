"""Where a layer sits in napari's world, and which scan grid it is on (no Qt here).

World coordinates are physical coordinates: ITK's LPS millimetres, in napari's (z, y, x) axis
order. A scan is placed with napari's `affine` = spacing × direction cosines plus the origin, so
`layer.data_to_world(index)` is SimpleITK's `TransformIndexToPhysicalPoint(index)` reversed.
A layer without recorded geometry (e.g. made with napari's New Labels) belongs to the scan whose
shape and data-to-world transform it shares; it gets that scan's geometry, never a guessed one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from semiseg.errors import InputError
from semiseg.io import Geometry

TRANSFORM_KEYS = ("scale", "translate", "rotate", "shear", "affine")
# Two grids are the same when their transforms agree to this (mm, and unitless for directions).
GRID_TOLERANCE = 1e-4


def affine_zyx(geometry: Geometry) -> np.ndarray:
    """The 4x4 (z, y, x) data-to-world matrix of a geometry: napari's `affine` for its layer."""
    direction = np.asarray(geometry.direction, float).reshape(3, 3)
    linear_xyz = direction * np.asarray(geometry.spacing, float)  # column j: direction j times spacing j
    matrix = np.eye(4)
    matrix[:3, :3] = linear_xyz[::-1, ::-1]  # ITK (x, y, z) -> napari (z, y, x) on both sides
    matrix[:3, 3] = np.asarray(geometry.origin, float)[::-1]
    return matrix


def geometry_of_matrix(matrix: np.ndarray, name: str = "layer") -> Geometry:
    """The geometry a 4x4 (z, y, x) data-to-world matrix places a grid with (the inverse of affine_zyx)."""
    matrix = np.asarray(matrix, float)
    linear_xyz = matrix[:3, :3][::-1, ::-1]
    spacing = np.linalg.norm(linear_xyz, axis=0)
    if not np.all(np.isfinite(spacing) & (spacing > 0)):
        raise InputError(f"'{name}': its placement has no usable voxel spacing")
    direction = linear_xyz / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-6):
        raise InputError(f"'{name}': its placement shears the voxel grid, which a scan geometry cannot hold")
    return Geometry(tuple(float(s) for s in spacing), tuple(float(o) for o in matrix[:3, 3][::-1]),
                    tuple(float(d) for d in direction.ravel()))


def display_kwargs(geometry: Geometry) -> dict[str, Any]:
    """Layer attributes placing a volume physically."""
    return {"affine": affine_zyx(geometry).tolist()}


def placement_of(layer) -> dict[str, Any]:
    """A layer's full transform as layer attributes, for layers that must lie exactly on it."""
    return {"scale": list(layer.scale), "translate": list(layer.translate), "rotate": np.asarray(layer.rotate).tolist(),
            "shear": list(layer.shear), "affine": layer.affine.affine_matrix.tolist()}


def world_matrix(attributes: Mapping[str, Any]) -> np.ndarray:
    """The full data-to-world matrix of layer attributes (napari's scale/translate/rotate/shear, then affine)."""
    from napari.utils.transforms import Affine

    present = {k: attributes[k] for k in ("scale", "translate", "rotate", "shear") if attributes.get(k) is not None}
    physical = Affine(**present).affine_matrix
    affine = attributes.get("affine")
    if affine is None:
        return physical
    affine = affine.affine_matrix if hasattr(affine, "affine_matrix") else np.asarray(affine, float)
    return affine @ physical


def layer_world_matrix(layer) -> np.ndarray:
    return world_matrix(placement_of(layer))


def on_same_grid(shape: tuple[int, ...], matrix: np.ndarray, other_shape: tuple[int, ...], other_matrix: np.ndarray) -> bool:
    return tuple(shape) == tuple(other_shape) and np.allclose(matrix, other_matrix, atol=GRID_TOLERANCE, rtol=0)


def matching_scan(shape: tuple[int, ...], matrix: np.ndarray, layers: Iterable) -> Any | None:
    """The first layer with recorded geometry whose grid (shape and placement) this one shares."""
    for layer in layers:
        recorded = layer.metadata.get("shape") if "geometry" in layer.metadata else None
        if recorded is not None and on_same_grid(shape, matrix, tuple(recorded), layer_world_matrix(layer)):
            return layer
    return None


def grid_metadata(name: str, shape: tuple[int, ...], matrix: np.ndarray, metadata: Mapping[str, Any] | None, layers: Iterable) -> dict[str, Any]:
    """The metadata of a layer, completed with its scan's geometry when it has none of its own.
    Refuses a layer on no open scan's grid."""
    metadata = dict(metadata or {})
    if "geometry" in metadata:
        return metadata
    scan = matching_scan(shape, matrix, layers)
    if scan is None:
        raise InputError(
            f"'{name}' lies on no open scan's grid (shape {tuple(shape)} with its placement): its geometry is unknown, "
            "so it is not written. Make label layers with Layers > New Labels while their scan is selected")
    image = scan.metadata.get("source_path") if scan.metadata.get("role") == "image" else scan.metadata.get("image_path")
    return {**metadata, "geometry": scan.metadata["geometry"], "shape": list(shape), "image_path": image}


def bring_into_view(viewer, layer) -> bool:
    """Move the viewer's slice and camera onto a layer lying outside the current view (a scan at
    another physical place than those opened before it), fitted to the canvas; True when it moved."""
    extent = np.asarray(layer.extent.world, float)  # (min, max) corners, world coordinates of the layer's axes
    axes = list(range(viewer.dims.ndim - extent.shape[1], viewer.dims.ndim))
    displayed = [axes.index(a) for a in viewer.dims.displayed if a in axes]
    sliced = [i for i in range(len(axes)) if i not in displayed]
    point = np.asarray(viewer.dims.point, float)[axes]
    camera = getattr(viewer, "scene", viewer).camera  # viewer.camera is deprecated since napari 0.9
    seen = np.asarray(camera.center, float)[-len(displayed):] if displayed else np.zeros(0)
    margin = GRID_TOLERANCE + np.abs(extent[1] - extent[0]) * 1e-6
    inside = np.all((point[sliced] >= extent[0][sliced] - margin[sliced]) & (point[sliced] <= extent[1][sliced] + margin[sliced]))
    inside &= np.all((seen >= extent[0][displayed] - margin[displayed]) & (seen <= extent[1][displayed] + margin[displayed]))
    if inside:
        return False
    viewer.dims.set_point(axes, extent.mean(0))
    viewer.reset_view(layers=[layer])
    return True
