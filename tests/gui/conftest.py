"""GUI tests: napari with a real OpenGL canvas on a virtual X display.

With no DISPLAY set, a private Xvfb is started for the session (Xvfb picks a free display number
itself through -displayfd) and stopped at the end; the tests are skipped, with the reason, only
when Xvfb or napari's Qt stack is missing. A small checkpoint is trained once per session on the
bundled hippocampus sample.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "resources" / "hippocampus"
SHARED = REPO.parent / "shared" / "data"


def _die_with_parent() -> None:
    """Linux: Xvfb gets SIGTERM when this test process exits (after Qt has let go of the display)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start_xvfb():
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_end), "-screen", "0", "1280x1024x24", "-nolisten", "tcp", "-noreset"],
        pass_fds=(write_end,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    os.close(write_end)
    number = b""
    deadline = time.monotonic() + 20
    with os.fdopen(read_end, "rb") as pipe:
        while not number.endswith(b"\n") and time.monotonic() < deadline:
            chunk = pipe.read(1)
            if not chunk:
                break
            number += chunk
    if not number.strip().isdigit():
        process.terminate()
        raise RuntimeError("Xvfb did not report a display number")
    return process, f":{number.strip().decode()}"


@pytest.fixture(scope="session", autouse=True)
def virtual_display():
    """A display for Qt and OpenGL: the one given in DISPLAY, else a private Xvfb."""
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    if shutil.which("Xvfb") is None:
        pytest.skip("GUI tests need an X display: DISPLAY is unset and Xvfb is not installed (apt-get install xvfb libgl1-mesa-dri)")
    process, display = _start_xvfb()
    os.environ["DISPLAY"] = display
    os.environ["QT_QPA_PLATFORM"] = "xcb"  # napari's canvas needs OpenGL: not the offscreen platform
    # The session's QApplication keeps its X connection until the interpreter exits, after every
    # fixture: the server must outlive it (else Qt reports a broken X11 connection). So Xvfb ends
    # with this process (PR_SET_PDEATHSIG on Linux); elsewhere an atexit handler terminates it.
    if not sys.platform.startswith("linux"):
        atexit.register(_stop, process)
    yield display


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module", autouse=True)
def quiet_environment(tmp_path_factory):
    """For these tests only: the recent-checkpoint list in a temporary folder; one compute thread
    per process (the test machine has two cores that other work shares: oversubscribed threads
    only slow everything down)."""
    import torch

    config = tmp_path_factory.mktemp("semiseg-config")
    saved = {k: os.environ.get(k) for k in ("SEMISEG_CONFIG_DIR", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ["SEMISEG_CONFIG_DIR"] = str(config)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield config
    torch.set_num_threads(threads)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, semiseg_cache) -> Path:
    """A tiny mean-teacher model (two predictors, so disagreement maps too), trained once."""
    import torch

    from semiseg.training import TrainConfig, train

    output = tmp_path_factory.mktemp("gui-model") / "run"
    config = TrainConfig(data=str(SAMPLE), output=str(output), method="mean-teacher", network="vnet",
                         network_options={"base_filters": 4}, labeled="2", validation="0", iterations=10,
                         log_every=5, validate_every=1000, workers=0, device="cpu", seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(config)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def case_paths() -> tuple[Path, Path]:
    return SAMPLE / "imagesTr" / "hippocampus_001.nii.gz", SAMPLE / "labelsTr" / "hippocampus_001.nii.gz"


@pytest.fixture
def unlabeled_folder(tmp_path) -> Path:
    """Three unlabeled scans (from the sample's imagesTs)."""
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    for path in sorted((SAMPLE / "imagesTs").iterdir())[:3]:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture
def messages(monkeypatch):
    """Notifications the plugin shows, by kind (show_error / show_info / show_warning)."""
    shown: dict[str, list[str]] = {"error": [], "info": [], "warning": []}
    import importlib
    import pkgutil

    import semiseg.napari.widgets as widgets

    for module in pkgutil.iter_modules(widgets.__path__):
        module = importlib.import_module(f"{widgets.__name__}.{module.name}")
        for kind in shown:
            if hasattr(module, f"show_{kind}"):
                monkeypatch.setattr(module, f"show_{kind}", lambda text, kind=kind: shown[kind].append(text))
    return shown
