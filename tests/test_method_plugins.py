"""A method from a package of its own: installed (here: a dist-info folder on the path, as pip
would leave it), it is listed by `semiseg methods` and trains through `semiseg train`; a broken
one is reported and skipped. Every registered network follows the `Network` protocol."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from semiseg.networks import NETWORKS, Network, build_network

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "resources" / "hippocampus"

TINY_METHOD = '''
"""A lab's method: supervised on the labeled patches, with a network of its own."""
import torch
from torch import nn

from semiseg.methods.base import Method
from semiseg.networks import register_network
from semiseg.networks.vnet import VNet


def small_vnet(in_channels, out_channels, **options):
    return VNet(in_channels=in_channels, out_channels=out_channels, base_filters=4)


register_network("lab-small-vnet", small_vnet)


class LabMethod(Method):
    name = "lab-method"
    summary = "A lab's own method, installed as a package."
    uses_unlabeled = False
    defaults = {"scale": 1.0}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.networks["student"] = self.make_network()

    def training_step(self, labeled, unlabeled, step):
        logits = self.networks["student"](labeled["image"])
        return {"supervised": self.options["scale"] * self.supervised_loss(logits, labeled["label"])}

    def predictors(self):
        return {"student": self.networks["student"]}
'''


def _install(site: Path, package: str, source: str, entry: str) -> None:
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text(textwrap.dedent(source))
    dist_info = site / f"{package}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[semiseg.methods]\n{entry}\n")


def _semiseg(site: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(site)]), "SEMISEG_CACHE": str(cwd / "cache"),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "semiseg.cli", *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_an_installed_method_package_is_listed_and_trains(tmp_path):
    site = tmp_path / "site"
    _install(site, "lab_method", TINY_METHOD, "lab-method = lab_method:LabMethod")
    _install(site, "broken_method", "raise ImportError('a missing dependency')", "broken = broken_method:Nothing")
    listed = _semiseg(site, tmp_path, "methods")
    assert listed.returncode == 0, listed.stderr
    assert "lab-method" in listed.stdout and "scale=1.0" in listed.stdout and "mean-teacher" in listed.stdout
    assert "method plugin 'broken'" in listed.stderr and "a missing dependency" in listed.stderr

    run = tmp_path / "run"
    trained = _semiseg(site, tmp_path, "train", "--data", str(SAMPLE), "--out", str(run), "--method", "lab-method",
                       "--network", "lab-small-vnet", "--option", "scale=0.5", "--labeled", "2", "--iterations", "2",
                       "--workers", "0", "--device", "cpu")
    assert trained.returncode == 0, trained.stderr
    model = json.loads((run / "best" / "model.json").read_text())["model"]
    assert (model["method"], model["network"]["name"], model["options"]) == ("lab-method", "lab-small-vnet", {"scale": 0.5})


def test_every_registered_network_follows_the_protocol():
    for name in NETWORKS:
        network = build_network(name, 1, 3).eval()
        assert isinstance(network, Network), name
        with torch.no_grad():
            features = network.encode(torch.zeros(1, 1, *(2 * 2 ** network.downsamplings,) * 3))
        assert [f.shape[1] for f in features][: len(network.encoder_widths)] == list(network.encoder_widths), name
