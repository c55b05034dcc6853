"""The dock widgets, one module each, thin over the Qt-free logic beside them.

Widgets (Qt): `segment` (Segment, with the `regions` list of uncertain places), `train` (Train),
`finetune` (Fine-tune on correction), `review` (Review queue), `export` (Export labels).
Shared by them (Qt): `session_view` (the model picker over the window's one `Session`),
`training_view` (the live view of a training process that Train and Fine-tune both follow),
`common` (pickers, forms, job buttons, the background-job runner, the Dice sparkline).
Without Qt (tested without a display): `display` (putting a segmentation into the viewer; which
layers are scans), `formatting` (durations, one-line messages, run folder names).

`napari.yaml` names each widget class by its module, so napari imports only the one it shows.
"""
