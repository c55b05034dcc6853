"""Run one training in its own process for the napari plugin: `python -m semiseg.napari.train_runner CONFIG.json`.

CONFIG.json holds `semiseg.config.TrainConfig.to_dict()`. Every trainer event is printed to
stdout as one JSON line (the trainer also appends it to OUT/log.jsonl); a user error ends with an
{"type": "error"} line and exit status 2. Stopping is clean -- the trainer finishes its iteration
and saves OUT/last (and OUT/best if there is none) -- on any of: a line "stop" on stdin, stdin
closing (the plugin's process went away), or SIGINT (Ctrl-C, like the CLI).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import traceback
from pathlib import Path


def _emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event, default=str) + "\n")
    sys.stdout.flush()


def load_config(path: str | Path):
    from semiseg.config import TrainConfig

    return TrainConfig.from_dict(json.loads(Path(path).read_text()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m semiseg.napari.train_runner CONFIG.json", file=sys.stderr)
        return 2
    stop = threading.Event()

    def watch_stdin() -> None:
        try:
            for line in sys.stdin:
                if line.strip() == "stop":
                    break
        except (OSError, ValueError):
            pass
        stop.set()

    if sys.stdin is not None and not sys.stdin.isatty():
        threading.Thread(target=watch_stdin, name="semiseg-stop-watch", daemon=True).start()
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())

    from semiseg.errors import SemisegError

    try:
        config = load_config(argv[0])
        _emit({"type": "process", "pid": __import__("os").getpid(), "output": config.output})
        from semiseg.training import train

        best = train(config, _emit, stop.is_set)
    except SemisegError as error:
        _emit({"type": "error", "message": " ".join(str(error).split())})
        return 2
    except MemoryError:
        _emit({"type": "error", "message": "out of memory (lower the batch or patch size, or use smaller scans)"})
        return 2
    except Exception as error:  # a bug or an environment problem: full details on stderr
        traceback.print_exc()
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        if "out of memory" in message.lower():
            message = "out of GPU memory; lower the batch or patch size, or train on the CPU"
            _emit({"type": "error", "message": message})
            return 2
        _emit({"type": "error", "message": message, "crash": True})
        return 1
    _emit({"type": "finished", "checkpoint": str(best), "stopped": stop.is_set()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
