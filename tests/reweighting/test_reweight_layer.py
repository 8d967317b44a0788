"""``ScaledBranch``: the scaled module keeps its identity, paths and state-dict keys (plus ``remem_scale``); plain
checkpoints load into it; pickling and deepcopy rebuild it; folding and its refusal; ``unscale``.

References are plain (never scaled) timm models and torch modules.
"""

from __future__ import annotations

import copy
import io

import pytest
import timm
import torch
from torch import nn

import timm_remem
from timm_remem import ConfigError, UnsupportedModelError
from timm_remem.reweighting import ScaledBranch, unscale
from timm_remem.reweighting.layer import fold_tensors

pytestmark = pytest.mark.usefixtures("one_thread")


def make_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, img_size=32, depth=3, num_classes=5).eval()


def expected_keys(plain: nn.Module, paths: list[str]) -> list[str]:
    """The plain model's keys with ``<path>.remem_scale`` before the first key of each scaled path (torch's order:
    a module's own tensors come before its children's)."""
    keys = list(plain.state_dict())
    for path in paths:
        first = min(i for i, k in enumerate(keys) if k.startswith(path + "."))
        keys.insert(first, f"{path}.remem_scale")
    return keys


def test_state_dict_is_the_plain_keys_plus_the_factor_at_the_branch():
    plain = make_vit()
    model = timm_remem.reweight(copy.deepcopy(plain), alpha=0.8, top_k=2)
    assert list(model.state_dict()) == expected_keys(plain, ["blocks.1.mlp", "blocks.2.mlp"])


def test_state_dict_version_metadata_is_the_plain_models():
    plain = make_vit()
    model = timm_remem.reweight(copy.deepcopy(plain), alpha=0.8)
    assert dict(model.state_dict()._metadata) == dict(plain.state_dict()._metadata)


def test_scaled_module_is_the_same_object_and_keeps_keys_and_version():
    norm = nn.BatchNorm1d(4)  # BatchNorm has _version 2, a plain Module 1
    keys = list(norm.state_dict())
    branch = ScaledBranch(norm, 0.5)
    assert branch is norm and isinstance(branch, nn.BatchNorm1d) and type(branch).__name__ == "ScaledBatchNorm1d"
    sd = branch.state_dict()
    assert sorted(sd) == sorted([*keys, "remem_scale"])
    assert sd._metadata[""] == {"version": 2}
    assert sd["remem_scale"].item() == 0.5


def test_plain_module_state_dict_loads_strictly_and_keeps_the_factor():
    source = nn.Linear(3, 2)
    branch = ScaledBranch(nn.Linear(3, 2), 0.25, learnable=True)
    result = branch.load_state_dict(source.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(branch.weight, source.weight) and branch.remem_scale.item() == 0.25


def test_deepcopy_and_pickling_rebuild_the_scaled_class():
    plain = make_vit()
    model = timm_remem.reweight(copy.deepcopy(plain), alpha=0.8, top_k=1)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert type(clone.blocks[2].mlp) is type(model.blocks[2].mlp)
        assert list(clone.state_dict()) == expected_keys(plain, ["blocks.2.mlp"])
        clone.load_state_dict(plain.state_dict(), strict=True)
        assert timm_remem.get_scales(clone) == pytest.approx({"blocks.2.mlp": 0.8})


def test_keep_vars_returns_the_live_parameters():
    branch = ScaledBranch(nn.Linear(3, 2), 0.5, learnable=True)
    sd = branch.state_dict(keep_vars=True)
    assert sd["weight"] is branch.weight and sd["remem_scale"] is branch.remem_scale


def test_fold_matches_the_scaled_forward():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1)
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        expected = conv(x) * 0.3
        branch = ScaledBranch(conv, 0.3)
        branch.fold()
        torch.testing.assert_close(unscale(branch)(x), expected)
    assert type(conv) is nn.Conv2d and "remem_scale" not in conv.state_dict()


def test_fold_target_refuses_a_layer_without_affine_weight():
    branch = ScaledBranch(nn.Sequential(nn.Linear(3, 3), nn.GELU()), 0.5, fold_path="1")
    with pytest.raises(UnsupportedModelError, match=r"cannot fold the factor of ScaledSequential into its last layer "
                                                     r"GELU"):
        branch.fold_target()


def test_scaling_twice_or_a_non_module_is_refused():
    branch = ScaledBranch(nn.Linear(2, 2), 0.5)
    with pytest.raises(ConfigError, match=r"ScaledLinear is scaled already: call unscale\(module\) first"):
        ScaledBranch(branch, 0.5)
    with pytest.raises(ConfigError, match=r"ScaledBranch scales an nn.Module, got str"):
        ScaledBranch("fc2", 0.5)


def test_own_attribute_named_like_a_setting_wins():
    class WithIndex(nn.Linear):
        def __init__(self) -> None:
            super().__init__(2, 2)
            self.index = "mine"

    branch = ScaledBranch(WithIndex(), 0.5, index=3)
    assert branch.index == "mine" and branch.remem_index == 3


def test_fold_tensors_are_the_tensors_fold_multiplies():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 3))
    fused = nn.Linear(6, 2)
    for module, columns, fold_path in ((mlp, None, "2"), (fused, (2, 6), "")):
        tensors = fold_tensors(module, columns, fold_path, "branch")
        before = [t.detach().clone() for t in module.parameters()]
        branch = ScaledBranch(module, 0.5, columns=columns, fold_path=fold_path)
        branch.fold()
        changed = [p for p, b in zip(module.parameters(), before, strict=True) if not torch.equal(p, b)]
        assert {id(t) for t in changed} == {id(t) for t in tensors}
        unscale(branch)
    with pytest.raises(UnsupportedModelError, match=r"cannot fold the factor of branch into its last layer GELU"):
        fold_tensors(mlp, None, "1", "branch")
