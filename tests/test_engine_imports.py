"""The engine and the CLI must not pull in any GUI toolkit (Qt bindings, napari, magicgui, vispy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ENGINE_MODULES = [
    "semiseg", "semiseg.regions", "semiseg.io", "semiseg.datasets", "semiseg.preprocessing", "semiseg.sampling", "semiseg.networks",
    "semiseg.methods", "semiseg.training", "semiseg.inference", "semiseg.metrics", "semiseg.checkpoint",
    "semiseg.models", "semiseg.cli", "semiseg.devices", "semiseg.model_export", "semiseg.config", "semiseg.benchmark_la", "semiseg.benchmark_cli",
    "semiseg.distributed", "semiseg.postprocessing", "semiseg.presets", "semiseg.compatibility",
]
GUI_PREFIXES = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "vispy")

SCRIPT = """
import contextlib, importlib, io, json, sys
for name in {modules!r}:
    importlib.import_module(name)
import semiseg.cli
buffer = io.StringIO()
with contextlib.redirect_stdout(buffer):
    code = semiseg.cli.main(["methods"])
gui = sorted(m for m in sys.modules if m.startswith({prefixes!r}))
print(json.dumps({{"code": code, "methods": buffer.getvalue(), "gui": gui}}))
"""


def test_engine_and_cli_import_no_gui_toolkit(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    env["SEMISEG_CACHE"] = str(tmp_path / "cache")
    env.pop("QT_API", None)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(modules=ENGINE_MODULES, prefixes=GUI_PREFIXES)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["gui"] == [], f"GUI modules imported by the engine: {report['gui']}"
    assert report["code"] == 0
    listed = report["methods"]
    for method in ("supervised", "mean-teacher", "cps"):
        assert method in listed
    assert "options:" in listed
