"""SAM over what trains (issue 13.2): frozen parameters are never perturbed, never moved, never buffered.

The model is timm's ``test_vit`` with everything frozen but the head and the final norm (a LoRA-like share of
trainable parameters). References: a copy of the frozen weights (bit-identical afterwards), the textbook SAM step
of ``sam_reference`` over the trainable parameters alone, and the byte count of the trainable parameters.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from sam_reference import assert_params_close, reference_sam_step

from timm_remem.sam import SAM

pytestmark = pytest.mark.usefixtures("one_thread")

TRAINABLE = ("head.", "norm.")


def vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3, drop_rate=0.0)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(TRAINABLE))
    return model


def data(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


def closure_for(model, x, y):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def split(model):
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    return frozen, trainable


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def buffered_ids(opt: SAM) -> set[int]:
    """Which parameters own one of SAM's buffers (its saved-w and ASAM scratch dicts, keyed by parameter)."""
    return {id(p) for cache in (opt._saved, opt._scratch) for p in cache}


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_frozen_weights_untouched_and_unbuffered(adaptive):
    model = vit()
    frozen, trainable = split(model)
    assert nbytes(trainable) < nbytes(frozen) / 10  # most of the model is frozen
    before = [p.detach().clone() for p in frozen]
    ref = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.3, adaptive=adaptive, lr=1e-2, weight_decay=0.05)
    ref_trainable = [p for p in ref.parameters() if p.requires_grad]
    ref_opt = torch.optim.AdamW(ref_trainable, lr=1e-2, weight_decay=0.05)
    groups = [{"params": ref_trainable, "rho": 0.3, "adaptive": adaptive, "eta": 0.01}]
    for x, y in data(3):
        opt.step(closure_for(model, x, y))
        reference_sam_step(ref, ref_opt, groups, x, y)
    for p, b in zip(frozen, before, strict=True):
        assert torch.equal(p, b)
    assert_params_close(model, ref, rtol=1e-5, atol=1e-6)  # the trainable part follows SAM over them alone
    assert any(not torch.equal(a, b) for a, b in zip(trainable, [p for p in vit().parameters() if p.requires_grad],
                                                      strict=True))
    assert buffered_ids(opt) == {id(p) for p in trainable}
    assert opt.buffer_nbytes == nbytes(trainable)  # the saved w only, for ASAM too
    assert all(id(p) not in {id(q) for q in opt.state} for p in frozen)  # no base-optimizer state either


def test_a_group_with_no_trainable_parameter_is_left_out():
    model = vit()
    frozen, trainable = split(model)
    before = [p.detach().clone() for p in frozen]
    opt = SAM([{"params": frozen, "rho": 0.5}, {"params": trainable, "rho": 0.1}], torch.optim.SGD, lr=0.1,
              momentum=0.9, weight_decay=1e-2)
    for x, y in data(2):
        opt.step(closure_for(model, x, y))
        assert opt.stats.sam_step
        assert opt.stats.perturbation_norm == pytest.approx(0.1, rel=1e-5)  # only the trainable group's rho
    for p, b in zip(frozen, before, strict=True):
        assert torch.equal(p, b)
    assert opt.buffer_nbytes == nbytes(trainable)


def test_parameters_frozen_later_are_released_and_never_moved_again():
    """Freeze the blocks after two steps, keep stale (zeroed, not None) gradients on them, take SAM and plain
    steps (every=2) with momentum and weight decay: the frozen blocks stay bit-identical and lose their buffers."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.05, momentum=0.9, weight_decay=1e-2, every=2)

    def two_step(x, y):
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        if opt.first_step():
            opt.zero_grad(set_to_none=False)
            with opt.second_pass(model):
                F.cross_entropy(model(x), y).backward()
        opt.second_step()

    batches = data(6)
    for x, y in batches[:2]:
        two_step(x, y)
    assert opt.buffer_nbytes == nbytes(model.parameters())
    model.blocks.requires_grad_(False)
    frozen, trainable = split(model)
    before = [p.detach().clone() for p in frozen]
    for x, y in batches[2:]:
        two_step(x, y)
    for p, b in zip(frozen, before, strict=True):
        assert torch.equal(p, b)
    assert buffered_ids(opt) == {id(p) for p in trainable}
    assert opt.buffer_nbytes == nbytes(trainable)
    model.blocks.requires_grad_(True)  # unfrozen again: trained and buffered again
    two_step(*batches[0])
    assert any(not torch.equal(p, b) for p, b in zip(frozen, before, strict=True))
    assert opt.buffer_nbytes == nbytes(model.parameters())

