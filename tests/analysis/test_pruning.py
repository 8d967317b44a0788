"""Top-down pruning diagnostic: exact k=0 baseline, hooks removed, pruned forward equals a hand-written one."""

from __future__ import annotations

import pytest
import timm
import torch

import timm_remem
from timm_remem.analysis.pruning import pruning_diagnostic, zero_branches
from timm_remem.errors import ConfigError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3).eval()
    with torch.no_grad():  # larger head so that pruning visibly moves predictions
        m.head.weight.mul_(20)
    return m


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(20, 3, 32, 32, generator=g), torch.randint(0, 3, (20,), generator=g)) for _ in range(2)]


def manual_forward(model, images, skip_mlp=(), skip_attn=()):
    """ViT forward written out by hand, leaving out the MLP / attention branch of the given blocks."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    for i, blk in enumerate(model.blocks):
        if i not in skip_attn:
            x = x + blk.ls1(blk.attn(blk.norm1(x)))
        if i not in skip_mlp:
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.forward_head(model.norm(x))


def accuracy(logits_fn, data) -> float:
    with torch.no_grad():
        return sum(int((logits_fn(x).argmax(-1) == y).sum()) for x, y in data) / sum(len(y) for _, y in data)


def test_k0_equals_unpruned_accuracy_and_model_is_restored(model, data):
    x = data[0][0]
    with torch.no_grad():
        before = model(x)
    result = pruning_diagnostic(model, data, ks=[0, 3], progress=False)
    assert result.num_blocks == 6
    for kind in ("mlp", "attn"):
        assert result.curve(kind)[0] == (0, accuracy(model, data))
    with torch.no_grad():
        assert torch.equal(model(x), before)  # bit-identical: every hook is gone
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_top_k_rows_match_hand_pruned_forward(model, data):
    result = pruning_diagnostic(model, data, ks=[2, 6], progress=False)
    rows = {(r["kind"], r["k"]): r for r in result.rows}
    assert rows[("mlp", 2)]["blocks"] == [4, 5]
    ref = accuracy(lambda x: manual_forward(model, x, skip_mlp={4, 5}), data)
    assert rows[("mlp", 2)]["accuracy"] == pytest.approx(ref)
    ref = accuracy(lambda x: manual_forward(model, x, skip_attn=set(range(6))), data)
    assert rows[("attn", 6)]["accuracy"] == pytest.approx(ref)
    # with every attention branch gone the class token never sees the image: constant logits carry no information
    assert rows[("attn", 6)]["i_xf"] == pytest.approx(0.0, abs=1e-9)


def test_zeroing_all_mlps_changes_outputs_exactly_as_removing_them(model, data):
    x = data[0][0]
    with torch.no_grad():
        plain = model(x)
        with zero_branches(timm_remem.reweighting.find_branches(model, "mlp")):
            pruned = model(x)
        ref = manual_forward(model, x, skip_mlp=set(range(6)))
        after = model(x)
    assert not torch.allclose(pruned, plain, atol=1e-3)
    torch.testing.assert_close(pruned, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, plain)


def test_out_of_range_k_is_refused(model, data):
    with pytest.raises(ConfigError, match=r"each k must be an int in 0\.\.6"):
        pruning_diagnostic(model, data, ks=[7], progress=False)


def test_unknown_kind_is_refused(model, data):
    with pytest.raises(ConfigError, match="kinds must be a non-empty subset"):
        pruning_diagnostic(model, data, kinds=["norm"], progress=False)
