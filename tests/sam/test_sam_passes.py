"""Tests for timm_remem.sam.passes through SAM: BatchNorm statistics advance once, dropout / drop-path are replayed.

The references are independent: a deep copy of the model after one plain forward (BatchNorm), a second pass with the
same masks at the same weights (rho = 0), and the RNG stream of a single pass.
"""

from __future__ import annotations

import copy
import gc

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from sam_reference import batches, loss_fn, make_closure, mlp
from torch import nn

from timm_remem.sam import SAM, create_sam, passes


def convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(4, 3),
    )


# ---------------------------------------------------------------------- BatchNorm, dropout, drop-path
def _images(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)


def _bn_reference_after_one_forward(model, x):
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        ref(x)
    return ref[1]


def test_batchnorm_stats_advance_once_in_closure_usage():
    model = convnet()
    x, y = _images()
    ref_bn = _bn_reference_after_one_forward(model, x)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    opt.step(make_closure(model, x, y))
    bn = model[1]
    assert int(bn.num_batches_tracked) == 1
    assert torch.equal(bn.running_mean, ref_bn.running_mean)
    assert torch.equal(bn.running_var, ref_bn.running_var)


@pytest.mark.parametrize("explicit_model", [True, False])
def test_batchnorm_stats_advance_once_with_second_pass_context(explicit_model):
    model = convnet()
    x, y = _images()
    ref_bn = _bn_reference_after_one_forward(model, x)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    loss_fn(model, x, y).backward()
    opt.first_step(zero_grad=True)
    with opt.second_pass(model if explicit_model else None):
        loss_fn(model, x, y).backward()
    opt.second_step(zero_grad=True)
    assert int(model[1].num_batches_tracked) == 1
    assert torch.equal(model[1].running_mean, ref_bn.running_mean)
    assert torch.equal(model[1].running_var, ref_bn.running_var)


def test_batchnorm_advances_twice_when_freezing_is_off():
    model = convnet()
    x, y = _images()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, freeze_bn=False)
    opt.step(make_closure(model, x, y))
    assert int(model[1].num_batches_tracked) == 2


@pytest.mark.parametrize("usage", ["closure", "two_step"])
def test_dropout_masks_are_replayed_in_perturbed_pass(usage):
    # rho = 0: the second pass runs at the same weights, so equal masks give exactly the same loss.
    model = mlp(dropout=0.5)
    x, y = batches(1)[0]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1)
    if usage == "closure":
        opt.step(make_closure(model, x, y))
        assert opt.stats.loss_increase == 0.0
    else:
        with opt.first_pass(model):
            loss1 = loss_fn(model, x, y)
            loss1.backward()
        g1 = [p.grad.clone() for p in model.parameters()]
        opt.first_step(zero_grad=True)
        with opt.second_pass(model):
            loss2 = loss_fn(model, x, y)
            loss2.backward()
        assert torch.equal(loss1, loss2)
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), g1, strict=True))
        opt.second_step(zero_grad=True)


def test_rng_replay_can_be_switched_off():
    model = mlp(dropout=0.5)
    x, y = batches(1)[0]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, replay_rng=False)
    opt.step(make_closure(model, x, y))
    assert opt.stats.loss_increase != 0.0


def test_rng_stream_after_step_matches_a_single_pass():
    model = mlp(dropout=0.5)
    x, y = batches(1)[0]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    torch.manual_seed(7)
    opt.step(make_closure(model, x, y))
    after_sam = torch.rand(4)
    torch.manual_seed(7)
    with torch.no_grad():
        model(x)  # one pass consumes the same random numbers
    assert torch.equal(torch.rand(4), after_sam)


def test_drop_path_masks_are_replayed_in_vit():
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3, drop_path_rate=0.5,
                              drop_rate=0.3)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0])
    opt = create_sam(model, "adamw", lr=1e-3, rho=0.0)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.stats.loss_increase == 0.0


def test_batchnorm_stats_advance_once_when_the_perturbed_pass_raises():
    model = convnet()
    x, y = _images()
    ref_bn = _bn_reference_after_one_forward(model, x)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    loss_fn(model, x, y).backward()
    assert opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="perturbed pass failed"):
        with opt.second_pass(model):
            loss_fn(model, x, y).backward()
            raise RuntimeError("perturbed pass failed")
    assert int(model[1].num_batches_tracked) == 1
    assert torch.equal(model[1].running_mean, ref_bn.running_mean)
    assert torch.equal(model[1].running_var, ref_bn.running_var)


# ---------------------------------------------------------------------- the per-model BatchNorm cache
def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 3))


@pytest.mark.parametrize("change", ["insert", "replace_same_count", "nested"])
def test_batchnorm_added_after_the_first_step_is_frozen_in_the_second_pass(change):
    model = _bn_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    (x, y), (x2, y2) = batches(2, dtype=torch.float32)
    opt.step(make_closure(model, x, y), model=model)  # the model's modules are scanned (and remembered) here
    n_modules = len(list(model.modules()))
    bn = nn.BatchNorm1d(8)
    if change == "insert":
        model.insert(1, bn)
    elif change == "replace_same_count":  # the same number of modules: the cache must notice all the same
        replaced = model[1]  # kept alive: its id cannot be reused by the new layer
        model[1] = bn
        assert len(list(model.modules())) == n_modules and replaced is not None
    else:
        replaced = model[2][1]
        model[2][1] = bn
        assert replaced is not None
    with torch.no_grad():  # the reference: the statistics after one forward at w
        ref = copy.deepcopy(bn)
        ref(model[0](x2) if change != "nested" else model[2][0](torch.tanh(model[0](x2))))
    opt.step(make_closure(model, x2, y2), model=model)
    assert int(bn.num_batches_tracked) == 1  # advanced by the first pass only
    assert torch.equal(bn.running_mean, ref.running_mean) and torch.equal(bn.running_var, ref.running_var)


def test_batchnorm_removed_after_the_first_step_is_left_alone():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(8)
    model = nn.Sequential(nn.Linear(6, 8), bn, nn.Tanh(), nn.Linear(8, 3))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    (x, y), (x2, y2) = batches(2, dtype=torch.float32)
    opt.step(make_closure(model, x, y), model=model)
    assert int(bn.num_batches_tracked) == 1
    del model[1]
    opt.step(make_closure(model, x2, y2), model=model)  # no error; the removed layer did not run
    assert int(bn.num_batches_tracked) == 1


def test_the_scan_is_reused_while_the_tree_is_unchanged_and_redone_when_it_changes():
    model = convnet()
    assert passes.modules_with_running_stats(model) == [model[1]]
    scan = passes._SCANS[model]
    assert passes.modules_with_running_stats(model) == [model[1]]
    assert passes._SCANS[model] is scan  # unchanged tree: no new walk over the modules' attributes
    replaced = model[6]  # kept alive, so only the tree's signature can tell
    model[6] = nn.BatchNorm1d(3)  # replaces the Linear: the same module count
    assert {id(m) for m in passes.modules_with_running_stats(model)} == {id(model[1]), id(model[6])}
    model[6].register_buffer("running_mean", None)  # a buffer registered in place: scanned again
    model[6].track_running_stats = False
    assert passes.modules_with_running_stats(model)[0] is model[1]
    assert isinstance(replaced, nn.Linear)


def test_a_collected_module_marks_the_scan_stale():
    # Its id could be taken by a new module at the same place, with the same buffer count: the scan must not trust it.
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    passes.modules_with_running_stats(model)
    scan = passes._SCANS[model]
    assert scan.valid
    del model[1]
    gc.collect()
    assert not scan.valid
    passes.modules_with_running_stats(model)
    assert passes._SCANS[model] is not scan and passes._SCANS[model].valid
