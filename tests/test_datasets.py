"""Dataset layout detection (MSD, images/labels, LA h5 tree, flat folder) and the seeded split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from semiseg.datasets import (
    LA_FILE, Case, Dataset, Split, case_id_of, choose_split, class_names_near, image_for_label, load_dataset, select_split,
)
from semiseg.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "resources" / "hippocampus"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LA = DATA / "la"


def write(path: Path, shape=(4, 5, 6), value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.full(shape, value, np.int16)), str(path))
    return path


def ids(cases: list[Case]) -> list[str]:
    return [c.case_id for c in cases]


# Layouts -----------------------------------------------------------------------------------------

def test_bundled_sample_is_msd_with_labeled_and_unlabeled_cases():
    dataset = load_dataset(SAMPLE)
    assert dataset.layout == "MSD/nnU-Net"
    assert len(dataset.labeled) == 12 and len(dataset.unlabeled) == 8
    expected_labeled = sorted(p.name[: -len(".nii.gz")] for p in (SAMPLE / "imagesTr").glob("*.nii.gz"))
    expected_unlabeled = sorted(p.name[: -len(".nii.gz")] for p in (SAMPLE / "imagesTs").glob("*.nii.gz"))
    assert ids(dataset.labeled) == expected_labeled
    assert ids(dataset.unlabeled) == expected_unlabeled
    for case in dataset.labeled:
        assert Path(case.label) == SAMPLE / "labelsTr" / Path(case.image).name
    assert dataset.class_names == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert dataset.modality == "MR"
    assert dataset.missing == []
    assert "12 labeled, 8 unlabeled" in dataset.describe()
    assert "1=Anterior" in dataset.describe()


def test_images_labels_layout_with_channel_suffix_and_an_unlabeled_image(tmp_path):
    for case in ("a", "b", "c"):
        write(tmp_path / "images" / f"{case}_0000.nii.gz")
    for case in ("a", "b"):
        write(tmp_path / "labels" / f"{case}.nii.gz")
    dataset = load_dataset(tmp_path)
    assert dataset.layout == "images/labels"
    assert ids(dataset.labeled) == ["a", "b"]
    assert ids(dataset.unlabeled) == ["c"]
    assert Path(dataset.unlabeled[0].image).name == "c_0000.nii.gz"
    assert Path(dataset.labeled[1].label) == tmp_path / "labels" / "b.nii.gz"
    assert dataset.class_names == {}  # no dataset.json: taken from the label values later


def test_dataset_json_in_nnunet_v2_form_gives_class_names_and_ct(tmp_path):
    write(tmp_path / "imagesTr" / "x_0000.nii.gz")
    write(tmp_path / "labelsTr" / "x.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}, "channel_names": {"0": "CT"}}))
    dataset = load_dataset(tmp_path)
    assert dataset.class_names == {0: "background", 1: "liver"}
    assert dataset.modality == "CT"


def test_four_digit_case_numbers_are_not_mistaken_for_channels(tmp_path):
    # "case_0001" with a label of the same name is a case id, not channel 1 of "case".
    for number in ("0001", "0002"):
        write(tmp_path / "images" / f"case_{number}.nii.gz")
        write(tmp_path / "labels" / f"case_{number}.nii.gz")
    assert ids(load_dataset(tmp_path).labeled) == ["case_0001", "case_0002"]


@pytest.fixture(scope="module")
def la_root() -> Path:
    if not (LA / "2018LA_Seg_Training Set").is_dir():
        pytest.skip(f"LA data not found at {LA}")
    return LA


def test_la_tree_lists_present_cases_and_reports_absent_listed_ids(la_root):
    present = sorted(p.parent.name for p in la_root.rglob("mri_norm2.h5"))
    listed = set()
    for name in ("train.list", "test.list", "train_first40.list"):
        listed |= {line.strip() for line in (la_root / name).read_text().splitlines() if line.strip()}
    assert len(present) >= 60 and len(listed) == 100

    dataset = load_dataset(la_root)
    assert dataset.layout == "LA h5"
    assert ids(dataset.cases) == present
    assert all(c.has_label and c.label == c.image and c.image.endswith("mri_norm2.h5") for c in dataset.cases)
    assert dataset.class_names == {0: "background", 1: "left atrium"}
    assert dataset.missing == sorted(listed - set(present))
    if len(present) == 60:
        assert len(dataset.missing) == 40
        assert "40 listed cases absent" in dataset.describe()
    # The split works on what is present; the absent ids are only reported.
    split = choose_split(dataset, "8", "20", seed=0)
    assert len(split.labeled) == 8 and len(split.validation) == 20
    assert not set(split.labeled + split.unlabeled + split.validation) & set(dataset.missing)


def test_flat_folder_holds_unlabeled_scans(tmp_path):
    for name in ("one.nii.gz", "two.nrrd", "three.mha"):
        write(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a scan")
    (tmp_path / ".hidden.nii.gz").write_bytes(b"")
    dataset = load_dataset(tmp_path)
    assert dataset.layout == "flat folder"
    assert ids(dataset.cases) == ["one", "three", "two"]
    assert dataset.labeled == []
    with pytest.raises(InputError, match="no labeled case"):
        choose_split(dataset)


def test_extra_unlabeled_folders_add_unlabeled_cases(tmp_path):
    write(tmp_path / "data" / "imagesTr" / "a.nii.gz")
    write(tmp_path / "data" / "labelsTr" / "a.nii.gz")
    write(tmp_path / "more" / "u1_0000.nii.gz")
    write(tmp_path / "more" / "u2.nrrd")
    write(tmp_path / "other" / "u3.nii.gz")
    dataset = load_dataset(tmp_path / "data", [tmp_path / "more", str(tmp_path / "other")])
    assert ids(dataset.labeled) == ["a"]
    assert ids(dataset.unlabeled) == ["u1", "u2", "u3"]
    split = choose_split(dataset)
    assert split.labeled == ["a"] and split.unlabeled == ["u1", "u2", "u3"]


def test_extra_unlabeled_folder_errors(tmp_path):
    write(tmp_path / "data" / "imagesTr" / "a.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a folder"):
        load_dataset(tmp_path / "data", [tmp_path / "absent"])
    with pytest.raises(InputError, match="no scans found"):
        load_dataset(tmp_path / "data", [tmp_path / "empty"])
    write(tmp_path / "dup" / "a.nii.gz")
    with pytest.raises(InputError, match="share the case id 'a'"):
        load_dataset(tmp_path / "data", [tmp_path / "dup"])


def test_missing_and_empty_folders_are_refused(tmp_path):
    with pytest.raises(InputError, match="not a folder"):
        load_dataset(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        load_dataset(tmp_path / "empty")


def test_a_gap_in_a_case_s_channel_files_is_refused(tmp_path):
    write(tmp_path / "imagesTr" / "a_0000.nii.gz")
    write(tmp_path / "imagesTr" / "a_0002.nii.gz")
    write(tmp_path / "labelsTr" / "a.nii.gz")
    with pytest.raises(InputError, match=r"case 'a' has channel files up to _0002 but not _0001"):
        load_dataset(tmp_path)


def test_label_without_image_is_refused(tmp_path):
    write(tmp_path / "images" / "a.nii.gz")
    write(tmp_path / "labels" / "a.nii.gz")
    write(tmp_path / "labels" / "ghost.nii.gz")
    with pytest.raises(InputError, match="labels without an image: ghost"):
        load_dataset(tmp_path)


def test_duplicate_case_ids_are_refused(tmp_path):
    # The same case in imagesTr and imagesTs.
    write(tmp_path / "msd" / "imagesTr" / "a.nii.gz")
    write(tmp_path / "msd" / "labelsTr" / "a.nii.gz")
    write(tmp_path / "msd" / "imagesTs" / "a.nii.gz")
    with pytest.raises(InputError, match="share the case id 'a'"):
        load_dataset(tmp_path / "msd")
    # Two files of one case in one folder (they used to collapse silently into one).
    write(tmp_path / "flat" / "b.nii.gz")
    write(tmp_path / "flat" / "b.nrrd")
    with pytest.raises(InputError, match="two scans for case 'b'"):
        load_dataset(tmp_path / "flat")
    write(tmp_path / "pair" / "images" / "c.nii.gz")
    write(tmp_path / "pair" / "labels" / "c.nii.gz")
    write(tmp_path / "pair" / "labels" / "c.mha")
    with pytest.raises(InputError, match="two labels for case 'c'"):
        load_dataset(tmp_path / "pair")


def test_dataset_json_that_is_not_an_object_is_refused(tmp_path):
    write(tmp_path / "imagesTr" / "a.nii.gz")
    (tmp_path / "dataset.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="dataset.json: expected a JSON object"):
        load_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text("{broken")
    with pytest.raises(InputError, match="not valid JSON"):
        load_dataset(tmp_path)


# The split ---------------------------------------------------------------------------------------

def synthetic(labeled: int = 20, unlabeled: int = 5) -> Dataset:
    cases = [Case(f"l{i:02d}", f"/x/l{i:02d}.nii.gz", f"/y/l{i:02d}.nii.gz") for i in range(labeled)]
    cases += [Case(f"u{i:02d}", f"/x/u{i:02d}.nii.gz") for i in range(unlabeled)]
    return Dataset("/x", "synthetic", cases, {0: "background", 1: "fg"})


def check_partition(dataset: Dataset, split: Split) -> None:
    labeled, validation, unlabeled = set(split.labeled), set(split.validation), set(split.unlabeled)
    assert not labeled & validation and not labeled & unlabeled and not validation & unlabeled
    assert validation <= {c.case_id for c in dataset.labeled}
    assert labeled <= {c.case_id for c in dataset.labeled}
    # Unlabeled: every other scan, including labeled cases left out of the labeled subset.
    assert unlabeled == {c.case_id for c in dataset.cases} - labeled - validation


def test_split_is_seeded_and_reproducible():
    dataset = synthetic()
    first = choose_split(dataset, "25%", "4", seed=1)
    again = choose_split(dataset, "25%", "4", seed=1)
    other = choose_split(dataset, "25%", "4", seed=2)
    assert first == again
    assert (first.labeled, first.validation) != (other.labeled, other.validation)
    assert first.seed == 1 and other.seed == 2
    assert first.to_dict() == {"labeled": first.labeled, "unlabeled": first.unlabeled, "validation": first.validation, "seed": 1}
    for split in (first, other):
        check_partition(dataset, split)
        assert len(split.validation) == 4
        assert len(split.labeled) == 4  # 25% of the 16 labeled cases left after validation
        assert len(split.unlabeled) == 20 - 4 - 4 + 5


def test_split_percent_and_count_forms():
    dataset = synthetic()
    everything = choose_split(dataset)  # defaults: 100% labeled, no validation
    assert everything.labeled == sorted(c.case_id for c in dataset.labeled)
    assert everything.validation == [] and everything.unlabeled == [f"u{i:02d}" for i in range(5)]

    counted = choose_split(dataset, 3, "10%", seed=0)
    assert len(counted.validation) == 2 and len(counted.labeled) == 3
    check_partition(dataset, counted)
    assert choose_split(dataset, "10%", 0, seed=0).labeled.__len__() == 2
    # Validation is drawn first: the same seed keeps the same validation whatever the labeled size.
    assert choose_split(dataset, "5", "4", seed=7).validation == choose_split(dataset, "50%", "4", seed=7).validation


def test_split_from_list_files(tmp_path):
    dataset = synthetic()
    labeled_list = tmp_path / "labeled.list"
    labeled_list.write_text("l03\nl01\n\n  l07  \nl01\n")  # blank lines, spaces, a repeat
    validation_list = tmp_path / "validation.txt"
    validation_list.write_text("l10\nl11\n")
    split = choose_split(dataset, str(labeled_list), str(validation_list), seed=0)
    assert split.labeled == ["l03", "l01", "l07"]
    assert split.validation == ["l10", "l11"]
    check_partition(dataset, split)
    # A list of validation ids with a count of labeled ones: drawn from what the list left.
    mixed = choose_split(dataset, "5", str(validation_list), seed=0)
    assert mixed.validation == ["l10", "l11"] and len(mixed.labeled) == 5
    check_partition(dataset, mixed)


def test_split_errors(tmp_path):
    dataset = synthetic(labeled=4, unlabeled=2)
    with pytest.raises(InputError, match="no labeled case"):
        choose_split(synthetic(labeled=0))
    with pytest.raises(InputError, match=r"labeled '9' asks for more than the 4 labeled cases"):
        choose_split(dataset, "9")
    with pytest.raises(InputError, match=r"validation '5' asks for more than the 4"):
        choose_split(dataset, "1", "5")
    with pytest.raises(InputError, match="takes all 4 labeled cases"):
        choose_split(dataset, "100%", "4")
    for bad in ("ten", "-1", "1.5", "inf%", "nan%", "150%", "labeled.list"):
        with pytest.raises(InputError, match="labeled"):
            choose_split(dataset, bad)
    with pytest.raises(InputError, match="give a count"):
        choose_split(dataset, "abc")
    with pytest.raises(InputError, match="is empty"):
        choose_split(dataset, "0")
    unknown = tmp_path / "ids.list"
    unknown.write_text("l00\nnope\nu00\n")  # u00 exists but has no label
    with pytest.raises(InputError, match=r"2 labeled ids are not labeled cases here: nope, u00"):
        choose_split(dataset, str(unknown))
    overlap_l, overlap_v = tmp_path / "l.list", tmp_path / "v.list"
    overlap_l.write_text("l00\nl01\n")
    overlap_v.write_text("l01\n")
    with pytest.raises(InputError, match="both labeled and validation: l01"):
        choose_split(dataset, str(overlap_l), str(overlap_v))
    empty = tmp_path / "empty.list"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match="names no case"):
        choose_split(dataset, str(empty))


def test_cases_given_one_by_one_by_id_and_by_path(tmp_path):
    dataset = load_dataset(SAMPLE)
    elsewhere = tmp_path / "corrections"
    elsewhere.mkdir()
    correction = elsewhere / "hippocampus_001_fixed.nii.gz"
    correction.write_bytes((SAMPLE / "labelsTr" / "hippocampus_001.nii.gz").read_bytes())
    image = str(SAMPLE / "imagesTr" / "hippocampus_001.nii.gz")
    split = select_split(dataset, ["hippocampus_004", [image, str(correction)]], ["hippocampus_006"], seed=3)
    assert split.labeled == ["hippocampus_004", "hippocampus_001_fixed"] and split.validation == ["hippocampus_006"]
    # Every other scan trains unlabeled, the corrected scan's own case included; the correction is a case now.
    assert len(split.unlabeled) == 20 - 2 and "hippocampus_001" in split.unlabeled and split.seed == 3
    added = next(c for c in dataset.cases if c.case_id == "hippocampus_001_fixed")
    assert (added.image, added.label) == (image, str(correction))
    # The dataset's own files given by path are its cases, not new ones.
    again = select_split(load_dataset(SAMPLE), [[image, str(SAMPLE / "labelsTr" / "hippocampus_001.nii.gz")]],
                         unlabeled=[str(SAMPLE / "imagesTs" / "hippocampus_036.nii.gz")])
    assert (again.labeled, again.unlabeled, again.validation) == (["hippocampus_001"], ["hippocampus_036"], [])


def test_a_folder_scan_given_with_its_label_trains_labeled(tmp_path):
    """A folder of scans alone, and one of them given with a label by path (a model's own case
    replayed in a fine-tuning): that case trains labeled, once; a clashing label file is refused."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("hippocampus_001", "hippocampus_004"):
        (folder / f"{name}.nii.gz").symlink_to(SAMPLE / "imagesTr" / f"{name}.nii.gz")
    label = str(SAMPLE / "labelsTr" / "hippocampus_001.nii.gz")
    dataset = load_dataset(folder)
    split = select_split(dataset, [[str(SAMPLE / "imagesTr" / "hippocampus_001.nii.gz"), label]])
    assert (split.labeled, split.unlabeled) == (["hippocampus_001"], ["hippocampus_004"])
    assert [c.label for c in dataset.cases if c.case_id == "hippocampus_001"] == [label]
    with pytest.raises(InputError, match="another scan's"):
        select_split(dataset, [[str(folder / "hippocampus_001.nii.gz"), str(write(tmp_path / "hippocampus_001.nii.gz"))]])

def test_cases_given_one_by_one_refuse_mistakes(tmp_path):
    dataset = load_dataset(SAMPLE)
    with pytest.raises(InputError, match="have no label"):
        select_split(dataset, ["hippocampus_036"])
    with pytest.raises(InputError, match="both labeled and validation"):
        select_split(dataset, ["hippocampus_004"], ["hippocampus_004"])
    with pytest.raises(InputError, match="no such case id"):
        select_split(dataset, ["hippocampus_999"])
    with pytest.raises(InputError, match="give the labeled cases as a list"):
        select_split(dataset, "50%", ["hippocampus_004"])
    other = write(tmp_path / "hippocampus_004.nii.gz")
    with pytest.raises(InputError, match="another scan's"):
        select_split(dataset, ["hippocampus_001"], unlabeled=[str(other)])


def test_layout_rules_for_single_files(tmp_path):
    label = SAMPLE / "labelsTr" / "hippocampus_001.nii.gz"
    assert class_names_near(label) == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert image_for_label(label) == SAMPLE / "imagesTr" / "hippocampus_001.nii.gz"
    assert class_names_near(write(tmp_path / "loose.nii.gz")) is None and image_for_label(tmp_path / "loose.nii.gz") is None
    channel = write(tmp_path / "imagesTr" / "case_7_0000.nii.gz")
    write(tmp_path / "labelsTr" / "case_7.nii.gz")
    assert image_for_label(tmp_path / "labelsTr" / "case_7.nii.gz") == channel
    assert case_id_of(channel) == "case_7" and case_id_of(tmp_path / "case_9.nrrd") == "case_9"
    assert case_id_of(tmp_path / "LA" / "ABC123" / LA_FILE) == "ABC123"
