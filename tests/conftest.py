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
