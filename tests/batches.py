"""Small random batches for unit tests of methods (no data files)."""

from __future__ import annotations

import torch


def tiny_batch(num_classes: int = 3, size: int = 16) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A seeded (labeled, unlabeled) pair of batches of two size³ patches."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, 1, size, size, size, generator=generator)
    label = torch.randint(0, num_classes, (2, 1, size, size, size), generator=generator)
    return {"image": image, "label": label}, {"image": torch.randn(2, 1, size, size, size, generator=generator)}
