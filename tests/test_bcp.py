"""Bidirectional copy-paste on real hippocampus patches: the mixtures, the two stages, the teacher, a real run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from semiseg.datasets import choose_split, load_dataset
from semiseg.methods import build_method
from semiseg.methods.base import NetworkSpec, StepInfo
from semiseg.methods.bcp import paste_box
from semiseg.preprocessing import cached_case, compute_plan
from semiseg.sampling import PatchDataset, Volumes
from semiseg.training import TrainConfig, train

SAMPLE = Path(__file__).resolve().parents[1] / "resources" / "hippocampus"
PATCH = (32, 32, 32)
PRETRAIN, SELF_TRAIN = StepInfo(0, 10), StepInfo(5, 10)  # pretrain 0.2 of 10 iterations: steps 0 and 1


@pytest.fixture(scope="module")
def batches() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Two labeled and two unlabeled patches of real scans, through the engine's preprocessing and sampling."""
    dataset = load_dataset(SAMPLE)
    split = choose_split(dataset, "4", "0", seed=0)
    plan = compute_plan(dataset, split, 16, PATCH)
    by_id = {c.case_id: c for c in dataset.cases}

    def patches(ids: list[str], with_labels: bool) -> dict[str, torch.Tensor]:
        arrays = [cached_case(by_id[i], plan, with_labels) for i in ids]
        volumes = Volumes([a[0] for a in arrays], [a[1] for a in arrays] if with_labels else None)
        samples = PatchDataset(volumes, PATCH, seed=0, augment=False, strong_view=False)
        drawn = [samples[i] for i in (0, 1)]
        return {key: torch.stack([s[key] for s in drawn]) for key in drawn[0]}

    return patches(split.labeled, True), patches(split.unlabeled, False)


def _method(**options):
    torch.manual_seed(0)
    return build_method("bcp", 1, 3, NetworkSpec("vnet", {"base_filters": 4}), {"pretrain": 0.2, "pairs": "halves", **options})


def _student_inputs(method) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    seen: list[torch.Tensor] = []
    handle = method.networks["student"].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen, handle


def _box(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return paste_box(PATCH, 2 / 3)


def _region_loss(logits: torch.Tensor, labels: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """The released mix_loss term written out: (masked soft Dice over every class and sample + masked CE) / 2."""
    probs = torch.softmax(logits.float(), 1)
    one_hot = F.one_hot(labels[:, 0], logits.shape[1]).movedim(-1, 1).float()
    mask = region.float()[None, None]
    intersection = (probs * one_hot * mask).sum((2, 3, 4))
    union = ((probs + one_hot) * mask).sum((2, 3, 4))
    dice = 1 - ((2 * intersection + 1e-5) / (union + 1e-5)).mean()
    ce = -(torch.log(probs).gather(1, labels) * mask).sum() / (mask.sum() * len(logits))
    return (dice + ce) / 2


def test_the_box_is_two_thirds_of_each_side_and_moves():
    boxes = [_box(seed) for seed in range(6)]
    for inside in boxes:
        assert inside.sum() == 21**3  # int(32 * 2 / 3) = 21 per side
        corner = [int(np.flatnonzero(inside.any(dim=tuple(a for a in range(3) if a != axis)))[0]) for axis in range(3)]
        box = torch.zeros_like(inside)
        box[corner[0]:corner[0] + 21, corner[1]:corner[1] + 21, corner[2]:corner[2] + 21] = True
        assert torch.equal(inside, box)  # one solid box
    assert len({tuple(np.argwhere(b.numpy())[0]) for b in boxes}) > 1  # a random position, not a fixed one


def _self_training_mixtures(method, labeled, unlabeled) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The box of one self-training step (seed 3) and the two mixtures the student saw in it."""
    inside = _box(3)
    seen, handle = _student_inputs(method)
    torch.manual_seed(3)
    method.training_step(labeled, unlabeled, SELF_TRAIN)
    handle.remove()
    return inside, seen


def test_self_training_mixes_labeled_and_unlabeled_patches_both_ways(batches):
    labeled, unlabeled = batches
    inside, (inward, outward) = _self_training_mixtures(_method(), labeled, unlabeled)
    (image_a, image_b), (unlabeled_a, unlabeled_b) = labeled["image"].split(1), unlabeled["image"].split(1)
    # Every voxel of the inward mixture: unlabeled patch a in the box, labeled patch a around it.
    assert torch.equal(inward[..., inside], unlabeled_a[..., inside]) and torch.equal(inward[..., ~inside], image_a[..., ~inside])
    # The outward one: labeled patch b in the box, unlabeled patch b around it.
    assert torch.equal(outward[..., inside], image_b[..., inside]) and torch.equal(outward[..., ~inside], unlabeled_b[..., ~inside])
    # The sources differ in both regions, so a swapped or missing paste would fail the checks above.
    for region in (inside, ~inside):
        assert not torch.equal(image_a[..., region], unlabeled_a[..., region])
        assert not torch.equal(image_b[..., region], unlabeled_b[..., region])


def test_shifted_pairs_mix_every_patch_with_the_next_in_whole_batches(batches):
    labeled, unlabeled = batches
    inside, (inward, outward) = _self_training_mixtures(_method(pairs="shifted"), labeled, unlabeled)
    assert len(inward) == len(outward) == 2
    images, others = labeled["image"], unlabeled["image"]
    for i in range(2):
        previous = (i - 1) % 2
        assert torch.equal(inward[i][..., inside], others[i][..., inside]) and torch.equal(inward[i][..., ~inside], images[i][..., ~inside])
        assert torch.equal(outward[i][..., inside], images[previous][..., inside])
        assert torch.equal(outward[i][..., ~inside], others[previous][..., ~inside])


def test_each_voxel_is_supervised_by_the_label_of_the_patch_it_came_from(batches):
    labeled, unlabeled = batches
    method = _method()
    (label_a, label_b), (unlabeled_a, unlabeled_b) = labeled["label"].split(1), unlabeled["image"].split(1)
    pseudo_a, pseudo_b = method.pseudo_labels(unlabeled_a), method.pseudo_labels(unlabeled_b)
    inside = _box(4)
    seen, handle = _student_inputs(method)
    torch.manual_seed(4)
    losses = method.training_step(labeled, unlabeled, SELF_TRAIN)
    handle.remove()
    with torch.no_grad():
        inward, outward = (method.networks["student"](x) for x in seen)
    # Ground truth (weight 1) where the voxel came from a labeled patch, the teacher's label (weight alpha) elsewhere.
    expected_labeled = _region_loss(inward, label_a, ~inside) + _region_loss(outward, label_b, inside)
    expected_unlabeled = 0.5 * (_region_loss(inward, pseudo_a, inside) + _region_loss(outward, pseudo_b, ~inside))
    assert losses["labeled_part"].item() == pytest.approx(float(expected_labeled), rel=1e-5)
    assert losses["unlabeled_part"].item() == pytest.approx(float(expected_unlabeled), rel=1e-5)


def test_a_different_teacher_changes_only_the_unlabeled_part(batches):
    labeled, unlabeled = batches
    method = _method()
    torch.manual_seed(5)
    before = method.training_step(labeled, unlabeled, SELF_TRAIN)
    with torch.no_grad():
        for parameter in method.networks["teacher"].parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    torch.manual_seed(5)
    after = method.training_step(labeled, unlabeled, SELF_TRAIN)
    assert after["labeled_part"].item() == before["labeled_part"].item()
    assert abs(after["unlabeled_part"].item() - before["unlabeled_part"].item()) > 1e-3


def test_pseudo_labels_come_from_the_teacher_without_gradient_as_its_largest_components(batches):
    labeled, unlabeled = batches
    method = _method()
    teacher, student = method.networks["teacher"], method.networks["student"]
    losses = method.training_step(labeled, unlabeled, SELF_TRAIN)
    sum(losses.values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters()) and any(p.grad.abs().sum() > 0 for p in student.parameters())

    image = unlabeled["image"][:1]
    pseudo = method.pseudo_labels(image)
    assert not pseudo.requires_grad
    with torch.no_grad():
        argmax = teacher(image).argmax(1, keepdim=True)
    structure = np.ones((3, 3, 3), dtype=bool)
    split_classes = 0
    for value in (1, 2):
        raw_count = ndimage.label((argmax == value)[0, 0].numpy(), structure)[1]
        kept_count = ndimage.label((pseudo == value)[0, 0].numpy(), structure)[1]
        assert kept_count == min(raw_count, 1)
        split_classes += raw_count > 1
        assert torch.all(argmax[pseudo == value] == value)  # kept voxels keep the teacher's class
    assert split_classes  # the untrained teacher's argmax has several components: the filter had work to do


def test_pre_training_mixes_labeled_patches_only(batches):
    labeled, unlabeled = batches
    method = _method()
    teacher_calls: list[int] = []
    method.networks["teacher"].register_forward_hook(lambda *args: teacher_calls.append(1))
    inside = _box(6)
    seen, handle = _student_inputs(method)
    torch.manual_seed(6)
    without = method.training_step(labeled, None, PRETRAIN)
    torch.manual_seed(6)
    with_unlabeled = method.training_step(labeled, unlabeled, PRETRAIN)
    handle.remove()
    assert not teacher_calls and without["unlabeled_part"].item() == 0.0
    assert with_unlabeled["labeled_part"].item() == without["labeled_part"].item()  # the unlabeled batch is not read
    (image_a, image_b), (label_a, label_b) = labeled["image"].split(1), labeled["label"].split(1)
    mixed = seen[0]
    assert torch.equal(mixed[..., inside], image_b[..., inside]) and torch.equal(mixed[..., ~inside], image_a[..., ~inside])
    with torch.no_grad():
        logits = method.networks["student"](mixed)
    target = torch.where(inside, label_b, label_a)
    everywhere = torch.ones(PATCH, dtype=torch.bool)
    assert without["labeled_part"].item() == pytest.approx(float(_region_loss(logits, target, everywhere)), rel=1e-5)


def test_teacher_copies_the_student_while_pre_training_then_follows_the_ema_formula():
    method = _method()
    teacher, student = method.networks["teacher"], method.networks["student"]
    iterations = 10  # pretrain 0.2: steps 0 and 1 pre-train, step 2 is the first self-training step
    for iteration, expected_copy in ((0, True), (1, True)):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        method.after_step(StepInfo(iteration, iterations))
        assert method.pretraining(StepInfo(iteration, iterations)) is expected_copy
        assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))
    assert not method.pretraining(StepInfo(2, iterations))
    old_teacher = [t.clone() for t in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    method.after_step(StepInfo(2, iterations))
    for new, old, s in zip(teacher.parameters(), old_teacher, student.parameters()):
        torch.testing.assert_close(new, 0.99 * old + 0.01 * s)
    assert not all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))


def test_bad_options_are_refused():
    from semiseg.errors import InputError

    with pytest.raises(InputError, match="mask_ratio"):
        _method(mask_ratio=1.5)
    with pytest.raises(InputError, match="pairs"):
        _method(pairs="random")


def test_loss_falls_on_a_short_real_run(tmp_path, one_thread):
    events: list[dict] = []
    config = TrainConfig(data=str(SAMPLE), output=str(tmp_path / "run"), method="bcp", network_options={"base_filters": 4},
                         method_options={"pretrain": 0.25}, labeled="6", validation="0", iterations=40, log_every=5,
                         validate_every=1000, workers=0, device="cpu", seed=0)
    train(config, events.append)
    entries = [e for e in events if e["type"] == "iteration"]
    losses = [e["loss"] for e in entries]
    assert len(losses) == 8
    # The first 10 iterations pre-train (no unlabeled term); the unlabeled term starts with self-training.
    assert [e["losses"]["unlabeled_part"] > 0 for e in entries] == [False, False] + [True] * 6
    # Each stage's loss falls. They are not comparable with each other: self-training sums the terms
    # of two mixtures (as the released code), pre-training has one.
    assert losses[1] < 0.85 * losses[0], losses
    assert np.mean(losses[-2:]) < 0.9 * losses[2], losses
