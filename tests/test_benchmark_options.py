"""The hippocampus benchmark's --option parsing: a variant name with a dot once sent its options
nowhere and a default run was recorded under the variant's name."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "hippocampus_cpu.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("hippocampus_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_options_reach_variants_whose_names_contain_dots():
    parse = _benchmark().parse_method_options
    runs = ["dual-subnet:0.1:weight-0.1", "dk-uxnet:0.1", "sscl:0.1:baseline"]
    options = parse(["dual-subnet:weight-0.1.unlabeled_weight=0.1", "dk-uxnet.queries=32", "sscl:baseline.spectral=false"], runs)
    assert options == {"dual-subnet:weight-0.1": {"unlabeled_weight": 0.1}, "dk-uxnet": {"queries": 32}, "sscl:baseline": {"spectral": False}}


def test_an_option_for_no_run_is_refused():
    with pytest.raises(SystemExit, match="dual-subnet:weight-0"):
        _benchmark().parse_method_options(["dual-subnet:weight-0.unlabeled_weight=0.1"], ["dual-subnet:0.1:weight-0.1"])
