"""Reweighting through peft LoRA adapters (issue 13 item 1), in either order, on ViT, Swin, Swin V2 and EVA-02.

The reference is independent of the code under test: the same LoRA-adapted model (same adapter weights, loaded
from the state dict) with forward hooks scaling the submodules that ``reweight_cases.py`` lists by hand for each
family, and a fresh plain timm model for the merged checkpoint.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from reweight_cases import apply_reference_scaling, create, example_input, get_case, perturb
from torch import nn

import timm_remem

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["qkv", "proj", "fc1", "fc2"]
FAMILIES = ["vit", "swin", "swinv2", "eva"]
# Swin V2's and EVA's attention call F.linear(x, qkv.weight, qkv_bias) themselves, so a LoRA on qkv never runs in
# their forward (while peft's merge_and_unload would fold it in; reweight refuses it): not a target there.
FAMILY_TARGETS = {"swinv2": ["proj", "fc1", "fc2"], "eva": ["proj", "fc1", "fc2"]}


def _adapt(model: nn.Module, how: str, family: str) -> nn.Module:
    torch.manual_seed(3)
    targets = FAMILY_TARGETS.get(family, TARGETS)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)  # B != 0
    if how == "get_peft_model":
        return peft.get_peft_model(model, config)
    return peft.inject_adapter_in_model(config, model)


def _timm(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, peft.PeftModel) else model


def _placement(model: nn.Module) -> list[tuple]:
    return [(b.index, b.path, b.kind, b.columns, b.fold_path) for b in timm_remem.reweighting.find_branches(model)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _build(family: str, how: str, order: str):
    case = get_case(family)
    plain = perturb(create(case), seed=1).eval()
    factors = [0.9 - 0.5 * i / len(case.branch_paths) for i in range(len(case.branch_paths))]
    placement = _placement(plain)
    model = copy.deepcopy(plain)
    if order == "lora-first":
        model = _adapt(model, how, family)
        timm_remem.reweight(model, schedule=factors)
    else:
        timm_remem.reweight(model, schedule=factors)
        model = _adapt(model, how, family)
    model.eval()
    reference = _adapt(copy.deepcopy(plain), how, family).eval()
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "remem_scale" not in k}, strict=True)
    return case, plain, model, reference, factors, placement


@pytest.mark.parametrize("order", ["lora-first", "reweight-first"])
@pytest.mark.parametrize("how", ["get_peft_model", "inject"])
@pytest.mark.parametrize("family", FAMILIES)
def test_reweighting_through_lora_is_exact(family, how, order):
    case, plain, model, reference, factors, placement = _build(family, how, order)
    x = example_input(case)
    assert _placement(model) == placement  # the adapters do not move any branch
    expected = {p: pytest.approx(f) for paths, f in zip(case.branch_paths, factors, strict=True) for p in paths}
    assert timm_remem.get_scales(model) == expected
    with torch.no_grad():
        adapted = reference(x)
        handles = apply_reference_scaling(_timm(reference), case, factors)
        want = reference(x)
        out = model(x)
        assert _rel(want, adapted) > 1e-3  # the factors matter
        assert _rel(out, plain(x)) > 1e-3  # and so do the adapters
        assert _rel(out, want) <= 1e-6
        for h in handles:
            h.remove()
        timm_remem.unreweight(model)
        assert torch.equal(model(x), adapted)


@pytest.mark.parametrize("merge_order", ["peft-then-remem", "remem-then-peft", "remem-only"])
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_lora_teacher_is_a_plain_timm_checkpoint(family, merge_order):
    how = "inject" if merge_order == "remem-only" else "get_peft_model"
    case, _, model, _, _, _ = _build(family, how, "lora-first")
    x = example_input(case)
    with torch.no_grad():
        want = model(x)
        if merge_order == "peft-then-remem":
            merged = timm_remem.merge(model.merge_and_unload())
        elif merge_order == "remem-then-peft":
            merged = timm_remem.merge(model).merge_and_unload()
        else:
            merged = timm_remem.merge(model)  # factors folded into the LoRA layers' base and lora_B weights
            assert _rel(merged(x), want) <= 1e-5
            return
        assert not timm_remem.is_reweighted(merged)
        assert not any("lora" in k or "remem" in k for k in merged.state_dict())
        assert _rel(merged(x), want) <= 1e-5
        fresh = create(case).eval()
        fresh.load_state_dict(merged.state_dict(), strict=True)
        assert _rel(fresh(x), want) <= 1e-5
    assert timm_remem.get_reweight_config(merged).merged is True


def test_lora_first_then_reweight_learnable_trains_factors_and_adapters():
    case, _, model, _, _, _ = _build("vit", "get_peft_model", "lora-first")
    timm_remem.reweight(model, alpha=0.8, learnable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("remem_scale" in n for n in trainable) and any("lora_A" in n for n in trainable)
    model(example_input(case)).square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "remem_scale" in n)


def test_reweighting_does_not_import_peft():
    code = "import sys, timm_remem, timm_remem.reweighting; print('peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
