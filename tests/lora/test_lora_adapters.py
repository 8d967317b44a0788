"""timm_remem.lora.adapters: which layers get adapters, what trains, what stays as it was.

References: the block Linear paths written out by hand in ``lora_cases.py``, parameter counts from the LoRA formula
``r * (in + out)`` per adapted Linear on the unadapted model, and the unadapted model's own outputs and factors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lora_cases import BYPASSED, FAMILIES, HEAD, create, example, expected_targets
from torch import nn

import timm_remem
from timm_remem.errors import ConfigError
from timm_remem.lora import apply_lora, is_lora, lora_config, trainable_parameters

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:apply_lora.*never called:UserWarning")]


def _adapted_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "lora_B")]


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_go_on_the_block_linears_only(family):
    model = apply_lora(create(family), rank=4)
    assert _adapted_paths(model) == expected_targets(family)
    assert set(lora_config(model).target_modules) == set(expected_targets(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_only_adapters_and_head_train_and_their_count_is_r_times_in_plus_out(family):
    plain = create(family)
    rank = 4
    expected = sum(rank * (m.in_features + m.out_features) for n, m in plain.named_modules()
                   if n in expected_targets(family))
    expected += sum(p.numel() for p in plain.get_submodule(HEAD[family]).parameters())
    model = apply_lora(copy.deepcopy(plain), rank=rank)
    assert trainable_parameters(model) == expected
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A.default." in n or ".lora_B.default." in n or n.startswith(HEAD[family] + ".")
               for n in trained)
    assert {f"{HEAD[family]}.weight", f"{HEAD[family]}.bias"} <= trained


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_adapters_leave_the_outputs_unchanged(family):
    plain = create(family).eval()
    x = example(family)
    with torch.no_grad():
        y = plain(x)
        y_lora = apply_lora(copy.deepcopy(plain), rank=4, alpha=16, dropout=0.1)(x)
    assert torch.equal(y_lora, y)  # peft initialises B = 0: base(x) + 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("order", ["lora-then-reweight", "reweight-then-lora"])
def test_adapters_leave_factors_and_branch_placement_unchanged(family, order):
    reference = timm_remem.reweight(create(family), alpha=0.7)
    model = create(family)
    if order == "lora-then-reweight":
        timm_remem.reweight(apply_lora(model, rank=2), alpha=0.7)
    else:
        apply_lora(timm_remem.reweight(model, alpha=0.7), rank=2)
    assert timm_remem.get_scales(model) == timm_remem.get_scales(reference)
    find_branches = timm_remem.reweighting.find_branches
    assert [b.path for b in find_branches(model)] == [b.path for b in find_branches(reference)]


def test_learnable_factors_made_before_the_adapters_keep_training():
    model = apply_lora(timm_remem.reweight(create("vit"), alpha=0.7, learnable=True), rank=2)
    factors = [n for n, p in model.named_parameters() if n.endswith("remem_scale")]
    assert len(factors) == 2
    assert all(p.requires_grad for n, p in model.named_parameters() if n.endswith("remem_scale"))


def test_targets_may_be_path_suffixes():
    model = apply_lora(create("vit"), rank=2, targets=["mlp.fc1"])
    assert _adapted_paths(model) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]


def test_alpha_defaults_to_the_rank_and_dropout_reaches_peft():
    config = lora_config(apply_lora(create("vit"), rank=6, dropout=0.25))
    assert (config.r, config.lora_alpha, config.lora_dropout) == (6, 6.0, 0.25)
    model = apply_lora(create("vit"), rank=4, alpha=2.0)
    assert model.blocks[0].attn.qkv.scaling["default"] == pytest.approx(0.5)  # alpha / r


def test_train_eval_mode_of_every_module_is_kept():
    model = create("vit").eval()
    apply_lora(model, rank=2, dropout=0.5)
    assert not any(m.training for m in model.modules())
    x = example("vit")
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # no dropout in eval mode


def test_a_model_with_adapters_is_refused_and_kept():
    model = apply_lora(create("vit"), rank=2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"already holds peft adapters; .*merge_lora"):
        apply_lora(model, rank=4)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_is_lora_is_false_for_plain_and_true_for_adapted_models():
    model = create("vit")
    assert not is_lora(model) and lora_config(model) is None
    assert is_lora(apply_lora(model, rank=2))


@pytest.mark.filterwarnings("error")
def test_layers_the_forward_reads_by_weight_get_no_adapter():
    """EVA's attention reads qkv.weight itself: an adapter there would be skipped in training, folded in merging."""
    with pytest.warns(UserWarning, match=r"2 Eva layers \(\['blocks\.0\.attn\.qkv', 'blocks\.1\.attn\.qkv'\]\) "
                                         r"are read by weight, never called: they get no adapter"):
        model = apply_lora(create("eva02"), rank=2)
    assert not any(p.endswith(".qkv") for p in _adapted_paths(model)) and BYPASSED["eva02"] == ("qkv",)
    with pytest.raises(ConfigError, match=r"lora_targets \['qkv'\] include layers that Eva's forward never calls"):
        apply_lora(create("eva02"), rank=2, targets=["qkv", "fc1"])


def test_adapted_layers_change_the_forward_of_every_family_that_trains_them():
    """Each adapter is on the forward path: moving its B changes the output (no silently bypassed adapter)."""
    for family in FAMILIES:
        model = apply_lora(create(family), rank=2).eval()
        x = example(family)
        with torch.no_grad():
            y = model(x)
            for path in _adapted_paths(model):
                layer = model.get_submodule(path)
                layer.lora_B["default"].weight.fill_(0.1)
                assert not torch.equal(model(x), y), f"{family}: {path} is bypassed"
                layer.lora_B["default"].weight.zero_()
