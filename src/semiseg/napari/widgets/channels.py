"""The rows of a form that choose the image layer of each further channel of a model of several
(multi-parametric MRI), shared by Segment and Fine-tune."""

from __future__ import annotations

from pathlib import Path

from napari.layers import Image

from semiseg.datasets import channel_name
from semiseg.errors import InputError
from semiseg.io import Volume, stack_channels, strip_suffix
from semiseg.napari.checkpoints import read_record_or_none
from semiseg.napari.layers import volume_from_layer
from semiseg.napari.widgets.common import LayerChoice, later
from semiseg.napari.widgets.display import is_scan


def channel_of(layer) -> tuple[tuple[str, str], int] | None:
    """Which scan a layer is a channel of, and which channel: its 4D file's (recorded by the reader), else
    its nnU-Net channel file's name (folder/case_0001.nii.gz -> folder/case, 1), else its layer name
    (case_0001 -> case, 1); None for none. The file comes before the layer name, which napari changes
    ('case_0001 [1]') when the same file is opened twice."""
    source = layer.metadata.get("source_path")
    if "channel" in layer.metadata:
        return ("file", str(source)), int(layer.metadata["channel"])
    if source:
        named = channel_name(strip_suffix(source))
        return (("files", str(Path(source).parent / named[0])), named[1]) if named else None
    named = channel_name(layer.name)
    return (("name", named[0]), named[1]) if named else None


class ChannelRows:
    """One layer choice per channel after the first of the chosen model, inserted below the scan's row.
    Each is set to the scan file's layer of that channel (a 4D NIfTI opens as one layer per channel), else
    filled with a layer named for the channel (case_0001, or 'ADC' in its name)."""

    def __init__(self, viewer, form, scan: LayerChoice, model) -> None:
        self.viewer = viewer
        self.form = form
        self.scan = scan
        self.model = model
        self.rows: list[tuple[str, LayerChoice]] = []
        # A file's channels arrive one layer at a time: look again once the choices have them all.
        self.timer = later(form.parentWidget(), self.preselect, 0)
        viewer.layers.events.inserted.connect(self._layer_added)

    def _layer_added(self, event=None) -> None:
        try:
            self.timer.start()
        except RuntimeError:  # the widget is closed; the viewer outlives it
            self.viewer.layers.events.inserted.disconnect(self._layer_added)

    def names(self) -> tuple[str, ...]:
        """The chosen model's channel names; () for a model of one channel (or none chosen)."""
        record = read_record_or_none(self.model.path())
        return tuple(record.plan.channel_names) if record is not None and record.plan.channel_names else ()

    def model_chosen(self, *args) -> None:
        try:
            for _, choice in self.rows:
                self.form.removeRow(choice)
        except RuntimeError:  # the widget is closed; the session that signals outlives it
            return
        self.rows = []
        names = self.names()
        scan_row = self.form.getWidgetPosition(self.scan)[0]
        for index, name in enumerate(names[1:], start=1):
            choice = LayerChoice(self.viewer, Image, none_text="choose…", accept=is_scan)
            choice.setToolTip(f"The image layer holding this model's channel {index} ('{name}'), on the scan's grid")
            self.form.insertRow(scan_row + index, f"{name} (ch. {index})", choice)
            self.rows.append((name, choice))
        self.form.labelForField(self.scan).setText(f"Scan ({names[0]})" if names else "Scan")
        self.preselect()

    def preselect(self, *args) -> None:
        """A scan that is a later channel of its file gives way to the file's first channel."""
        scan = self.scan.layer()
        if self.rows and scan is not None and (channel_of(scan) or ("", 0))[1] != 0:
            first = self._sibling(scan, 0)
            if first is not None:
                self.scan.set_layer(first)  # the scan's change signal brings its owner back here
                return
        for index, (name, choice) in enumerate(self.rows, start=1):
            sibling = self._sibling(scan, index) if scan is not None else None
            if sibling is not None:
                choice.set_layer(sibling)  # the scan's own file holds this channel: never another scan's layer
                continue
            if choice.layer() is not None:
                continue
            match = next((layer for layer in choice.layers() if layer is not scan
                          and (layer.name.endswith(f"_{index:04d}") or name.lower() in layer.name.lower())), None)
            if match is not None:
                choice.set_layer(match)

    def _sibling(self, scan, index: int):
        """The layer of channel `index` of the same scan as `scan`, if open: read from the same 4D file, or
        named as nnU-Net names channel files (case_0000, case_0001, ...). Of a scan opened twice, the copy
        opened with it: a file's channels are added in order, so the nearest on the side its index says."""
        scan_of = channel_of(scan)
        if scan_of is None:
            return None
        siblings = [layer for layer in self.scan.layers() if channel_of(layer) == (scan_of[0], index)]
        position = {id(layer): number for number, layer in enumerate(self.viewer.layers)}

        def remoteness(layer) -> tuple[bool, int]:
            offset = position.get(id(layer), 0) - position.get(id(scan), 0)
            return (offset > 0) != (index > scan_of[1]), abs(offset)

        return min(siblings, key=remoteness, default=None)

    def volume(self, scan) -> Volume:
        """The scan layer, stacked with the layers chosen for the model's other channels; a channel
        of a 4D file chosen in another channel's place is refused."""
        if not self.rows:
            return volume_from_layer(scan)
        layers = [scan]
        for name, choice in self.rows:
            if choice.layer() is None:
                raise InputError(f"this model takes {len(self.rows) + 1} channels: choose the layer of its '{name}' channel")
            layers.append(choice.layer())
        names = self.names()
        for index, layer in enumerate(layers):
            recorded = layer.metadata.get("channel")
            if recorded is not None and recorded != index:
                raise InputError(f"'{layer.name}' is channel {recorded} of its file, chosen as this model's channel {index} "
                                 f"('{names[index]}'); choose its channel {index}")
        return stack_channels([volume_from_layer(layer) for layer in layers], [f"'{layer.name}'" for layer in layers])

    def source_path(self, scan) -> str | None:
        """The file that holds exactly what `volume` gives: the scan's own file for a model of one channel
        and a scan that is a whole file; else None (the trainer then needs a copy)."""
        if self.rows or "channel" in scan.metadata:
            return None
        return scan.metadata.get("source_path")
