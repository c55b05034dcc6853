"""Putting a segmentation into the viewer, and which layers are scans or user label maps (no Qt here).

A prediction, its uncertainty maps and its error map are placed exactly on their scan's grid. A
layer of the same name is updated in place when that loses nothing: an image always, a label map
only while the user has not edited it since the plugin wrote it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from napari.layers import Image, Labels
from napari.utils.colormaps import DirectLabelColormap

from semiseg.napari import jobs
from semiseg.napari.layers import (
    ERROR_COLORS,
    ERROR_NAMES,
    UNCERTAINTY_COLORMAP,
    data_digest,
    geometry_metadata,
    jsonable_names,
    label_features,
)
from semiseg.napari.placement import TRANSFORM_KEYS, placement_of

OUTPUT_ROLES = ("entropy", "disagreement")


def is_scan(layer) -> bool:
    """A 3D single-channel image that is not one of the plugin's uncertainty maps."""
    return layer.ndim == 3 and not getattr(layer, "rgb", False) and layer.metadata.get("role") not in OUTPUT_ROLES


def user_labels(layer) -> bool:
    """A label map a user may pick (not an error map)."""
    return layer.metadata.get("role") != "errors"


def find_layer(viewer, name: str, kind: type):
    return next((layer for layer in viewer.layers if layer.name == name and isinstance(layer, kind)), None)


def unedited(layer) -> bool:
    written = layer.metadata.get("written_digest")
    return written is not None and written == data_digest(np.asarray(layer.data))


def put_layer(viewer, kind: type, name: str, data: np.ndarray, attributes: dict[str, Any], protect=()):
    """Update the layer of this name in place when that loses nothing (same shape; for label maps:
    not edited since the plugin wrote it, and not protected), else add a new layer."""
    existing = find_layer(viewer, name, kind)
    if existing is not None and not any(existing is p for p in protect) and np.shape(existing.data) == data.shape:
        if kind is Image or unedited(existing):
            existing.data = data
            existing.metadata = attributes["metadata"]
            for key in TRANSFORM_KEYS:
                setattr(existing, key, attributes[key])
            if "features" in attributes:
                existing.features = attributes["features"]
            if "contrast_limits" in attributes:
                existing.contrast_limits = attributes["contrast_limits"]
            return existing
    extra = {k: v for k, v in attributes.items() if k != "name"}
    if kind is Labels:
        return viewer.add_labels(data, name=name, **extra)
    return viewer.add_image(data, name=name, **extra)


def show_segmentation(viewer, image_layer, result: jobs.SegmentResult, protect=()) -> dict[str, Any]:
    """Add (or update) the prediction, uncertainty and error-map layers of a segmentation of image_layer."""
    prediction = result.prediction
    source = image_layer.metadata.get("source_path")
    common = {
        "source_path": source,
        "image_path": source,
        "image_layer": image_layer.name,
        "checkpoint": result.checkpoint,
        "checkpoint_sha256": result.checkpoint_sha256,
        "method": result.method,
        "device": result.device,
        "tta": result.tta,
    }
    placement = placement_of(image_layer)
    geometry, shape = prediction.labels.geometry, prediction.labels.shape
    names = result.class_names
    labels = prediction.labels.array
    layers: dict[str, Any] = {}
    meta = geometry_metadata(geometry, shape, role="prediction", class_names=jsonable_names(names),
                             uncertainty_score=result.score, written_digest=data_digest(labels), **common)
    layers["prediction"] = put_layer(viewer, Labels, f"{image_layer.name} prediction", labels,
                                      {"metadata": meta, "features": label_features(names), "opacity": 0.6, **placement}, protect)
    maps = [("entropy", prediction.entropy)] + ([("disagreement", prediction.disagreement)] if prediction.disagreement is not None else [])
    for role, volume in maps:
        meta = geometry_metadata(geometry, shape, role=role, **common)
        existing = find_layer(viewer, f"{image_layer.name} {role}", Image)
        layers[role] = put_layer(viewer, Image, f"{image_layer.name} {role}", volume.array.astype(np.float32, copy=False), {
            "metadata": meta, "colormap": UNCERTAINTY_COLORMAP, "contrast_limits": [0.0, 1.0], "opacity": 0.6,
            "blending": "additive", "visible": existing.visible if existing is not None else False, **placement})
    if result.errors is not None:
        meta = geometry_metadata(geometry, shape, role="errors", written_digest=data_digest(result.errors), **common)
        colormap = DirectLabelColormap(color_dict={**ERROR_COLORS, None: (0.0, 0.0, 0.0, 0.0)})
        layers["errors"] = put_layer(viewer, Labels, f"{image_layer.name} errors", result.errors, {
            "metadata": meta, "colormap": colormap, "opacity": 0.8,
            "features": {"index": list(ERROR_NAMES), "error": list(ERROR_NAMES.values())}, **placement})
    viewer.layers.selection.active = layers["prediction"]
    return layers

