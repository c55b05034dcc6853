"""The napari plugin of semiseg: reader, writer, sample data and dock widgets over the same engine
as the `semiseg` CLI. The manifest is `napari.yaml` in this folder.

Modules without Qt (importable and testable on their own): `layers` (layer <-> volume with the
scan's geometry, error maps, metrics), `placement` (napari's affine from a scan's geometry, which
scan grid a layer lies on), `session` (what the widgets of one window share), `checkpoints`
(finding, verifying, describing and caching models), `jobs` (segmentation with progress and
cancellation), `training_process` (training in a separate process), `preflight` (checks before a
training starts), `finetune`, `review`, `export`. The Qt widgets are in `widgets`.
"""
