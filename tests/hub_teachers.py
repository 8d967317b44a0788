"""Teachers for the hub and push tests, and an independent reference of their outputs.

The reference is written here, independently of the reweighting module: the same perturbed ``test_vit`` without
wrappers, with forward hooks multiplying each block's MLP output by its factor. Plain timm
(``timm.create_model("hf-hub:..." / "local-dir:...")``) is the reference loader for merged checkpoints.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import timm_remem
from timm_remem.reweighting import ScaledBranch

FACTORS = [0.9, 0.8, 0.65, 0.5, 0.4, 0.3]  # "learned" factors, away from alpha=0.8's schedule and from 1
META = dict(base_model="timm/test_vit.r160_in1k", dataset="cifar100", rho=0.1, adaptive=True, epochs=3,
            teacher_accuracy=91.25, student_accuracies={"resnet18": 78.5}, license="apache-2.0")
X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def make_teacher(seed: int = 0, factors: list[float] = FACTORS):
    """A reweighted test_vit with perturbed weights and factors, and an independent reference of its forward."""
    torch.manual_seed(seed)
    base = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    reference = copy.deepcopy(base).eval()
    for block, factor in zip(reference.blocks, factors, strict=True):
        block.mlp.register_forward_hook(lambda mod, args, out, f=factor: out * f)
    teacher = timm_remem.reweight(base, alpha=0.8, learnable=True)
    with torch.no_grad():
        for wrapper in teacher.modules():
            if isinstance(wrapper, ScaledBranch):
                wrapper.remem_scale.fill_(factors[wrapper.index])
    return teacher.eval(), reference


@torch.no_grad()
def out(model):
    return model.eval()(X)


def expected_scales():
    return {f"blocks.{i}.mlp": pytest.approx(f) for i, f in enumerate(FACTORS)}
