"""Shared test setup."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def semiseg_cache(tmp_path_factory):
    """Keep the preprocessing cache in a temporary folder, never in the home folder."""
    path = tmp_path_factory.mktemp("semiseg-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEMISEG_CACHE", str(path))
        yield path


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two threads contending with other work run
    small convolutions several times slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def sample_model(tmp_path):
    """The bundled model with its record cut down to the sample's cases (sample_model.py)."""
    from sample_model import make_sample_model

    return make_sample_model(tmp_path)
