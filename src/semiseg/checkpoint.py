"""Checkpoints: weights as safetensors, everything else as JSON. Loading never unpickles.

A checkpoint is a folder:
  model.safetensors        all networks' tensors, keyed "<network>.<parameter>"
  model.json               method, networks, classes, preprocessing plan, split, seed, iteration,
                           versions, validation metrics, and the SHA-256 of model.safetensors
  training.safetensors     optimizer/scaler/RNG tensors, for resuming (optional)
  training.json            the non-tensor rest of the training state, and its tensors' SHA-256
Files are written to a temporary folder that replaces the old one by rename, so a crash mid-save
leaves the previous checkpoint whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from semiseg import __version__
from semiseg.errors import CheckpointError

FORMAT = "semiseg-checkpoint"
FORMAT_VERSION = 1
MODEL_WEIGHTS, MODEL_JSON = "model.safetensors", "model.json"
TRAINING_TENSORS, TRAINING_JSON = "training.safetensors", "training.json"


def versions() -> dict[str, str]:
    import monai

    return {"semiseg": __version__, "torch": torch.__version__, "monai": monai.__version__, "python": platform.python_version()}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def flatten_state(state: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor/ndarray in a nested state by a reference; collect tensors by key."""
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(state, np.ndarray):
        tensors[prefix] = torch.from_numpy(np.ascontiguousarray(state))
        return {"__ndarray__": prefix}
    if isinstance(state, dict):
        return {"__dict__": [[flatten_state(k, f"{prefix}.k{i}", tensors), flatten_state(v, f"{prefix}.{i}", tensors)] for i, (k, v) in enumerate(state.items())]}
    if isinstance(state, (list, tuple)):
        items = [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(state)]
        return {"__tuple__": items} if isinstance(state, tuple) else items
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise TypeError(f"cannot store {type(state).__name__} in a checkpoint")


def unflatten_state(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(data, dict):
        if "__tensor__" in data:
            return tensors[data["__tensor__"]]
        if "__ndarray__" in data:
            return tensors[data["__ndarray__"]].numpy()
        if "__dict__" in data:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in data["__dict__"]}
        if "__tuple__" in data:
            return tuple(unflatten_state(v, tensors) for v in data["__tuple__"])
    if isinstance(data, list):
        return [unflatten_state(v, tensors) for v in data]
    return data


def save_checkpoint(folder: str | os.PathLike, weights: dict[str, torch.Tensor], meta: dict[str, Any], training_state: Any = None) -> Path:
    """Write a checkpoint folder atomically (temporary sibling, fsync, rename)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, staging / MODEL_WEIGHTS)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "versions": versions(), "weights_sha256": sha256(staging / MODEL_WEIGHTS)}
    _write_json(staging / MODEL_JSON, meta)
    if training_state is not None:
        tensors: dict[str, torch.Tensor] = {}
        skeleton = flatten_state(training_state, "state", tensors)
        save_file(tensors, staging / TRAINING_TENSORS)
        _write_json(staging / TRAINING_JSON, {"state": skeleton, "tensors_sha256": sha256(staging / TRAINING_TENSORS)})
    for path in staging.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    previous = folder.with_name(f".{folder.name}.previous-{os.getpid()}")
    if folder.exists():
        os.replace(folder, previous)
    os.replace(staging, folder)
    shutil.rmtree(previous, ignore_errors=True)
    return folder


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False))


def resolve(path: str | os.PathLike) -> Path:
    """The checkpoint folder for a path to the folder, its model.json or its model.safetensors."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not (folder / MODEL_JSON).is_file():
        if path.is_file() and path.suffix in (".pt", ".pth", ".ckpt", ".pkl", ".bin"):
            raise CheckpointError(f"{path}: a pickled checkpoint; semiseg loads only safetensors + JSON (it never unpickles)")
        raise CheckpointError(f"{path}: not a semiseg checkpoint (no {MODEL_JSON})")
    return folder


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    folder = resolve(path)
    try:
        meta = json.loads((folder / MODEL_JSON).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{folder / MODEL_JSON}: corrupt JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder / MODEL_JSON}: not a semiseg checkpoint description")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{folder}: written by a newer semiseg (format {meta['format_version']}); upgrade to load it")
    return meta


def _checked_weights(folder: Path, expected_sha256: str | None) -> Path:
    weights = folder / MODEL_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder}: {MODEL_WEIGHTS} is missing")
    if sha256(weights) != expected_sha256:
        raise CheckpointError(f"{weights}: checksum mismatch; the file is corrupt or partial")
    return weights


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """model.json of a checkpoint whose weights match the SHA-256 it records (without loading them)."""
    meta = read_meta(path)
    _checked_weights(resolve(path), meta.get("weights_sha256"))
    return meta


def load_weights(path: str | os.PathLike, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    weights = _checked_weights(resolve(path), expected_sha256)
    try:
        return load_file(weights)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{weights}: unreadable safetensors ({error})") from None


def load_training_state(path: str | os.PathLike) -> Any:
    folder = resolve(path)
    if not (folder / TRAINING_JSON).is_file():
        raise CheckpointError(f"{folder}: holds no training state to resume from (a best/exported model?)")
    try:
        data = json.loads((folder / TRAINING_JSON).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{folder / TRAINING_JSON}: corrupt JSON ({error})") from None
    if sha256(folder / TRAINING_TENSORS) != data.get("tensors_sha256"):
        raise CheckpointError(f"{folder / TRAINING_TENSORS}: checksum mismatch; the file is corrupt or partial")
    try:
        tensors = load_file(folder / TRAINING_TENSORS)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{folder / TRAINING_TENSORS}: unreadable safetensors ({error})") from None
    return unflatten_state(data["state"], tensors)
