"""Training methods, registered by name; each is one short module on the shared trainer.

A lab can add a method as a package of its own: its `pyproject.toml` declares an entry point in
the `semiseg.methods` group naming its `Method` subclass,

    [project.entry-points."semiseg.methods"]
    my-method = "my_lab_method:MyMethod"

and once the package is installed, `semiseg methods`, `semiseg train --method my-method` and the
plugin offer it (registered under the class's `name`). A network of its own the package registers
with `semiseg.networks.register_network` when its module is imported.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any

from semiseg.errors import InputError
from semiseg.methods.base import Method, NetworkSpec
from semiseg.methods.bcp import BidirectionalCopyPaste
from semiseg.methods.cps import CrossPseudoSupervision
from semiseg.methods.dk_uxnet import DKUXNet
from semiseg.methods.dual_subnet import DualSubnetContrastive
from semiseg.methods.mean_teacher import MeanTeacher
from semiseg.methods.supervised import Supervised
from semiseg.methods.sscl import SSCL
from semiseg.methods.three_d_cps import ThreeDCrossPseudoSupervision
from semiseg.methods.voxel_adversarial import VoxelAdversarial

METHODS: dict[str, type[Method]] = {m.name: m for m in (Supervised, MeanTeacher, CrossPseudoSupervision, DKUXNet, SSCL, ThreeDCrossPseudoSupervision, DualSubnetContrastive, VoxelAdversarial, BidirectionalCopyPaste)}


ENTRY_POINT_GROUP = "semiseg.methods"


def register_method(method: type[Method]) -> type[Method]:
    """Make a Method subclass trainable by its `name` (usable as a class decorator)."""
    if not (isinstance(method, type) and issubclass(method, Method)):
        raise TypeError(f"{method!r} is not a semiseg Method subclass")
    METHODS[method.name] = method
    return method


def _register_installed_methods() -> None:
    """The methods of installed packages (entry points of ENTRY_POINT_GROUP); a broken one is
    reported and skipped, never fatal to the built-in methods."""
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            register_method(entry.load())
        except Exception as error:  # a third-party package: any failure of its import is possible
            logging.getLogger(__name__).warning("method plugin '%s' (%s) not loaded: %s", entry.name, entry.value, error)


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise InputError(f"unknown method '{name}' (choose from: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def build_method(name: str, in_channels: int, num_classes: int, network: NetworkSpec, options: dict[str, Any] | None = None,
                 ignore_label: bool = False) -> Method:
    """The method `name`; `ignore_label`: it trains on labels with ignored voxels (IGNORE_INDEX)."""
    method = method_class(name)
    if not ignore_label:
        return method(in_channels, num_classes, network, options)
    if not method.handles_ignore_label:
        raise InputError(f"method '{name}' cannot train with an ignore label (partially annotated scans): it uses the "
                         "labels beyond its supervised loss; annotate the scans fully or choose another method")
    return method(in_channels, num_classes, network, options, ignore_label=True)


_register_installed_methods()
