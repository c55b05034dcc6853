"""Render screenshots of the napari plugin's widgets in use into docs/ (PNG).

    python scripts/screenshots.py [--checkpoint RUN/best] [--out docs]

Drives the real widgets on the bundled hippocampus sample as a user would: segments with a
reference (metrics, per-class volumes, error map), shows the uncertainty and goes to an uncertain
region, trains briefly, fine-tunes on a correction, ranks a folder of scans, exports; then opens
the sample CT of ../shared/data/samples (if present) in its CT window, with its segmentation and
Segment's time and memory estimate. Without --checkpoint it uses the bundled default model if
there is one, else trains a small mean-teacher model first (a few minutes on a CPU; kept in
runs/screenshot-model and reused). With DISPLAY unset it starts its own Xvfb.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "resources" / "hippocampus"
CT_SAMPLES = REPO.parent / "shared" / "data" / "samples"
WINDOW = (1440, 920)


def start_display() -> subprocess.Popen | None:
    if os.environ.get("DISPLAY"):
        return None
    if shutil.which("Xvfb") is None:
        sys.exit("screenshots: DISPLAY is unset and Xvfb is not installed (apt-get install xvfb libgl1-mesa-dri)")
    read_end, write_end = os.pipe()
    process = subprocess.Popen(["Xvfb", "-displayfd", str(write_end), "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
                               pass_fds=(write_end,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        number = pipe.readline().strip().decode()
    os.environ["DISPLAY"] = f":{number}"
    os.environ["QT_QPA_PLATFORM"] = "xcb"
    return process


def model_for_screenshots(requested: str | None) -> str:
    from semiseg.napari.checkpoints import default_model_path

    if requested:
        return requested
    if default_model_path() is not None:
        return str(default_model_path())
    run = REPO / "runs" / "screenshot-model"
    if not (run / "best" / "model.json").is_file():
        print("training a small model for the screenshots (a few minutes on a CPU)…", flush=True)
        subprocess.run([sys.executable, "-m", "semiseg.cli", "train", "--data", str(SAMPLE), "--method", "mean-teacher",
                        "--labeled", "50%", "--validation", "2", "--iterations", "300", "--validate-every", "50",
                        "--network-option", "base_filters=8", "--workers", "0", "--out", str(run), "--overwrite"], check=True)
    return str(run / "best")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="model to segment with (default: bundled, else trained here)")
    parser.add_argument("--out", default=str(REPO / "docs"), help="folder for the PNG files")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    display = start_display()
    scratch = Path(tempfile.mkdtemp(prefix="semiseg-screenshots-"))
    os.environ.setdefault("SEMISEG_CACHE", str(scratch / "cache"))
    os.environ["SEMISEG_CONFIG_DIR"] = str(scratch / "config")
    try:
        checkpoint = model_for_screenshots(args.checkpoint)
        return shoot(checkpoint, out, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if display is not None:
            display.terminate()


def shoot(checkpoint: str, out: Path, scratch: Path) -> int:
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from semiseg.checkpoint import read_meta
    from semiseg.napari.widgets.export import ExportWidget
    from semiseg.napari.widgets.finetune import FineTuneWidget
    from semiseg.napari.widgets.review import ReviewWidget
    from semiseg.napari.widgets.segment import SegmentWidget
    from semiseg.napari.widgets.train import TrainWidget

    def wait(condition, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("the widget did not finish in time")
            QApplication.processEvents()
            time.sleep(0.02)

    def settle(seconds: float = 0.5) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            QApplication.processEvents()
            time.sleep(0.02)

    viewer = napari.Viewer(title="napari-semiseg")
    window = viewer.window._qt_window
    window.resize(*WINDOW)
    docks = []

    def dock(widget, name: str):
        for old in docks:
            viewer.window.remove_dock_widget(old)
        docks.clear()
        docks.append(viewer.window.add_dock_widget(widget, name=name, area="right"))
        settle(0.3)
        return widget

    def save(name: str) -> None:
        settle(0.8)
        path = out / name
        viewer.screenshot(str(path), canvas_only=False, flash=False)
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)", flush=True)

    def show_slice(layer) -> None:
        data = np.asarray(layer.data)
        counts = (data > 0).sum(axis=(1, 2))
        viewer.dims.ndisplay = 2
        viewer.dims.set_current_step(0, int(counts.argmax()) if counts.any() else data.shape[0] // 2)
        viewer.reset_view()

    # 1. Segment, with the reference: prediction, metrics.
    image, label = viewer.open_sample("napari-semiseg", "hippocampus")
    segment = dock(SegmentWidget(viewer), "Segment")
    segment.model.choose(checkpoint)
    segment.device.combo.setCurrentText("cpu")
    segment.image.set_layer(image)
    segment.reference.set_layer(label)
    segment.buttons.start.click()
    wait(lambda: segment.job is not None and not segment.job.running)
    print(f"click to prediction: {segment.last_seconds:.2f} s", flush=True)
    label.visible = False
    viewer.layers[f"{image.name} errors"].visible = False
    show_slice(label)
    save("napari-segment.png")

    # 1b. An uncertain region chosen in the list: the view goes to it (entropy shown over the prediction).
    segment.regions.table.selectRow(0)
    viewer.scene.camera.zoom *= 2  # closer, around the region's centre
    viewer.layers[f"{image.name} entropy"].visible = True
    viewer.layers[f"{image.name} errors"].visible = False
    save("napari-regions.png")
    viewer.layers[f"{image.name} entropy"].visible = False
    segment.regions.table.clearSelection()
    show_slice(label)

    # 2. Error map against the reference (false positive, false negative, wrong class).
    viewer.layers[f"{image.name} prediction"].visible = False
    viewer.layers[f"{image.name} errors"].visible = True
    viewer.layers.selection.active = viewer.layers[f"{image.name} errors"]
    save("napari-errors.png")

    # 3. Uncertainty: the entropy map (magma, 0..1), over the scan.
    viewer.layers[f"{image.name} errors"].visible = False
    viewer.layers[f"{image.name} entropy"].visible = True
    viewer.layers[f"{image.name} entropy"].blending = "translucent"
    viewer.layers.selection.active = viewer.layers[f"{image.name} entropy"]
    save("napari-uncertainty.png")
    viewer.layers[f"{image.name} entropy"].visible = False
    viewer.layers[f"{image.name} entropy"].blending = "additive"
    viewer.layers[f"{image.name} prediction"].visible = True

    # 4. Train, caught while running: the screenshot model's run, resumed for 60 more iterations
    #    (its validation-Dice history comes back from the checkpoint), then left to finish.
    run = scratch / "runs" / "demo"
    source_run = Path(checkpoint).parent
    resumable = (source_run / "last" / "training.json").is_file()
    train = dock(TrainWidget(viewer), "Train")
    train.data.set_text(str(SAMPLE))
    wait(lambda: "labeled" in train.found.text(), 60)
    train.method.setCurrentText("mean-teacher")
    train.network_options.setText("base_filters=8" if resumable else "base_filters=4")
    train.labeled.setText("50%")
    train.workers.setValue(0)
    train.device.combo.setCurrentText("cpu")
    if resumable:
        shutil.copytree(source_run, run)
        previous = read_meta(run / "last")["iteration"]
        train.iterations.setValue(previous + 60)
        train.validate_every.setValue(20)
        train.resume.setChecked(True)
        shown_at = previous + 30
    else:
        train.iterations.setValue(60)
        train.validate_every.setValue(20)
        shown_at = 30
    train.output.set_text(str(run))
    train.buttons.start.click()
    wait(lambda: any(f"iteration {i}/" in train.buttons.status.text() for i in range(shown_at, shown_at + 20)))
    save("napari-train.png")
    wait(lambda: train.process is not None and not train.process.running and train.buttons.start.isEnabled())

    # 5. Fine-tune on a correction (the reference stands for the user's corrected mask).
    segment.model.choose(checkpoint)
    unlabeled = scratch / "unlabeled"
    unlabeled.mkdir()
    for path in sorted((SAMPLE / "imagesTs").iterdir())[:4]:
        shutil.copy(path, unlabeled / path.name)
    correction = viewer.add_labels(np.array(label.data), name="hippocampus_001 correction", affine=image.affine,
                                   metadata={**label.metadata, "role": "correction"}, opacity=0.6)
    finetune = dock(FineTuneWidget(viewer), "Fine-tune on correction")
    finetune.image.set_layer(image)
    finetune.labels.set_layer(correction)
    finetune.folder.set_text(str(unlabeled))
    finetune.iterations.setValue(20)
    finetune.device.combo.setCurrentText("cpu")
    finetune.output.set_text(str(scratch / "fine-tuning"))
    finetune.buttons.start.click()
    # Done when the guard's before/after panel shows and nothing runs any more (re-prediction included).
    wait(lambda: not finetune.guard.isHidden() and finetune.buttons.start.isEnabled() and not finetune.job.running)
    correction.visible = False
    save("napari-finetune.png")

    # 6. Review queue over the sample's unlabeled scans.
    for layer in viewer.layers:
        layer.visible = False
    segment.model.choose(checkpoint)
    review = dock(ReviewWidget(viewer), "Review queue")
    review.device.combo.setCurrentText("cpu")
    review.folder.set_text(str(SAMPLE / "imagesTs"))
    review.buttons.start.click()
    wait(lambda: review.job is not None and not review.job.running)
    opened = review.next()
    show_slice(viewer.layers[f"{opened.name} prediction"])
    save("napari-review.png")

    # 7. Export: the corrected and predicted label maps of both scans.
    export = dock(ExportWidget(viewer), "Export labels")
    export.folder.set_text(str(scratch / "export"))
    export.export_checked.click()
    save("napari-export.png")

    # 8. A CT (stored with flipped x and y axes) shown the right way up, in its soft-tissue window,
    #    with its segmentation on top; Segment offers the CT windows and estimates time and memory.
    viewer.close()
    if (CT_SAMPLES / "example_ct.nii.gz").is_file():
        viewer = napari.Viewer(title="napari-semiseg")  # a fresh window: nothing of the hippocampus left in it
        viewer.window._qt_window.resize(*WINDOW)
        docks.clear()
        [ct] = viewer.open(str(CT_SAMPLES / "example_ct.nii.gz"), plugin="napari-semiseg")
        segmented = viewer.open(str(CT_SAMPLES / "example_seg.nii.gz"), plugin="napari-semiseg")[0]
        segmented.opacity = 0.5
        segment = dock(SegmentWidget(viewer), "Segment")
        segment.model.choose(checkpoint)
        segment.device.combo.setCurrentText("cpu")
        segment.image.set_layer(ct)
        show_slice(segmented)
        save("napari-ct.png")
        viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
