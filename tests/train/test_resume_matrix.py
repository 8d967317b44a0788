"""Resume is bit-identical whatever the DataLoader workers, augmentation, Mixup and training subset (CPU, tiny ViT).

The promise of docs/pipeline.md ("Resume") over the matrix {num_workers 0, 2} x {augment off, on} x {mixup off, on} x
{train_per_class subset off, on}: a run killed in the middle of its second epoch (a simulated kill: the 7th training
step raises, the newest checkpoint is step 6, mid-epoch) and resumed ends with exactly the weights of an
uninterrupted run, and an uninterrupted run's weights do not depend on ``num_workers``. The data is a small image
folder, since the offline digits set has no augmentation. Five rows cover every pair of settings (a pairwise
design); the other eleven are marked ``slow``.

Why it can fail: DataLoader workers seed their random generators from a base seed drawn when an epoch's iterator is
created, and take batches round-robin; a run resumed mid-epoch has other workers fetching other batches with other
streams, so timm's random crops, flips and colour jitter differ. Each sample's transform is now seeded from
``(seed, epoch, index)`` alone (``timm_remem.data.IndexedDataset``); the unit test below checks that directly.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

import timm_remem.train.guards as guards
from timm_remem.checkpoint import list_checkpoints
from timm_remem.data import create_dataset, create_loader
from timm_remem.train import finetune_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = ("ant", "bee", "cat"), 16, 3
STEPS = 4  # per epoch: 48 images (or 24 with the subset) in batches of 6, at most 4 batches
KILLED_AT = 7  # the 7th step raises: the newest checkpoint is step 6, in the middle of epoch 2


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """root/train/<class>/*.png and root/val/<class>/*.png: random 24x24 RGB images (seeded)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:02d}.png")
    return root


def _options(images, augment: bool, mixup: bool, subset: bool, workers: int) -> dict:
    return dict(model="test_vit", dataset="folder", data_dir=str(images), img_size=16, batch_size=6,
                eval_batch_size=16, epochs=2, limit_train_batches=STEPS, checkpoint_every=1, keep_last=2,
                model_kwargs={"drop_path_rate": 0.2}, augment=augment, mixup=0.8 if mixup else 0.0,
                train_per_class=8 if subset else None, num_workers=workers, seed=5, save_at=[], progress=False,
                device="cpu")


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _crash_on_step(monkeypatch, n: int) -> None:
    """Make the n-th training step raise (a kill, as far as the run can tell), via the per-step loss check."""
    real, calls = guards.check_finite, {"n": 0}

    def check(loss, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("simulated kill")
        return real(loss, **kwargs)

    monkeypatch.setattr(guards, "check_finite", check)


_REFERENCES: dict[tuple[bool, bool, bool], dict[str, torch.Tensor]] = {}


def _reference(images, tmp_path_factory, augment, mixup, subset):
    """The uninterrupted run's final weights (with 2 workers; one per data setting, shared by the tests)."""
    key = (augment, mixup, subset)
    if key not in _REFERENCES:
        out = tmp_path_factory.mktemp("reference")
        _REFERENCES[key] = _weights(finetune_teacher(**_options(images, *key, workers=2), output=str(out)).model)
    return _REFERENCES[key]


# (num_workers, augment, mixup, subset): every pair of values of any two settings appears in one of these rows
PAIRWISE = {(2, True, True, True), (2, True, False, False), (0, True, True, False), (0, False, False, True),
            (2, False, True, False)}
MATRIX = [
    pytest.param(*row, id=f"workers{row[0]}-augment{'On' if row[1] else 'Off'}-mixup{'On' if row[2] else 'Off'}"
                          f"-subset{'On' if row[3] else 'Off'}",
                 marks=() if row in PAIRWISE else pytest.mark.slow)
    for row in itertools.product((0, 2), (False, True), (False, True), (False, True))
]


@pytest.mark.parametrize(("workers", "augment", "mixup", "subset"), MATRIX)
def test_killed_and_resumed_run_matches_the_uninterrupted_one(workers, augment, mixup, subset, images, tmp_path,
                                                               tmp_path_factory, monkeypatch):
    reference = _reference(images, tmp_path_factory, augment, mixup, subset)
    options = _options(images, augment, mixup, subset, workers)
    if workers == 0:  # the reference ran with 2 workers: the number of workers changes nothing
        _assert_same(_weights(finetune_teacher(**options, output=str(tmp_path / "plain")).model), reference)
    _crash_on_step(monkeypatch, KILLED_AT)
    with pytest.raises(KeyboardInterrupt):
        finetune_teacher(**options, output=str(tmp_path / "cut"))
    monkeypatch.undo()
    assert list_checkpoints(tmp_path / "cut" / "train-state")[-1].name == f"step-{KILLED_AT - 1:09d}"
    resumed = finetune_teacher(**options, output=str(tmp_path / "cut"), resume=True)
    _assert_same(_weights(resumed.model), reference)


def _epoch(loader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch, start_index=start)
    return [(x, idx) for x, _, idx in loader]


def test_each_sample_is_augmented_by_seed_epoch_and_index_alone(images):
    """The same augmented images with 0 or 2 workers, from the start of an epoch or from its middle (a resume)."""
    train = create_dataset("folder", images, "train", img_size=16, augment=True)
    loaders = {w: create_loader(train, 6, shuffle=True, seed=3, num_workers=w, seed_per_sample=True) for w in (0, 2)}
    full = _epoch(loaders[0], 1)
    assert len(full) == 8
    for got in (_epoch(loaders[2], 1), _epoch(loaders[0], 1), _epoch(loaders[2], 1, start=18)):
        offset = len(full) - len(got)
        for (x, idx), (ref_x, ref_idx) in zip(got, full[offset:], strict=True):
            assert torch.equal(idx, ref_idx) and torch.equal(x, ref_x)
    other = _epoch(loaders[0], 2)
    again = {int(i): x for xs, idx in other for x, i in zip(xs, idx, strict=True)}
    first = {int(i): x for xs, idx in full for x, i in zip(xs, idx, strict=True)}
    assert any(not torch.equal(first[i], again[i]) for i in first)  # another epoch: other augmentations


def test_loading_data_draws_nothing_from_the_main_random_streams(images):
    train = create_dataset("folder", images, "train", img_size=16, augment=True)
    loader = create_loader(train, 6, shuffle=True, seed=3, seed_per_sample=True)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _epoch(loader, 0)
    assert torch.equal(torch.rand(3), expected)
