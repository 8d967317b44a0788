"""``ScaledBranch``: the wrapped module's state-dict keys, key order and version metadata are those of the
unwrapped module plus ``remem_scale``; plain checkpoints load into it; folding and its refusal.

References are plain (never wrapped) timm models and torch modules.
"""

from __future__ import annotations

import copy
import io

import pytest
import timm
import torch
from torch import nn

import timm_remem
from timm_remem import ScaledBranch, UnsupportedModelError

pytestmark = pytest.mark.usefixtures("one_thread")


def make_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, img_size=32, depth=3, num_classes=5).eval()


def expected_keys(plain: nn.Module, paths: list[str]) -> list[str]:
    """The plain model's keys with ``<path>.remem_scale`` after the last key of each wrapped path."""
    keys = list(plain.state_dict())
    for path in paths:
        last = max(i for i, k in enumerate(keys) if k.startswith(path + "."))
        keys.insert(last + 1, f"{path}.remem_scale")
    return keys


def test_state_dict_keeps_the_plain_key_order_with_the_factor_after_its_branch():
    plain = make_vit()
    model = timm_remem.reweight(copy.deepcopy(plain), alpha=0.8, top_k=2)
    assert list(model.state_dict()) == expected_keys(plain, ["blocks.1.mlp", "blocks.2.mlp"])


def test_state_dict_version_metadata_is_the_plain_models():
    plain = make_vit()
    model = timm_remem.reweight(copy.deepcopy(plain), alpha=0.8)
    assert dict(model.state_dict()._metadata) == dict(plain.state_dict()._metadata)


def test_wrapper_alone_reports_the_wrapped_modules_keys_and_version():
    norm = nn.BatchNorm1d(4)  # BatchNorm has _version 2, a plain Module 1
    branch = ScaledBranch(norm, 0.5)
    sd = branch.state_dict()
    assert list(sd) == [*norm.state_dict(), "remem_scale"]
    assert sd._metadata[""] == norm.state_dict()._metadata[""] == {"version": 2}
    assert sd["remem_scale"].item() == 0.5


def test_plain_module_state_dict_loads_strictly_and_keeps_the_factor():
    source = nn.Linear(3, 2)
    branch = ScaledBranch(nn.Linear(3, 2), 0.25, learnable=True)
    result = branch.load_state_dict(source.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(branch.base_layer.weight, source.weight) and branch.remem_scale.item() == 0.25


def test_state_dict_hooks_survive_deepcopy_and_pickling():
    plain = make_vit()
    model = timm_remem.reweight(copy.deepcopy(plain), alpha=0.8, top_k=1)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert list(clone.state_dict()) == expected_keys(plain, ["blocks.2.mlp"])
        clone.load_state_dict(plain.state_dict(), strict=True)
        assert timm_remem.get_scales(clone) == pytest.approx({"blocks.2.mlp": 0.8})


def test_keep_vars_returns_the_live_parameters():
    branch = ScaledBranch(nn.Linear(3, 2), 0.5, learnable=True)
    sd = branch.state_dict(keep_vars=True)
    assert sd["weight"] is branch.base_layer.weight and sd["remem_scale"] is branch.remem_scale


def test_fold_matches_the_scaled_forward():
    torch.manual_seed(0)
    branch = ScaledBranch(nn.Conv2d(3, 4, 1), 0.3)
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        expected = branch.base_layer(x) * 0.3
        branch.fold()
        torch.testing.assert_close(branch.base_layer(x), expected)


def test_fold_target_refuses_a_layer_without_affine_weight():
    branch = ScaledBranch(nn.Sequential(nn.Linear(3, 3), nn.GELU()), 0.5, fold_path="1")
    with pytest.raises(UnsupportedModelError, match=r"cannot fold the factor of Sequential into its last layer GELU"):
        branch.fold_target()
