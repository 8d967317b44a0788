"""timm_remem.lora.merge_lora: adapters and factors folded into a plain timm model.

References: the adapted, reweighted model's own forward (peft's LoRA layers and the reweighting wrappers, not the
merge code), a fresh ``timm.create_model`` loading the merged state dict with ``strict=True``, and the folded weight
written out in float64 from the LoRA formula ``c * (W + (alpha / r) * B @ A)``.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from lora_cases import FAMILIES, create, example

import timm_remem
from timm_remem.errors import ConfigError, TrainingError
from timm_remem.lora import apply_lora, is_lora, merge_lora

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:apply_lora.*never called:UserWarning")]
RANK, ALPHA = 4, 8.0


def _train_like(model: torch.nn.Module, seed: int = 3) -> None:
    """Move every adapter away from its B = 0 start, and the factors away from any schedule, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif name.endswith("remem_scale"):
                p.copy_(0.4 + 0.5 * torch.rand((), generator=g))


def _adapted_teacher(family: str, order: str) -> torch.nn.Module:
    model = create(family)
    if order == "lora-then-reweight":
        timm_remem.reweight(apply_lora(model, rank=RANK, alpha=ALPHA), alpha=0.7, learnable=True)
    else:
        apply_lora(timm_remem.reweight(model, alpha=0.7, learnable=True), rank=RANK, alpha=ALPHA)
    _train_like(model)
    return model.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("order", ["lora-then-reweight", "reweight-then-lora"])
def test_merged_model_matches_the_adapted_one_and_reloads_strictly_in_plain_timm(family, order):
    teacher = _adapted_teacher(family, order)
    x = example(family)
    with torch.no_grad():
        y = teacher(x)
        plain_y = create(family).eval()(x)
    assert _rel(y, plain_y) > 1e-2  # adapters and factors change the outputs: the checks below can fail
    merged = merge_lora(teacher)
    assert not is_lora(merged) and not timm_remem.is_reweighted(merged)
    name, kwargs, _ = FAMILIES[family]
    fresh = timm.create_model(name, pretrained=False, **kwargs).eval()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        assert _rel(merged(x), y) < 1e-5
        assert _rel(fresh(x), y) < 1e-5


def test_folded_weights_follow_the_lora_formula_times_the_factor():
    teacher = _adapted_teacher("vit", "lora-then-reweight")
    fc1, fc2 = teacher.blocks[1].mlp.fc1, teacher.blocks[1].mlp.fc2
    c = float(teacher.blocks[1].mlp.remem_scale.detach())

    def expected(layer, factor):
        w = layer.base_layer.weight.double()
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        return factor * (w + (ALPHA / RANK) * b @ a), factor * layer.base_layer.bias.double()

    (w1, b1), (w2, b2) = expected(fc1, 1.0), expected(fc2, c)  # the factor folds into fc2 only (the branch's end)
    merged = merge_lora(teacher)
    torch.testing.assert_close(merged.blocks[1].mlp.fc1.weight.double(), w1, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged.blocks[1].mlp.fc1.bias.double(), b1, rtol=0, atol=0)
    torch.testing.assert_close(merged.blocks[1].mlp.fc2.weight.double(), w2, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged.blocks[1].mlp.fc2.bias.double(), b2, rtol=0, atol=1e-6)


def test_factors_false_folds_only_the_adapters():
    teacher = _adapted_teacher("vit", "lora-then-reweight")
    scales = timm_remem.get_scales(teacher)
    x = example("vit")
    with torch.no_grad():
        y = teacher(x)
    merged = merge_lora(teacher, factors=False)
    assert not is_lora(merged) and timm_remem.get_scales(merged) == scales
    with torch.no_grad():
        assert _rel(merged(x), y) < 1e-5


def test_a_bare_lora_layer_merges_into_its_base_layer_by_the_lora_formula():
    peft = pytest.importorskip("peft")
    layer = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 3)),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"])).base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    expected = layer.base_layer.weight.double() + (4 / 2) * b @ a
    merged = merge_lora(layer)
    assert type(merged) is torch.nn.Linear
    torch.testing.assert_close(merged.weight.double(), expected, rtol=0, atol=1e-6)


def test_a_model_without_adapters_is_refused():
    with pytest.raises(ConfigError, match=r"holds no peft LoRA adapter; nothing to merge"):
        merge_lora(create("vit"))


def test_non_finite_adapters_are_refused_and_nothing_is_folded():
    teacher = _adapted_teacher("vit", "lora-then-reweight")
    with torch.no_grad():
        teacher.blocks[0].attn.qkv.lora_B["default"].weight[0, 0] = float("nan")
    before = copy.deepcopy(teacher.state_dict())
    with pytest.raises(TrainingError, match=r"blocks\.0\.attn\.qkv.*NaN or infinite weights; nothing was merged"):
        merge_lora(teacher)
    assert is_lora(teacher)
    after = teacher.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v, ) or k.endswith("lora_B.default.weight")
                                                 and torch.equal(after[k].nan_to_num(), v.nan_to_num())
                                                 for k, v in before.items())


@pytest.mark.parametrize("order", ["lora-then-reweight", "reweight-then-lora"])
def test_a_non_finite_factor_is_refused_before_peft_folds_anything(order):
    teacher = _adapted_teacher("vit", order)
    with torch.no_grad():
        teacher.blocks[1].mlp.remem_scale.fill_(float("inf"))
    before = copy.deepcopy(teacher.state_dict())
    with pytest.raises(TrainingError, match=r"the factor of the MLP branch blocks\.1\.mlp \(block 1\) is inf: "
                                            r"non-finite factors are never merged"):
        merge_lora(teacher)
    assert is_lora(teacher) and timm_remem.is_reweighted(teacher)  # the adapters were not folded either
    after = teacher.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert merge_lora(teacher, factors=False) is teacher  # folding the adapters alone stays possible
