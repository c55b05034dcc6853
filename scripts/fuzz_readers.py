"""Fuzz the volume readers with byte mutations of real files, for a bounded time.

Seeds: one bundled hippocampus MRI written as .nii, .nii.gz, .nrrd and .mha, and an LA-style .h5.
Each mutant (bit flips, overwritten bytes in the header region, truncation, inserted or deleted
bytes) is read with `semiseg.io.read_volume`. Acceptable outcomes: a valid 3D volume (finite
values, positive spacing) or `InputError`. Anything else is a finding: another exception, or the
process dying (ITK can abort), which the parent detects from the child's exit signal and the
mutant left on disk.

  python scripts/fuzz_readers.py --seconds 60 --out fuzz-findings
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED_IMAGE = ROOT / "resources" / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".h5")


def make_seeds(folder: Path) -> dict[str, bytes]:
    import h5py

    from semiseg.io import read_volume, write_volume

    volume = read_volume(SEED_IMAGE)
    seeds = {}
    for suffix in SUFFIXES[:-1]:
        path = write_volume(volume, folder / f"seed{suffix}")
        seeds[suffix] = path.read_bytes()
    with h5py.File(folder / "seed.h5", "w") as handle:
        handle["image"] = volume.array.T.astype("float32")  # the LA files store x, y, z
        handle["label"] = (volume.array.T > volume.array.mean()).astype("uint8")
    seeds[".h5"] = (folder / "seed.h5").read_bytes()
    return seeds


def mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    kind = rng.choice(["flip", "header", "truncate", "insert", "delete", "splice"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            position = rng.randrange(len(data))
            data[position] ^= 1 << rng.randrange(8)
    elif kind == "header":  # sizes, datatypes, spacings live in the first few hundred bytes
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(min(len(data), 600))
            data[position] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
    elif kind == "truncate":
        del data[rng.randrange(len(data)):]
    elif kind == "insert":
        position = rng.randrange(len(data))
        data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == "delete":
        position = rng.randrange(len(data))
        del data[position:position + rng.randint(1, 64)]
    else:  # a text header line replaced (NRRD/MHA headers are text)
        lines = bytes(data).split(b"\n")
        index = rng.randrange(min(len(lines), 12))
        lines[index] = rng.choice([b"sizes: 99999 99999 99999", b"DimSize = 0 0 0", b"type: complex", b"dimension: 7",
                                   b"ElementType = MET_UNKNOWN", b"space directions: none", b"encoding: bzip2", b""])
        data = bytearray(b"\n".join(lines))
    return bytes(data)


def check(path: Path) -> str:
    """'ok', 'refused' or 'bug: ...' for one file."""
    import numpy as np

    from semiseg.errors import InputError
    from semiseg.io import read_volume

    try:
        volume = read_volume(path)
    except InputError:
        return "refused"
    except Exception as error:  # noqa: BLE001 - every other exception is a finding
        return f"bug: {type(error).__name__}: {error}\n{traceback.format_exc(limit=4)}"
    if volume.array.ndim != 3 or not np.isfinite(volume.array).all() or min(volume.geometry.spacing) <= 0:
        return f"bug: accepted an invalid volume {volume.array.shape}, spacing {volume.geometry.spacing}"
    return "ok"


def worker(seeds: dict[str, bytes], folder: str, seed: int, deadline: float, results) -> None:
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    findings = []
    tried = 0
    while time.time() < deadline:
        suffix = rng.choice(SUFFIXES)
        path = Path(folder) / f"current{suffix}"
        path.write_bytes(mutate(seeds[suffix], rng))
        (Path(folder) / "current.json").write_text(json.dumps({"file": str(path)}))
        outcome = check(path)
        tried += 1
        key = outcome if not outcome.startswith("bug") else "bug"
        counts[f"{suffix} {key}"] = counts.get(f"{suffix} {key}", 0) + 1
        if outcome.startswith("bug"):
            kept = Path(folder) / f"finding-{len(findings)}{suffix}"
            kept.write_bytes(path.read_bytes())
            findings.append({"file": str(kept), "outcome": outcome})
        path.unlink()
    results.put({"tried": tried, "counts": counts, "findings": findings})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="folder to keep findings in (default: a temporary one)")
    args = parser.parse_args()
    folder = args.out or Path(tempfile.mkdtemp(prefix="semiseg-fuzz-"))
    folder.mkdir(parents=True, exist_ok=True)
    seeds = make_seeds(folder)
    deadline = time.time() + args.seconds
    context = multiprocessing.get_context("spawn")
    summary = {"tried": 0, "counts": {}, "findings": [], "crashes": []}
    seed = args.seed
    while time.time() < deadline:  # a child that dies is replaced, its input kept as a crash
        results = context.Queue()
        child = context.Process(target=worker, args=(seeds, str(folder), seed, deadline, results))
        child.start()
        child.join()
        if child.exitcode == 0:
            part = results.get()
            summary["tried"] += part["tried"]
            summary["findings"] += part["findings"]
            for key, count in part["counts"].items():
                summary["counts"][key] = summary["counts"].get(key, 0) + count
        else:
            current = json.loads((folder / "current.json").read_text())["file"]
            kept = folder / f"crash-{len(summary['crashes'])}{Path(current).suffix}"
            Path(current).rename(kept)
            summary["crashes"].append({"file": str(kept), "exit": child.exitcode})
        seed += 1
    print(json.dumps(summary, indent=1))
    return 1 if summary["findings"] or summary["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
