"""semiseg: semi-supervised 3D medical image segmentation (engine package, no GUI imports)."""

__version__ = "0.1.0"
