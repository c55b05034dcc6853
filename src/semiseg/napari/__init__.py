"""The napari plugin of semiseg: reader, writer, sample data and dock widgets over the same engine
as the `semiseg` CLI. The manifest is `napari.yaml` in this folder.

Modules without Qt (importable and testable on their own): `layers` (layer <-> volume with the
scan's geometry, error maps, metrics), `placement` (napari's affine from a scan's geometry, which
scan grid a layer lies on, bringing a scan into view), `windows` (CT display windows), `session`
(what the widgets of one window share), `checkpoints` (finding, verifying, describing and caching
models), `jobs` (segmentation with progress, ETA, estimate and cancellation), `training_process`
(training in a separate process), `preflight` (checks before a training starts), `finetune`,
`review`, `export`. The dock widgets are the package `widgets`, one module each.
"""
