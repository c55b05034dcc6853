"""The bundled default model on the bundled sample, for tests that need a good model whose
held-out case is on disk."""

from __future__ import annotations

import json
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "resources" / "hippocampus"
DEFAULT_MODEL = ROOT / "resources" / "models" / "default"
HELD_OUT = "hippocampus_015"  # one of the default model's validation cases, and a labeled case of the sample


def sample_pair(case_id: str) -> tuple[str, str]:
    """A labeled case of the bundled sample as (scan, label) files."""
    return str(SAMPLE / "imagesTr" / f"{case_id}.nii.gz"), str(SAMPLE / "labelsTr" / f"{case_id}.nii.gz")


def make_sample_model(tmp_path: Path) -> Path:
    """The bundled model (trained on 180 hippocampus cases, validated on 20), its record cut down to the cases
    the sample holds and pointing at a copy of them: 11 labeled training cases, HELD_OUT its validation case."""
    data = tmp_path / "model-data"
    training = sorted(p.name[: -len(".nii.gz")] for p in (SAMPLE / "labelsTr").glob("*.nii.gz") if HELD_OUT not in p.name)
    for case_id in [*training, HELD_OUT]:
        for folder, path in zip(("images", "labels"), sample_pair(case_id)):
            (data / folder).mkdir(parents=True, exist_ok=True)
            (data / folder / Path(path).name).symlink_to(path)
    checkpoint = tmp_path / "model"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").symlink_to(DEFAULT_MODEL / "model.safetensors")
    meta = json.loads((DEFAULT_MODEL / "model.json").read_text())
    assert set(training) <= set(meta["split"]["labeled"]) and HELD_OUT in meta["split"]["validation"]
    meta["data"] = str(data)
    meta["split"] = {"labeled": training, "unlabeled": [], "validation": [HELD_OUT], "seed": 0}
    (checkpoint / "model.json").write_text(json.dumps(meta))
    return checkpoint
