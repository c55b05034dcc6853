"""Finding the labeled and unlabeled scans in a folder, and choosing the seeded split.

Layouts, detected automatically:
- MSD / nnU-Net: `imagesTr/` (+ `labelsTr/`), optional `imagesTs/` (unlabeled), class names (and
  nnU-Net v2's `"ignore"` label value) and channel names from `dataset.json`;
- plain: `images/` + `labels/` with matching names;
Several channels (multi-parametric MRI): one file per channel named as nnU-Net names them
(`case_0000`, `case_0001`, ...; the same rule in every layout, channel names and order from
dataset.json's `channel_names` or MSD's `modality`), or one 4D NIfTI per case (MSD BrainTumour).
- the LA benchmark tree: one folder per case holding `mri_norm2.h5` (`image` and `label`).
Images without a label are unlabeled; `extra_unlabeled` folders add more.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from semiseg.errors import InputError
from semiseg.io import is_dicom_folder, strip_suffix, volume_suffix

LA_FILE = "mri_norm2.h5"
LA_CLASS_NAMES = {0: "background", 1: "left atrium"}
_CHANNEL = re.compile(r"(.+)_(\d{4})")


@dataclass
class Case:
    case_id: str
    image: str  # the scan, or its first channel's file
    label: str | None = None  # a path; for h5 files the label is the same file's "label" dataset
    more_channels: tuple[str, ...] = ()  # the files of channels 1, 2, ... (nnU-Net's case_0001, ...)

    @property
    def has_label(self) -> bool:
        return self.label is not None

    @property
    def image_files(self) -> tuple[str, ...]:
        return (self.image, *self.more_channels)


@dataclass
class Dataset:
    root: str
    layout: str
    cases: list[Case]
    class_names: dict[int, str]
    modality: str = "MR"
    missing: list[str] = field(default_factory=list)  # ids listed by the dataset but absent on disk
    ignore_label: int | None = None  # the label value of unannotated voxels (dataset.json's "ignore")
    channel_names: tuple[str, ...] = ()  # dataset.json's, in channel order; () when it names none

    @property
    def labeled(self) -> list[Case]:
        return [c for c in self.cases if c.has_label]

    @property
    def unlabeled(self) -> list[Case]:
        return [c for c in self.cases if not c.has_label]

    def describe(self) -> str:
        names = ", ".join(f"{k}={v}" for k, v in sorted(self.class_names.items()))
        kind = f"channels {', '.join(self.channel_names)}" if len(self.channel_names) > 1 else f"modality {self.modality}"
        text = f"{self.layout} dataset: {len(self.labeled)} labeled, {len(self.unlabeled)} unlabeled; {kind}; classes {names}"
        if self.ignore_label is not None:
            text += f"; ignore label {self.ignore_label}"
        if self.missing:
            text += f"; {len(self.missing)} listed cases absent ({', '.join(self.missing[:3])}{'...' if len(self.missing) > 3 else ''})"
        return text


def load_dataset(root: str | os.PathLike, extra_unlabeled: list[str | os.PathLike] = ()) -> Dataset:
    """Detect the layout of `root` and list its cases; refuse a folder with no image."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder (give the dataset folder)")
    if (root / "imagesTr").is_dir():
        dataset = _msd(root)
    elif (root / "images").is_dir():
        dataset = _paired(root, root / "images", root / "labels", "images/labels")
    elif (root / LA_FILE).is_file() or any(_la_case_dirs(root)):
        dataset = _la(root)
    else:
        dataset = _paired(root, root, None, "flat folder")
    for folder in extra_unlabeled:
        dataset.cases += _unlabeled_in(Path(folder))
    _check_unique(dataset)
    _check_channels(dataset)
    if not dataset.cases:
        raise InputError(f"{root}: no images found (expected imagesTr/, images/, LA case folders, or volume files)")
    return dataset


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    found = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.name.startswith("."):
            continue
        if path.is_file() and volume_suffix(path) not in (None, ".h5"):
            found.append(path)
        elif path.is_dir() and not path.is_symlink() and is_dicom_folder(path):
            found.append(path)
    return found


def _unlabeled_in(folder: Path) -> list[Case]:
    """The scans of an extra unlabeled folder: volume files / DICOM series, or an LA h5 tree."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (give a folder of unlabeled scans)")
    cases = [_case(cid, files) for cid, files in sorted(files_by_case(_images_in(folder), folder).items())]
    if not cases:
        cases = [Case(p.parent.name, str(p)) for p in _la_case_dirs(folder)]
    if not cases:
        raise InputError(f"{folder}: no scans found in this unlabeled folder")
    return cases


def channel_name(stem: str) -> tuple[str, int] | None:
    """A name as nnU-Net names channel files, split: "case_0001" -> ("case", 1); None for another name."""
    match = _CHANNEL.fullmatch(stem)
    return (match[1], int(match[2])) if match else None


def _case_id(path: Path, stems: set[str] = frozenset(), labels: set[str] = frozenset()) -> tuple[str, int]:
    """Case id and channel index from an nnU-Net style name ("case_0000.nii.gz" -> ("case", 0)).

    A four-digit suffix is read as a channel only when the folder holds that case's channel 0
    (`stems`, the other names in the folder) and no label carries the full name: "case_0001"
    alone, or beside a label "case_0001", is a case id of its own.
    """
    stem = strip_suffix(path)
    named = channel_name(stem)
    if named is None:
        return stem, 0
    base, channel = named
    if stem in labels or (f"{base}_0000" not in stems and stem != f"{base}_0000"):
        return stem, 0
    return base, channel


def files_by_case(paths: list[Path], folder: Path, labels: set[str] = frozenset()) -> dict[str, list[Path]]:
    """Each case's files in channel order (one file for a single-channel scan)."""
    stems = {strip_suffix(p) for p in paths}
    channels: dict[str, dict[int, Path]] = {}
    for path in paths:
        case_id, channel = _case_id(path, stems, labels)
        found = channels.setdefault(case_id, {})
        if channel in found:
            raise InputError(f"{folder}: two scans for case '{case_id}' ({found[channel].name}, {path.name}); keep one")
        found[channel] = path
    result = {}
    for case_id, found in channels.items():
        gaps = sorted(set(range(max(found) + 1)) - set(found))
        if gaps:
            raise InputError(f"{folder}: case '{case_id}' has channel files up to _{max(found):04d} but not "
                             + ", ".join(f"_{g:04d}" for g in gaps))
        result[case_id] = [found[c] for c in sorted(found)]
    return result


def _case(case_id: str, files: list[Path], label: Path | None = None) -> Case:
    return Case(case_id, str(files[0]), str(label) if label else None, tuple(str(f) for f in files[1:]))


def _check_channels(dataset: Dataset) -> None:
    """Every case has the channels the dataset names (or, named nowhere, as many as the others),
    one file each; a scan in one 4D file is checked when it is read."""
    files = {c.case_id: len(c.image_files) for c in dataset.cases}
    named = len(dataset.channel_names) if len(dataset.channel_names) > 1 else 0
    expected = named or max(files.values(), default=1)
    if expected == 1:
        return
    one_file = {c.case_id: c.image for c in dataset.cases if not c.more_channels}
    for case_id, count in sorted(files.items()):
        if count != expected and not (case_id in one_file and _is_4d(one_file[case_id])):
            missing = [f"_{c:04d}" + (f" ({dataset.channel_names[c]})" if c < len(dataset.channel_names) else "")
                       for c in range(count, expected)]
            problem = f"lacks channel {', '.join(missing)}" if missing else f"has {count} channel files"
            raise InputError(f"{dataset.root}: case '{case_id}' {problem}; every case needs {expected} channels "
                             "(one file each, case_0000, case_0001, ..., or one 4D NIfTI)")


def _is_4d(path: str) -> bool:
    from semiseg.io import read_header_size

    size = read_header_size(path)
    return size is not None and len(size) == 4 and size[3] > 1


def _label_files(labels: Path | None) -> dict[str, Path]:
    if labels is None or not labels.is_dir():
        return {}
    result: dict[str, Path] = {}
    for path in _images_in(labels):
        name = strip_suffix(path)
        if name in result:
            raise InputError(f"{labels}: two labels for case '{name}' ({result[name].name}, {path.name}); keep one")
        result[name] = path
    return result


def _paired(root: Path, images: Path, labels: Path | None, layout: str) -> Dataset:
    label_files = _label_files(labels)
    image_files = files_by_case(_images_in(images), images, set(label_files))
    orphans = sorted(set(label_files) - set(image_files))
    if orphans:
        raise InputError(f"{labels}: labels without an image: {', '.join(orphans[:5])}")
    cases = [_case(cid, files, label_files.get(cid)) for cid, files in sorted(image_files.items())]
    names = channel_names_in(root)
    return Dataset(str(root), layout, cases, class_names_in(root), "CT" if names[:1] == ("CT",) else "MR",
                   ignore_label=ignore_label_in(root), channel_names=names)


def _msd(root: Path) -> Dataset:
    dataset = _paired(root, root / "imagesTr", root / "labelsTr", "MSD/nnU-Net")
    if (root / "imagesTs").is_dir():
        dataset.cases += [_case(cid, files) for cid, files in sorted(files_by_case(_images_in(root / "imagesTs"), root / "imagesTs").items())]
    return dataset


def _la_case_dirs(root: Path):
    return (p for p in sorted(root.rglob(LA_FILE)))


def _la(root: Path) -> Dataset:
    files = {p.parent.name: p for p in _la_case_dirs(root)}
    listed: list[str] = []
    for list_file in sorted(root.rglob("*.list")):
        text = list_file.read_text(errors="replace")
        listed += [line.strip() for line in text.splitlines() if line.strip()]
    missing = sorted(set(listed) - set(files))
    cases = [Case(cid, str(path), str(path)) for cid, path in sorted(files.items())]
    return Dataset(str(root), "LA h5", cases, dict(LA_CLASS_NAMES), "MR", missing)


def _dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object (with \"labels\" and \"modality\")")
    return data


IGNORE_NAME = "ignore"  # nnU-Net v2's name of the label value of unannotated voxels


def _labels_by_value(root: Path) -> dict[int, str]:
    """The "labels" map of a dataset.json as {value: name}, ignore label included."""
    labels = _dataset_json(root).get("labels")
    if isinstance(labels, dict) and labels:
        # nnU-Net v1 writes {"0": "background"}; v2 writes {"background": 0}.
        if all(str(k).strip().isdigit() for k in labels):
            return {int(k): str(v) for k, v in labels.items()}
        return {int(v): str(k) for k, v in labels.items() if isinstance(v, int)}
    return {}


def class_names_in(root: str | os.PathLike) -> dict[int, str]:
    """Class names from the dataset.json of a dataset folder, without the ignore label; {} when it
    names none (they are then filled from the label values when the cases are preprocessed)."""
    return {value: name for value, name in _labels_by_value(Path(root)).items() if name != IGNORE_NAME}


def ignore_label_in(root: str | os.PathLike) -> int | None:
    """The value dataset.json's "labels" names "ignore" (nnU-Net v2: unannotated voxels), or None."""
    return next((value for value, name in _labels_by_value(Path(root)).items() if name == IGNORE_NAME), None)


def _dataset_folder_near(path: str | os.PathLike) -> Path | None:
    """The folder of the dataset holding a file: dataset.json beside it or one folder up (imagesTr/, labelsTr/)."""
    path = Path(path)
    return next((folder for folder in (path.parent, path.parent.parent) if (folder / "dataset.json").is_file()), None)


def class_names_near(label_path: str | os.PathLike) -> dict[int, str] | None:
    """Class names for a label file: those of the dataset holding it, else None."""
    folder = _dataset_folder_near(label_path)
    try:
        return (class_names_in(folder) or None) if folder is not None else None
    except InputError:
        return None


def channel_names_near(scan_path: str | os.PathLike) -> tuple[str, ...]:
    """Channel names for a scan file: those of the dataset holding it, else () (also for an unreadable dataset.json)."""
    folder = _dataset_folder_near(scan_path)
    try:
        return channel_names_in(folder) if folder is not None else ()
    except InputError:
        return ()


def image_for_label(label_path: str | os.PathLike) -> Path | None:
    """The scan of a label in an MSD/nnU-Net or images/labels tree (labelsTr/x.nii.gz ->
    imagesTr/x.nii.gz or imagesTr/x_0000.nii.gz), if it is there."""
    path = Path(label_path)
    folder = path.parent
    if not folder.name.lower().startswith("label"):
        return None
    stem, suffix = strip_suffix(path), volume_suffix(path) or ""
    images = folder.parent / ("images" + folder.name[len("labels"):])
    for candidate in (images / f"{stem}{suffix}", images / f"{stem}_0000{suffix}"):
        if candidate.is_file():
            return candidate
    return None


def case_id_of(path: str | os.PathLike) -> str:
    """The case id a scan's path gives: its name without suffix or channel (case_0000.nii.gz ->
    case), or, for an LA h5 file, the name of its case folder."""
    path = Path(path)
    return path.parent.name if path.name == LA_FILE else _case_id(path)[0]


def channel_files(first: str | os.PathLike) -> list[Path]:
    """A scan's channel files from its first one (case_0000.nii.gz -> case_0001.nii.gz, ... beside it)."""
    first = Path(first)
    stem = strip_suffix(first)
    if not stem.endswith("_0000"):
        return [first]
    suffix = first.name[len(stem):]
    files = [first]
    while (following := first.with_name(f"{stem[:-5]}_{len(files):04d}{suffix}")).exists():
        files.append(following)
    return files


def case_of_files(image: str | os.PathLike, label: str | os.PathLike | None = None) -> Case:
    """A case given by its files: the scan (its first channel's file brings the channel files beside it)
    and its label map."""
    more = tuple(str(path) for path in channel_files(image)[1:])
    return Case(case_id_of(label or image), str(image), None if label is None else str(label), more)


def channel_names_in(root: str | os.PathLike) -> tuple[str, ...]:
    """The channel names of dataset.json (nnU-Net v2 `channel_names`, MSD `modality`: {"0": "T2",
    "1": "ADC"}) in channel order, "CT" spelt as such; () when it names none."""
    data = _dataset_json(Path(root))
    names = data.get("channel_names") or data.get("modality") or {}
    if not isinstance(names, dict) or not all(str(k).strip().isdigit() for k in names):
        return ()
    ordered = [str(names[k]).strip() for k in sorted(names, key=lambda k: int(str(k)))]
    return tuple("CT" if name.upper() == "CT" else name for name in ordered)


def _check_unique(dataset: Dataset) -> None:
    seen: set[str] = set()
    for case in dataset.cases:
        if case.case_id in seen:
            raise InputError(f"two scans share the case id '{case.case_id}' ({dataset.root}); rename one")
        seen.add(case.case_id)


@dataclass
class Split:
    """Which cases train with labels, which train without, which validate; recorded in checkpoints."""

    labeled: list[str]
    unlabeled: list[str]
    validation: list[str]
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


_NUMBER = re.compile(r"^\s*(\d+(\.\d*)?|\.\d+)\s*%?\s*$")


def _count(spec: str | int | float, total: int, what: str) -> int:
    text = str(spec).strip()
    if not _NUMBER.match(text) or (not text.endswith("%") and "." in text):
        raise InputError(f"{what} '{spec}': give a count (8), a percentage (10%) or an existing list file of case ids")
    if text.endswith("%"):
        percent = float(text[:-1])
        if percent > 100:
            raise InputError(f"{what} '{spec}': a percentage must be within 0..100%")
        count = round(total * percent / 100)
    else:
        count = int(text)
    if not 0 <= count <= total:
        raise InputError(f"{what} '{spec}' asks for more than the {total} labeled cases available")
    return count


def _listed(spec: str, dataset: Dataset, what: str) -> list[str] | None:
    """The case ids of a list file, or None when spec is a count or a percentage."""
    if _NUMBER.match(str(spec)):
        return None
    path = Path(str(spec))
    if not path.is_file():
        return None
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text file of case ids, one a line") from None
    ids = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    if not ids:
        raise InputError(f"{path}: the {what} list file names no case")
    known = {c.case_id for c in dataset.labeled}
    absent = [i for i in ids if i not in known]
    if absent:
        raise InputError(f"{path}: {len(absent)} {what} ids are not labeled cases here: {', '.join(absent[:5])}")
    return ids


def choose_split(dataset: Dataset, labeled: str | int = "100%", validation: str | int = 0, seed: int = 0) -> Split:
    """Seeded split: validation drawn from the labeled cases first, then the labeled subset from the
    rest (a count, a percentage of what remains, or a list file); every other scan is unlabeled."""
    candidates = sorted(c.case_id for c in dataset.labeled)
    if not candidates:
        raise InputError(f"{dataset.root}: no labeled case (training needs at least one image with a label)")
    rng = random.Random(seed)
    order = candidates[:]
    rng.shuffle(order)
    validation_ids = _listed(str(validation), dataset, "validation")
    if validation_ids is None:
        validation_ids = sorted(order[: _count(validation, len(order), "validation")])
    remaining = [c for c in order if c not in set(validation_ids)]
    labeled_ids = _listed(str(labeled), dataset, "labeled")
    if labeled_ids is None:
        labeled_ids = sorted(remaining[: _count(labeled, len(remaining), "labeled")])
    overlap = set(labeled_ids) & set(validation_ids)
    if overlap:
        raise InputError(f"cases both labeled and validation: {', '.join(sorted(overlap)[:5])}")
    if not labeled_ids:
        if not remaining:
            raise InputError(f"validation '{validation}' takes all {len(candidates)} labeled cases; none is left to train on")
        raise InputError(f"the labeled subset '{labeled}' is empty; ask for at least one labeled case")
    taken = set(labeled_ids) | set(validation_ids)
    unlabeled_ids = sorted(c.case_id for c in dataset.cases if c.case_id not in taken)
    return Split(labeled_ids, unlabeled_ids, validation_ids, seed)


def select_split(dataset: Dataset, labeled: str | int | list = "100%", validation: str | int | list = 0,
                 unlabeled: list | None = None, seed: int = 0) -> Split:
    """The split of a training run: drawn by `choose_split` from counts, percentages or list files,
    or given case by case. Given cases are lists whose entries are case ids of the dataset, image
    paths (unlabeled) or [image, label] path pairs (labeled); the paths not in the dataset are
    added to it. `unlabeled=None`: every scan neither labeled nor validation trains unlabeled."""
    explicit = isinstance(labeled, list) or isinstance(validation, list) or unlabeled is not None
    if not explicit:
        return choose_split(dataset, labeled, validation, seed)
    if not isinstance(labeled, list):
        raise InputError("with the validation or unlabeled cases given one by one, give the labeled cases as a list too")
    labeled_ids = [_register(dataset, entry) for entry in labeled]
    if not labeled_ids:
        raise InputError("the list of labeled cases is empty; give at least one labeled case")
    if isinstance(validation, list):
        validation_ids = [_register(dataset, entry) for entry in validation]
    elif str(validation).strip() in ("0", "0%"):
        validation_ids = []
    else:
        raise InputError(f"validation '{validation}': with the labeled cases given one by one, give the validation cases as a list")
    by_id = {c.case_id: c for c in dataset.cases}
    unlabeled_of_labeled = [i for i in labeled_ids + validation_ids if not by_id[i].has_label]
    if unlabeled_of_labeled:
        raise InputError(f"cases given as labeled or validation have no label: {', '.join(unlabeled_of_labeled[:5])}")
    overlap = set(labeled_ids) & set(validation_ids)
    if overlap:
        raise InputError(f"cases both labeled and validation: {', '.join(sorted(overlap)[:5])}")
    taken = set(labeled_ids) | set(validation_ids)
    if unlabeled is None:
        unlabeled_ids = sorted(c.case_id for c in dataset.cases if c.case_id not in taken)
    else:
        unlabeled_ids = [_register(dataset, entry) for entry in unlabeled]
    return Split(labeled_ids, unlabeled_ids, validation_ids, seed)


def _register(dataset: Dataset, entry: str | list[str] | tuple[str, str]) -> str:
    """The case id of a case given by id, image path or [image, label] pair; adds path cases to
    the dataset (a path the dataset already holds under that id is the same case)."""
    by_id = {c.case_id: c for c in dataset.cases}
    if isinstance(entry, str) and entry in by_id:
        return entry
    if isinstance(entry, str):
        image, label = entry, None
    elif len(entry) == 2:
        image, label = (str(part) for part in entry)
    else:
        raise InputError(f"case {entry!r}: give a case id, an image path or an [image, label] pair")
    if not Path(image).exists():
        raise InputError(f"{image}: no such case id in {dataset.root} and no such file")
    case = case_of_files(image, label)
    known = by_id.get(case.case_id)
    if known is None:
        dataset.cases.append(case)
    elif not same_file(known.image, image) or (label is not None and known.label is not None and not same_file(known.label, label)):
        raise InputError(f"{image}: its case id '{case.case_id}' is another scan's in {dataset.root}; rename one")
    elif label is not None and known.label is None:
        known.label = label  # a scan of the folder given with its label: that case trains labeled
    return case.case_id


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (links and relative paths resolved)."""
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False
