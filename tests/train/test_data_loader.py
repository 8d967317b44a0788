"""Training loaders never yield a last batch of one sample (BatchNorm cannot train on it); evaluation loaders keep
every sample; the order stays a function of (seed, epoch) and resumable."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from timm_remem.data import EpochSampler, create_loader
from timm_remem.errors import ConfigError
from timm_remem.train import distill_student

pytestmark = pytest.mark.usefixtures("one_thread")


class _Points(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((3, 16, 16), float(i)), i % 3


def _batches(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [idx.tolist() for _, _, idx in loader]


def test_training_loader_drops_a_last_batch_of_one_and_keeps_the_epoch_permutation():
    loader = create_loader(_Points(9), batch_size=4, shuffle=True, seed=5)
    for epoch in range(3):
        batches = _batches(loader, epoch)
        g = torch.Generator().manual_seed(5 * 100003 + epoch)  # EpochSampler's documented permutation
        order = torch.randperm(9, generator=g).tolist()
        assert batches == [order[:4], order[4:8]]  # the ninth (last of the permutation) waits for another epoch
    assert len(loader) == 2


def test_the_dropped_sample_changes_from_epoch_to_epoch():
    loader = create_loader(_Points(9), batch_size=4, shuffle=True, seed=0)
    left_out = {(set(range(9)) - {i for b in _batches(loader, e) for i in b}).pop() for e in range(8)}
    assert len(left_out) > 1


def test_evaluation_loader_keeps_every_sample():
    loader = create_loader(_Points(9), batch_size=4)
    assert _batches(loader, 0) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]


def test_a_larger_last_batch_is_kept():
    loader = create_loader(_Points(10), batch_size=4, shuffle=True, seed=1)
    assert [len(b) for b in _batches(loader, 0)] == [4, 4, 2]


def test_resume_in_the_middle_of_an_epoch_sees_the_same_batches():
    loader = create_loader(_Points(9), batch_size=4, shuffle=True, seed=2)
    full = _batches(loader, 3)
    loader.sampler.set_epoch(3, start_index=4)  # resumed after one batch
    assert [idx.tolist() for _, _, idx in loader] == full[1:]
    assert len(loader) == 1


def test_every_rank_drops_alike_and_the_shards_stay_disjoint():
    shards = []
    for rank in range(2):
        s = EpochSampler(18, seed=4, num_replicas=2, rank=rank, batch_size=4, min_last_batch=2)
        s.set_epoch(1)
        shards.append(list(s))
    assert len(shards[0]) == len(shards[1]) == 8  # 9 per rank: 4 + 4, the ninth left out on both
    assert not set(shards[0]) & set(shards[1])


def test_a_training_set_of_one_sample_is_refused():
    with pytest.raises(ConfigError, match=r"the training set has 1 sample\(s\), 1 per process: a training batch needs "
                                          r"at least 2 \(BatchNorm cannot train on one sample\)"):
        create_loader(_Points(1), batch_size=4, shuffle=True)
    assert len(create_loader(_Points(1), batch_size=4)) == 1  # evaluation is fine


def test_batch_norm_trains_through_every_epoch_end():
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).train()  # its last stage is 1x1 at 16px
    loader = create_loader(_Points(9), batch_size=4, shuffle=True, seed=0)
    for epoch in range(2):
        for images, targets, _ in _batches_of(loader, epoch):
            torch.nn.functional.cross_entropy(model(images), targets).backward()


def _batches_of(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return list(loader)


def _image_folder(root, train_per_class, val_per_class=1):
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_distill_with_a_batch_size_leaving_one_sample_finishes_and_resumes_bit_exactly(tmp_path):
    _image_folder(tmp_path / "data", train_per_class=3)  # 9 training images, batch size 4: 4 + 4 (+ 1 dropped)
    common = dict(model="test_resnet", dataset="folder", data_dir=str(tmp_path / "data"), img_size=16, epochs=2,
                  batch_size=4, eval_batch_size=4, checkpoint_every=1, keep_last=10, seed=3, progress=False)
    whole = distill_student(output=str(tmp_path / "whole"), **common)
    assert len(whole.history) == 2
    steps = sorted(p.name for p in (tmp_path / "whole" / "train-state").glob("step-*"))
    assert steps[-1] == "step-000000004"  # two batches per epoch
    # A run interrupted after its first step of epoch 2: resume from there and pass the epoch end again.
    cut = distill_student(output=str(tmp_path / "cut"), **common)
    for name in steps[3:]:
        shutil.rmtree(tmp_path / "cut" / "train-state" / name)
    resumed = distill_student(output=str(tmp_path / "cut"), resume=True, **common)
    assert cut is not None and len(resumed.history) == 2
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
