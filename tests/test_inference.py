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
