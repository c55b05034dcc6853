"""A training process killed with SIGKILL mid-run resumes from its last checkpoint and continues
exactly as the uninterrupted run did (CPU, deterministic settings)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from semiseg.checkpoint import read_meta
from semiseg.models import load_model

SAMPLE = Path(__file__).resolve().parents[1] / "resources" / "hippocampus"
ITERATIONS, SAVE_EVERY = 40, 10


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "semiseg.cli", "train", "--data", str(SAMPLE), "--out", str(out), "--method", "mean-teacher",
            "--network-option", "base_filters=4", "--labeled", "6", "--iterations", str(ITERATIONS),
            "--validate-every", str(SAVE_EVERY), "--log-every", "1", "--workers", "0", "--device", "cpu", *extra]


def _iteration_losses(out: Path, after_resume: bool = False) -> dict[int, float]:
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.endswith("}")]
    if after_resume:
        last_resume = max(i for i, e in enumerate(events) if e["type"] == "resume")
        events = events[last_resume:]
    return {e["iteration"]: e["loss"] for e in events if e["type"] == "iteration"}


def _last_logged_iteration(log: Path) -> int:
    if not log.exists():
        return 0
    iterations = [json.loads(line)["iteration"] for line in log.read_text().splitlines()
                  if line.endswith("}") and '"type": "iteration"' in line]
    return max(iterations, default=0)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_the_uninterrupted_run(tmp_path):
    env = {**os.environ, "SEMISEG_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    full = subprocess.run(_command(tmp_path / "full"), capture_output=True, text=True, env=env, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]

    killed = subprocess.Popen(_command(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.monotonic() + 300
    while _last_logged_iteration(log) <= SAVE_EVERY and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = _last_logged_iteration(log)
    assert SAVE_EVERY < killed_at < ITERATIONS

    saved_at = read_meta(tmp_path / "killed" / "last")["iteration"]
    # The newest save, or the one before when the kill hit a save in progress (left intact).
    assert saved_at in {killed_at // SAVE_EVERY * SAVE_EVERY, (killed_at // SAVE_EVERY - 1) * SAVE_EVERY} and saved_at > 0
    resumed = subprocess.run(_command(tmp_path / "killed", "--resume"), capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = {i: loss for i, loss in _iteration_losses(tmp_path / "full").items() if i > saved_at}
    assert _iteration_losses(tmp_path / "killed", after_resume=True) == expected
    a = load_model(tmp_path / "full" / "last").method.state_dict()
    b = load_model(tmp_path / "killed" / "last").method.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_drops_the_half_line_a_killed_run_left_in_its_log(tmp_path):
    from semiseg.training import _drop_partial_last_line

    log = tmp_path / "log.jsonl"
    log.write_text('{"type": "iteration", "iteration": 1}\n{"type": "itera')
    _drop_partial_last_line(log)
    assert log.read_text() == '{"type": "iteration", "iteration": 1}\n'
    _drop_partial_last_line(log)  # a complete log is left alone
    assert log.read_text() == '{"type": "iteration", "iteration": 1}\n'
