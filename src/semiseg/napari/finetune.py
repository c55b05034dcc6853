"""The Fine-tune widget's names for the engine's fine-tuning (`semiseg.finetuning`)."""

from __future__ import annotations

from typing import Any

from semiseg import finetuning
from semiseg.finetuning import check_labels, finetune_config, image_on_disk, save_correction

__all__ = ["FineTuneRequest", "check_labels", "finetune_config", "image_on_disk", "save_correction"]


def FineTuneRequest(*, use_folder_labels: bool = True, **fields: Any) -> finetuning.FineTuneRequest:  # noqa: N802 (the widget's constructor)
    """The widget's request: its "also train on labeled scans" box switches the recipe's replay."""
    return finetuning.FineTuneRequest(replay=use_folder_labels, **fields)
