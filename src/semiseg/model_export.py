"""Export a trained model as TorchScript or ONNX, with its preprocessing plan beside it in JSON.

What is exported is one module, patch -> combined class probabilities: the softmax of each of
the method's predicting networks, averaged as `semiseg predict` averages them. Sliding-window
blending (MONAI's, Gaussian) is linear, so blending the averaged patches gives the engine's
averaged volume; a user needs only `sliding_window_inference` over the exported module and the
plan's preprocessing and restoration to reproduce `semiseg predict` (without --tta).

The plan file (`<name>.plan.json`) does not depend on the format, so a TorchScript and an ONNX
export of one checkpoint can share a folder and one plan file.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from semiseg.errors import InputError, OutputExistsError
from semiseg.io import Volume
from semiseg.models import Model
from semiseg.preprocessing import Plan

PLAN_FORMAT = "semiseg-exported-model"
# Opset 17: LayerNormalization (UX-Net) is one operator from 17 on, and onnxruntime 1.18 (the
# `export` extra's minimum) runs it; nothing newer is needed by the networks that export.
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
SLIDING_WINDOW_MODE = "gaussian"  # predict_probabilities' default blending


class CombinedProbabilities(nn.Module):
    """The method's predictors and their averaging as one module: (B, C_in, z, y, x) -> (B, classes, z, y, x).

    The whole method is held as a submodule so that predictors which are closures over it
    (dk-uxnet's) trace with its weights as parameters, not as constants. The TorchScript file
    therefore also carries training-only networks (a discriminator, projection heads); the ONNX
    graph keeps only the weights the predictors use."""

    def __init__(self, model: Model):
        super().__init__()
        self.method = model.method
        self.predictors = model.predictors()  # a plain list: the modules are registered through `method`

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        probabilities = [torch.softmax(predictor(image).float(), dim=1) for predictor in self.predictors]
        return torch.stack(probabilities).mean(0)


def export_spec(model: Model) -> dict[str, Any]:
    """Everything besides the weights that reproduces `semiseg predict`: the plan, the window and
    how the exported module's output is combined."""
    record = model.record
    patch = list(model.plan.patch_size)
    return {
        "format": PLAN_FORMAT,
        "format_version": 1,
        "plan": model.plan.to_dict(),
        "sliding_window": {"roi_size": patch, "overlap": model.overlap, "mode": SLIDING_WINDOW_MODE},
        "input": {"name": INPUT_NAME, "shape": ["batch", record.in_channels, *patch], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", model.plan.num_classes, *patch], "dtype": "float32"},
        "predictors": list(model.method.predictors()),
        "combination": "mean of the predictors' softmax class probabilities",
        "method": {"name": record.method, "options": record.method_options,
                   "network": {"name": record.network, "options": record.network_options}},
    }


def export_torchscript(model: Model, path: str | os.PathLike, overwrite: bool = False) -> tuple[Path, Path]:
    """Write `<name>.pt` and `<name>.plan.json`; returns both paths.

    Traced, not scripted: predictors are plain Python (closures, dynamic-network-architectures'
    shape checks) that `torch.jit.script` cannot compile, while the spatial size is fixed to the
    patch, so a trace records the one path taken. torch 2.13 deprecates `torch.jit.trace` but
    still writes files every `torch.jit.load` reads; the warning is silenced here only."""
    model_path, plan_path, spec = _prepare(model, path, ".pt", overwrite)
    module = CombinedProbabilities(model).eval()
    with torch.no_grad(), warnings.catch_warnings(), _replacing(model_path) as temporary:
        warnings.filterwarnings("ignore", message=".*torch.jit.trace.* is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # shape checks: constant for a fixed patch
        torch.jit.trace(module, _example_input(model), check_trace=False).save(str(temporary))
    _write_plan(plan_path, spec)
    return model_path, plan_path


def export_onnx(model: Model, path: str | os.PathLike, overwrite: bool = False) -> tuple[Path, Path]:
    """Write `<name>.onnx` (batch axis dynamic, spatial axes fixed to the patch) and `<name>.plan.json`.

    Uses torch's TorchScript-based exporter (dynamo=False): the torch.export-based default of
    torch >= 2.9 needs the onnxscript package, the legacy one nothing beyond torch. Attention runs
    unfused during export, as the fused kernel has no ONNX form. Networks with an operator that
    opset 17 lacks (sscl's FFT) are refused with a message; TorchScript exports them."""
    model_path, plan_path, spec = _prepare(model, path, ".onnx", overwrite)
    module = CombinedProbabilities(model).eval()
    with torch.no_grad(), warnings.catch_warnings(), _unfused_attention(), _replacing(model_path) as temporary:
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        try:
            torch.onnx.export(
                module, (_example_input(model),), str(temporary), dynamo=False, opset_version=ONNX_OPSET,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        except torch.onnx.errors.UnsupportedOperatorError as error:
            raise InputError(f"{model.record.method} cannot be exported to ONNX ({error}); export it as torchscript") from None
    _write_plan(plan_path, spec)
    return model_path, plan_path


def read_spec(path: str | os.PathLike) -> dict[str, Any]:
    """An exported model's plan file, checked to be one."""
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read the exported model's plan ({error})") from None
    if not isinstance(spec, dict) or spec.get("format") != PLAN_FORMAT:
        raise InputError(f"{path}: not a semiseg exported-model plan")
    return spec


def read_plan(path: str | os.PathLike) -> Plan:
    """The preprocessing `Plan` of an exported model, from its plan file."""
    return Plan.from_dict(read_spec(path)["plan"])


def load_exported(path: str | os.PathLike) -> Callable[[torch.Tensor], torch.Tensor]:
    """The exported module as a patch -> probabilities callable for `sliding_window_inference`:
    TorchScript through torch.jit.load, ONNX through an onnxruntime CPU session."""
    path = Path(path)
    if path.suffix == ".pt":
        return torch.jit.load(str(path), map_location="cpu").eval()
    if path.suffix != ".onnx":
        raise InputError(f"{path}: expected an exported .pt or .onnx file")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch is allowed
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(patch: torch.Tensor) -> torch.Tensor:
        (output,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(patch.cpu().numpy(), dtype=np.float32)})
        return torch.from_numpy(output)

    return run


@torch.no_grad()
def predict_with_exported(scan: Volume, network: Callable[[torch.Tensor], torch.Tensor], spec: dict[str, Any],
                          sw_batch_size: int = 2) -> np.ndarray:
    """Class probabilities (C, z, y, x) on the scan's grid from an exported module: the README's
    recipe (the plan's preprocessing, MONAI's sliding window, the plan's restoration) as a function."""
    plan, window = Plan.from_dict(spec["plan"]), spec["sliding_window"]
    image = torch.from_numpy(plan.preprocess_image(scan))[None, None]
    output = sliding_window_inference(image, window["roi_size"], sw_batch_size, network, overlap=window["overlap"], mode=window["mode"])
    return plan.restore(output[0].numpy(), scan)


def _plan_path_for(model_path: Path) -> Path:
    return model_path.with_name(f"{model_path.stem}.plan.json")


def _prepare(model: Model, path: str | os.PathLike, suffix: str, overwrite: bool) -> tuple[Path, Path, dict[str, Any]]:
    """Output paths and the plan; refuses existing files without `overwrite`, except a plan file
    that already holds this very plan (the other format's export of the same model)."""
    model_path = Path(path)
    if model_path.suffix != suffix:
        model_path = model_path.with_name(model_path.name + suffix)
    plan_path, spec = _plan_path_for(model_path), export_spec(model)
    if not overwrite:
        for existing in (model_path, plan_path):
            if existing.exists() and not (existing == plan_path and _same_plan(plan_path, spec)):
                raise OutputExistsError(f"{existing} exists; refusing to overwrite it (use --overwrite)")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    return model_path, plan_path, spec


def _same_plan(path: Path, spec: dict[str, Any]) -> bool:
    try:
        return path.read_text() == _plan_text(spec)
    except (OSError, UnicodeDecodeError):
        return False


def _plan_text(spec: dict[str, Any]) -> str:
    return json.dumps(spec, indent=2) + "\n"


def _write_plan(path: Path, spec: dict[str, Any]) -> None:
    path.write_text(_plan_text(spec))


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed to it on success and removed on failure, so a failed
    export leaves neither a partial file nor a lost earlier one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def _unfused_attention() -> Iterator[None]:
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _example_input(model: Model) -> torch.Tensor:
    """A batch of two patches: tracing with a batch of one could fix the batch size to one."""
    channels = model.record.in_channels
    device = next(model.method.parameters()).device
    return torch.zeros((2, channels, *model.plan.patch_size), device=device)
