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

from semiseg.errors import InputError
from semiseg.io import Volume
from semiseg.napari import jobs
from semiseg.napari.layers import (
    ERROR_COLORS,
    ERROR_NAMES,
    UNCERTAINTY_COLORMAP,
    class_colors,
    class_volumes_ml,
    data_digest,
    geometry_metadata,
    jsonable_names,
    label_features,
    labels_array,
    names_from_metadata,
    volume_from_layer,
)
from semiseg.napari.placement import TRANSFORM_KEYS, layer_world_matrix, matching_scan, placement_of

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
            if "colormap" in attributes and kind is Labels:
                existing.colormap = attributes["colormap"]
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
    model = {"checkpoint": result.checkpoint, "checkpoint_sha256": result.checkpoint_sha256, "method": result.method,
             "device": result.device, "tta": result.tta}
    layers = show_prediction(viewer, image_layer, prediction.labels, result.class_names, result.score, model,
                             [("entropy", prediction.entropy)] + ([("disagreement", prediction.disagreement)] if prediction.disagreement is not None else []),
                             protect)
    if result.errors is not None:
        meta = geometry_metadata(prediction.labels.geometry, prediction.labels.shape, role="errors",
                                 written_digest=data_digest(result.errors), **_provenance(image_layer, model))
        colormap = DirectLabelColormap(color_dict={**ERROR_COLORS, None: (0.0, 0.0, 0.0, 0.0)})
        layers["errors"] = put_layer(viewer, Labels, f"{image_layer.name} errors", result.errors, {
            "metadata": meta, "colormap": colormap, "opacity": 0.8,
            "features": {"index": list(ERROR_NAMES), "error": list(ERROR_NAMES.values())}, **placement_of(image_layer)})
    viewer.layers.selection.active = layers["prediction"]
    return layers


def _provenance(image_layer, model: dict[str, Any]) -> dict[str, Any]:
    source = image_layer.metadata.get("source_path")
    return {"source_path": source, "image_path": source, "image_layer": image_layer.name, **model}


def show_prediction(viewer, image_layer, labels: Volume, class_names: dict[int, str], score: float, model: dict[str, Any],
                    maps: list[tuple[str, Volume]], protect=()) -> dict[str, Any]:
    """Add (or update) a prediction's label layer, in class colours and with its per-class volumes
    recorded, and its uncertainty maps (hidden unless shown before), all on image_layer's grid."""
    common = _provenance(image_layer, model)
    placement = placement_of(image_layer)
    geometry, shape = labels.geometry, labels.shape
    array = labels_array(labels.array)  # the smallest type that holds every label value (uint8 would wrap 256 to 0)
    volumes = class_volumes_ml(array, geometry.spacing_zyx, class_names)
    meta = geometry_metadata(geometry, shape, role="prediction", class_names=jsonable_names(class_names), uncertainty_score=score,
                             written_digest=data_digest(array), class_volumes_ml={str(k): v for k, v in volumes.items()}, **common)
    layers = {"prediction": put_layer(viewer, Labels, f"{image_layer.name} prediction", array,
                                      {"metadata": meta, "features": label_features(class_names), "colormap": class_colors(class_names),
                                       "opacity": 0.6, **placement}, protect)}
    for role, volume in maps:
        meta = geometry_metadata(geometry, shape, role=role, **common)
        existing = find_layer(viewer, f"{image_layer.name} {role}", Image)
        layers[role] = put_layer(viewer, Image, f"{image_layer.name} {role}", volume.array.astype(np.float32, copy=False), {
            "metadata": meta, "colormap": UNCERTAINTY_COLORMAP, "contrast_limits": [0.0, 1.0], "opacity": 0.6,
            "blending": "additive", "visible": existing.visible if existing is not None else False, **placement})
    return layers


def scan_of(labels, scans: list):
    """The scan a label layer belongs to: the one it was predicted from (by layer name, then by
    file), else the one whose grid it lies on (a layer made with napari's New Labels)."""
    by_name = labels.metadata.get("image_layer")
    by_file = labels.metadata.get("image_path")
    for matches in (lambda scan: by_name is not None and scan.name == by_name,
                    lambda scan: by_file is not None and scan.metadata.get("source_path") == by_file):
        found = next((scan for scan in scans if matches(scan)), None)
        if found is not None:
            return found
    return matching_scan(np.shape(labels.data), layer_world_matrix(labels), scans)


def prediction_of(viewer, scan):
    """The scan's prediction layer (the model's output the plugin wrote), if open."""
    return next((layer for layer in viewer.layers if isinstance(layer, Labels) and layer.metadata.get("role") == "prediction"
                 and layer.metadata.get("image_layer") == scan.name), None)


def layer_volumes(layer, class_names) -> dict[int, float] | None:
    """Per-class volumes (mL) of a label layer's current data; None when its geometry is unknown."""
    try:
        volume = volume_from_layer(layer)
    except InputError:
        return None
    return class_volumes_ml(volume.array, volume.geometry.spacing_zyx, class_names)


def volume_columns(prediction, correction=None, reference=None) -> tuple[dict[str, dict[int, float]], dict[int, str]]:
    """Per-class volumes (mL) to compare, by column: what the model predicted (recorded when the
    plugin wrote the prediction), the correction (a chosen label layer, or the prediction layer
    itself once the user edited it) and a reference; with the class names. Any layer may be None."""
    named = next((layer for layer in (prediction, correction, reference) if layer is not None and names_from_metadata(layer.metadata)), None)
    names = names_from_metadata(named.metadata) if named is not None else {}
    columns: dict[str, dict[int, float]] = {}
    if prediction is not None:
        recorded = prediction.metadata.get("class_volumes_ml")
        predicted = {int(k): float(v) for k, v in recorded.items()} if isinstance(recorded, dict) else layer_volumes(prediction, names)
        if predicted is not None:
            columns["prediction"] = predicted
    if correction is not None and (correction is not prediction or not unedited(prediction)):
        corrected = layer_volumes(correction, names)
        if corrected is not None:
            columns["correction"] = corrected
    if reference is not None:
        referenced = layer_volumes(reference, names)
        if referenced is not None:
            columns["reference"] = referenced
    return columns, names
