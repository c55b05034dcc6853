"""Sliding-window inference: the memory guard and the uncertainty maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semiseg.errors import InputError
from semiseg.inference import disagreement, entropy, predict_probabilities

PATCH = (8, 8, 8)


def _image() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(20, 17, 12)).astype(np.float32)


def _network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Conv3d(1, 3, 3, padding=1).eval()


class OutOfMemoryAbove:
    """A predictor that fails like an accelerator would when given more than `windows` windows at once."""

    def __init__(self, network: torch.nn.Module, windows: int):
        self.network, self.windows, self.calls = network, windows, []

    def __call__(self, patch: torch.Tensor) -> torch.Tensor:
        self.calls.append(patch.shape[0])
        if patch.shape[0] > self.windows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.network(patch)


def test_out_of_memory_retries_one_window_at_a_time_with_the_same_result(caplog):
    network = _network()
    expected = predict_probabilities(_image(), [network], PATCH, torch.device("cpu"), sw_batch_size=1)
    predictor = OutOfMemoryAbove(network, windows=1)
    with caplog.at_level("WARNING"):
        result = predict_probabilities(_image(), [predictor], PATCH, torch.device("cpu"), sw_batch_size=4)
    assert predictor.calls[0] == 4 and set(predictor.calls[1:]) == {1}
    np.testing.assert_allclose(result, expected, atol=1e-6)
    assert "one window at a time" in caplog.text


def test_out_of_memory_even_for_one_window_is_a_clear_error():
    with pytest.raises(InputError, match="even one window at a time.*cpu"):
        predict_probabilities(_image(), [OutOfMemoryAbove(_network(), windows=0)], PATCH, torch.device("cpu"))


def test_probabilities_sum_to_one_and_uncertainties_are_bounded():
    probabilities = predict_probabilities(_image(), [_network(), _network()], PATCH, torch.device("cpu"), tta=True)
    assert probabilities.shape == (2, 3, 20, 17, 12)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    uniform = np.full((3, 4, 4, 4), 1 / 3)
    certain = np.zeros((3, 4, 4, 4))
    certain[1] = 1
    np.testing.assert_allclose(entropy(uniform), 1.0, atol=1e-6)
    np.testing.assert_allclose(entropy(certain), 0.0, atol=1e-6)
    assert disagreement(certain, certain).max() == 0
    flipped = np.roll(certain, 1, axis=0)
    np.testing.assert_allclose(disagreement(certain, flipped), 1.0)


def test_inference_estimate_counts_the_network_calls_and_bounds_the_volume_memory(one_thread):
    """The estimate of `predict_volume` on the sample scan against the real run: the same number of
    network calls, a time within a factor of the measured one, and no fewer bytes than numpy held."""
    import time
    import tracemalloc
    from pathlib import Path

    from semiseg.inference import estimate_inference, measure_window_cost, predict_volume
    from semiseg.io import Volume, read_volume
    from semiseg.models import load_model

    repo = Path(__file__).resolve().parents[1]
    model = load_model(repo / "resources" / "models" / "default")
    volume = read_volume(repo / "resources" / "hippocampus" / "imagesTs" / "hippocampus_036.nii.gz")
    device = torch.device("cpu")
    cost = measure_window_cost(model.predictors(), model.plan.patch_size, device)
    assert cost.seconds > 0 and cost.bytes > 0
    estimate = estimate_inference(volume, model.plan, len(model.predictors()), cost, model.overlap)

    calls = []
    counted = [lambda patch, p=p: calls.append(1) or p(patch) for p in model.predictors()]
    tracemalloc.start()
    started = time.perf_counter()
    predict_volume(volume, model.plan, counted, device, model.overlap)
    seconds = time.perf_counter() - started
    _, numpy_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert estimate.calls == len(calls)
    assert seconds / 5 < estimate.seconds < seconds * 5, (estimate.seconds, seconds)  # a shared machine's timings vary
    assert estimate.peak_bytes >= numpy_peak
    print(f"\nestimate {estimate.seconds:.2f} s, {estimate.peak_bytes / 2**20:.1f} MiB; measured {seconds:.2f} s, numpy peak {numpy_peak / 2**20:.1f} MiB")
    # A scan the size of the 20x512x512 DICOM CT: proportionally more, and a warning past the memory free.
    large = estimate_inference(Volume(np.zeros((20, 512, 512), np.int16), volume.geometry), model.plan, len(model.predictors()), cost, model.overlap)
    assert large.calls > 10 * estimate.calls and large.peak_bytes > 20 * 512 * 512 * 4 * 8
    assert "may run out of memory" in large.describe(available_bytes=large.peak_bytes - 1)
    assert "may run out" not in large.describe(available_bytes=large.peak_bytes)


def test_sliding_windows_span_whole_patches_inside_the_image_with_the_same_overlap_in_voxels():
    from semiseg.inference import sliding_window
    from semiseg.methods import METHODS

    # 20 slices hold no whole patch of 32 (the patch, padded as before); 311 rows hold two of 48, 512 columns two of 32.
    window, overlaps = sliding_window((20, 311, 512), (32, 48, 32), 0.5, scale=2)
    assert window == (32, 96, 64)
    assert [w * o for w, o in zip(window, overlaps)] == [16, 24, 16]  # the patch-sized windows' overlap, in voxels
    assert sliding_window((39, 47, 36), (32, 48, 32), 0.5, scale=2) == ((32, 48, 32), (0.5, 0.5, 0.5))  # never larger than the image
    assert sliding_window((200, 200, 200), (32, 48, 32), 0.5, scale=1) == ((32, 48, 32), (0.5, 0.5, 0.5))
    # The kMaX decoder attends over its whole window: its predictions keep patch-sized windows.
    assert not METHODS["dk-uxnet"].larger_windows and METHODS["cps"].larger_windows


def test_cropping_to_the_body_predicts_the_box_as_the_box_alone_and_background_elsewhere(one_thread):
    """A sample scan amid air (a canvas 27 times its size at -1000 HU, as a CT's outside) under the bundled
    model's plan with fixed intensity statistics (as CT plans have): the sliding window covers the scan's
    box plus half a patch, predicts there exactly what it predicts for that box alone, and background
    (entropy 0) elsewhere, with a quarter of the network calls."""
    import dataclasses
    from pathlib import Path

    from semiseg.inference import inference_box, network_calls, predict_volume
    from semiseg.io import Volume, read_volume
    from semiseg.models import load_model

    repo = Path(__file__).resolve().parents[1]
    model = load_model(repo / "resources" / "models" / "default")
    scan = read_volume(repo / "resources" / "hippocampus" / "imagesTr" / "hippocampus_004.nii.gz")
    values = scan.array.astype(np.float32)
    plan = dataclasses.replace(model.plan, normalization="ct", intensity_clip=(float(values.min()), float(values.max())),
                               intensity_mean=float(values.mean()), intensity_std=float(values.std()))
    canvas = np.full([3 * n for n in scan.shape], -1000.0, np.float32)
    canvas[tuple(slice(n, 2 * n) for n in scan.shape)] = values
    volume = Volume(canvas, scan.geometry)
    box = inference_box(volume, plan)
    margin = [p // 2 for p in plan.patch_size]
    body = [np.flatnonzero((canvas > -500).any(axis=tuple(a for a in range(3) if a != axis)))[[0, -1]] for axis in range(3)]
    for piece, (lo, hi), m, n in zip(box, body, margin, canvas.shape):  # the body and half a patch (found subsampled: 1 voxel of slack)
        assert max(lo - m - 1, 0) <= piece.start <= max(lo - m, 0) and min(hi + 1 + m, n) <= piece.stop <= min(hi + 2 + m, n)
    calls = []
    counted = [lambda patch, p=p: calls.append(1) or p(patch) for p in model.predictors()]
    with torch.no_grad():
        cropped = predict_volume(volume, plan, counted, torch.device("cpu"), model.overlap)
        alone = predict_volume(Volume(canvas[box], scan.geometry), plan, model.predictors(), torch.device("cpu"), model.overlap, crop=False)
    np.testing.assert_array_equal(cropped.labels.array[box], alone.labels.array)
    np.testing.assert_allclose(cropped.probabilities[(slice(None), *box)], alone.probabilities, atol=1e-6)
    outside = np.ones(canvas.shape, bool)
    outside[box] = False
    assert not cropped.labels.array[outside].any() and not cropped.entropy.array[outside].any()
    assert np.all(cropped.probabilities[0][outside] == 1.0)
    full = network_calls(Volume(np.zeros_like(canvas), scan.geometry), plan, 1)  # an empty scan: no box, every window
    assert len(calls) == network_calls(volume, plan, 1) < full / 3
