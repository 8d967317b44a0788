"""Behaviour of timm_remem.reweight / merge / unreweight / get_scales on small timm models.

References are independent of the code under test: factors are computed by hand from the documented formula,
and reweighted outputs are compared with forward hooks that scale the named submodule (``blocks.i.mlp``) of an
untouched copy of the model.
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import timm.optim
import torch

import timm_remem
from timm_remem import ConfigError, NotReweightedError, UnsupportedModelError

DEPTH = 4


def make_vit(**kwargs) -> torch.nn.Module:
    """A 4-block ViT with LayerScale and perturbed weights, so scaling a branch visibly changes the output."""
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=DEPTH, num_heads=2, num_classes=5, init_values=0.5)
    args.update(kwargs)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, **args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hooked_reference(model: torch.nn.Module, factors: dict[int, float]) -> torch.nn.Module:
    """Copy of ``model`` whose ``blocks.i.mlp`` outputs are multiplied by ``factors[i]`` through forward hooks."""
    ref = copy.deepcopy(model)
    for i, f in factors.items():
        ref.blocks[i].mlp.register_forward_hook(lambda mod, args, out, f=f: out * f)
    return ref


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------------
# Factors


def test_exponential_schedule_gives_alpha_power_bottom_up():
    model = timm_remem.reweight(make_vit(), alpha=0.8)
    assert list(timm_remem.get_scales(model).values()) == pytest.approx([0.8, 0.64, 0.512, 0.4096])


def test_top_k_reweights_only_the_top_blocks_and_top_gets_alpha_power_k():
    model = timm_remem.reweight(make_vit(), alpha=0.5, top_k=2)
    assert timm_remem.get_scales(model) == pytest.approx({"blocks.2.mlp": 0.5, "blocks.3.mlp": 0.25})
    assert not isinstance(model.blocks[0].mlp, timm_remem.reweighting.ScaledBranch)


def test_constant_schedule():
    model = timm_remem.reweight(make_vit(), alpha=0.9, schedule="constant", top_k=3)
    assert list(timm_remem.get_scales(model).values()) == pytest.approx([0.9, 0.9, 0.9])


def test_sequence_schedule_is_used_bottom_up():
    model = timm_remem.reweight(make_vit(), schedule=[0.9, 0.7], top_k=2)
    assert timm_remem.get_scales(model) == pytest.approx({"blocks.2.mlp": 0.9, "blocks.3.mlp": 0.7})


def test_callable_schedule_receives_index_and_k():
    model = timm_remem.reweight(make_vit(), schedule=lambda i, k: 1.0 - 0.1 * (i + 1) / k)
    assert list(timm_remem.get_scales(model).values()) == pytest.approx([0.975, 0.95, 0.925, 0.9])


def test_reweight_twice_replaces_factors_never_stacks(x):
    model = make_vit()
    ref = hooked_reference(model, {i: 0.5 ** (i + 1) for i in range(DEPTH)})
    timm_remem.reweight(model, alpha=0.9)
    timm_remem.reweight(model, alpha=0.5)
    assert list(timm_remem.get_scales(model).values()) == pytest.approx([0.5, 0.25, 0.125, 0.0625])
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Outputs, merge, unreweight


def test_factor_one_is_bit_identical(x):
    model = make_vit()
    with torch.no_grad():
        before = model(x)
        timm_remem.reweight(model, alpha=1.0)
        assert torch.equal(model(x), before)


def test_reweighted_output_equals_hooked_reference(x):
    model = make_vit()
    ref = hooked_reference(model, {2: 0.7, 3: 0.49})
    timm_remem.reweight(model, alpha=0.7, top_k=2)
    with torch.no_grad():
        out, expected = model(x), ref(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.allclose(out, make_vit()(x), atol=1e-4)  # the check can fail: factors change the output


def test_merge_is_exact_and_strict_loads_into_fresh_timm_model(x):
    model = timm_remem.reweight(make_vit(), alpha=0.6)
    with torch.no_grad():
        wrapped = model(x)
        merged = timm_remem.merge(model)
        assert not timm_remem.is_reweighted(merged)
        fresh = make_vit()
        fresh.load_state_dict(merged.state_dict(), strict=True)
        out = fresh(x)
    assert ((out - wrapped).norm() / wrapped.norm()).item() <= 1e-5


def test_unreweight_restores_original_bit_for_bit(x):
    model = make_vit()
    original = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        before = model(x)
        timm_remem.unreweight(timm_remem.reweight(model, alpha=0.5, learnable=True))
        assert torch.equal(model(x), before)
    assert list(model.state_dict()) == list(original)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_merge_like_fp32_fold(x, dtype):
    model = timm_remem.reweight(make_vit().to(dtype), alpha=0.7)
    fc2 = model.blocks[3].mlp.fc2
    expected_w = (fc2.weight.detach().float() * 0.7**4).to(dtype)
    timm_remem.merge(model)
    assert model.blocks[3].mlp.fc2.weight.dtype == dtype
    torch.testing.assert_close(model.blocks[3].mlp.fc2.weight, expected_w, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# State dict


def test_state_dict_keeps_original_keys_and_adds_one_remem_scale_per_branch():
    model = make_vit()
    keys = list(model.state_dict())
    timm_remem.reweight(model, alpha=0.8, top_k=3)
    new_keys = list(model.state_dict())
    added = [k for k in new_keys if k not in keys]
    assert set(keys) <= set(new_keys)
    assert sorted(added) == ["blocks.1.mlp.remem_scale", "blocks.2.mlp.remem_scale", "blocks.3.mlp.remem_scale"]


def test_plain_timm_checkpoint_loads_strictly_into_reweighted_model_and_keeps_factors(x):
    plain = make_vit()
    ref = hooked_reference(plain, {i: 0.8 ** (i + 1) for i in range(DEPTH)})
    model = timm_remem.reweight(make_vit(), alpha=0.8)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # so the checkpoint must really overwrite every weight
    model.load_state_dict(plain.state_dict(), strict=True)
    assert list(timm_remem.get_scales(model).values()) == pytest.approx([0.8, 0.64, 0.512, 0.4096])
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_reweighted_state_dict_restores_factors():
    source = timm_remem.reweight(make_vit(), schedule=[0.3, 0.2], top_k=2)
    target = timm_remem.reweight(make_vit(), alpha=0.9, top_k=2)
    target.load_state_dict(source.state_dict(), strict=True)
    assert timm_remem.get_scales(target) == pytest.approx({"blocks.2.mlp": 0.3, "blocks.3.mlp": 0.2})


# ---------------------------------------------------------------------------------------------------------------
# Learnable factors and training tools


def test_learnable_factors_receive_gradients_and_are_parameters(x):
    model = timm_remem.reweight(make_vit(), alpha=0.8, learnable=True)
    scales = [m.remem_scale for m in model.modules() if isinstance(m, timm_remem.reweighting.ScaledBranch)]
    assert all(isinstance(s, torch.nn.Parameter) for s in scales)
    model(x).square().sum().backward()
    assert all(s.grad is not None and s.grad.abs() > 0 for s in scales)


def test_buffer_factors_are_not_parameters():
    model = timm_remem.reweight(make_vit(), alpha=0.8)
    assert not any(n.endswith("remem_scale") for n, _ in model.named_parameters())


def test_learnable_factors_go_to_timm_no_weight_decay_group():
    model = timm_remem.reweight(make_vit(), alpha=0.8, learnable=True)
    opt = timm.optim.create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=0.05)
    scale_ids = {id(m.remem_scale) for m in model.modules() if isinstance(m, timm_remem.reweighting.ScaledBranch)}
    groups = [g for g in opt.param_groups if any(id(p) in scale_ids for p in g["params"])]
    assert groups and all(g["weight_decay"] == 0.0 for g in groups)


def test_deepcopy_and_model_ema_keep_working(x):
    model = timm_remem.reweight(make_vit(), alpha=0.7, learnable=True)
    clone = copy.deepcopy(model)
    ema = timm.utils.ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
        model.blocks[3].mlp.remem_scale.fill_(0.1)
        ema.update(model)
    assert ema.module.blocks[3].mlp.remem_scale.item() == pytest.approx(0.5 * 0.7**4 + 0.5 * 0.1)


def test_forward_intermediates_and_features_only_keep_working(x):
    model = make_vit()
    ref = hooked_reference(model, {i: 0.8 ** (i + 1) for i in range(DEPTH)})
    timm_remem.reweight(model, alpha=0.8)
    with torch.no_grad():
        _, feats = model.forward_intermediates(x)
        _, ref_feats = ref.forward_intermediates(x)
    assert len(feats) == DEPTH
    for a, b in zip(feats, ref_feats, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(0)
    fo = timm.create_model("test_vit", pretrained=False, img_size=32, features_only=True).eval()
    with torch.no_grad():
        before = [f.clone() for f in fo(x)]
        timm_remem.reweight(fo, alpha=0.5)
        after = fo(x)
    assert len(after) == len(before) and not torch.allclose(after[-1], before[-1])


def test_torch_compile_fullgraph(x):
    model = timm_remem.reweight(timm.create_model("test_vit", pretrained=False, img_size=32).eval(), alpha=0.8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_config_records_settings_and_round_trips_through_dict():
    model = timm_remem.reweight(make_vit(), alpha=0.8, top_k=2)
    config = timm_remem.get_reweight_config(model)
    assert (config.alpha, config.schedule, config.top_k, config.num_blocks) == (0.8, "exponential", 2, DEPTH)
    assert config.factors == pytest.approx([0.8, 0.64])
    data = config.to_dict()
    assert list(data) == sorted(data) and data["version"] == timm_remem.__version__
    with pytest.warns(UserWarning, match="unknown keys"):
        again = timm_remem.ReweightConfig.from_dict({**data, "from_the_future": 1})
    assert again == config
    timm_remem.merge(model)
    assert timm_remem.get_reweight_config(model).merged is True


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("alpha", [0, -0.5, math.inf, math.nan])
def test_bad_alpha_is_refused_with_the_value(alpha):
    with pytest.raises(ConfigError, match=r"alpha must be a finite number > 0, got"):
        timm_remem.reweight(make_vit(), alpha=alpha)


def test_non_numeric_alpha_is_refused():
    with pytest.raises(ConfigError, match=r"alpha must be a real number, got '0.8'"):
        timm_remem.reweight(make_vit(), alpha="0.8")


def test_unknown_schedule_lists_the_choices():
    with pytest.raises(ConfigError, match=r"unknown schedule 'linear': use 'exponential', 'constant'"):
        timm_remem.reweight(make_vit(), schedule="linear")


def test_schedule_of_wrong_length_says_how_many():
    with pytest.raises(ConfigError, match=r"schedule has 3 factors but 4 blocks are reweighted"):
        timm_remem.reweight(make_vit(), schedule=[0.9, 0.8, 0.7])


@pytest.mark.parametrize("top_k", [0, DEPTH + 1, -1])
def test_top_k_out_of_range_names_the_range(top_k):
    with pytest.raises(ConfigError, match=rf"top_k={top_k} is out of range: .* has {DEPTH} blocks"):
        timm_remem.reweight(make_vit(), top_k=top_k)


def test_failed_reweight_leaves_model_untouched():
    model = make_vit()
    with pytest.raises(ConfigError):
        timm_remem.reweight(model, top_k=99)
    assert not timm_remem.is_reweighted(model)


def test_convnet_without_mlp_branch_names_the_class():
    with pytest.raises(UnsupportedModelError, match=r"ResNet has no transformer MLP residual branch"):
        timm_remem.reweight(timm.create_model("resnet10t", pretrained=False))


def test_convnext_mlp_is_whole_branch_and_is_refused():
    model = timm.create_model("convnext_atto", pretrained=False)
    with pytest.raises(ValueError, match=r"ConvNeXt has no transformer MLP residual branch: .*ConvNeXt-style"):
        timm_remem.reweight(model)


def test_merge_or_unreweight_a_plain_model_says_reweight_first():
    with pytest.raises(NotReweightedError, match=r"cannot merge VisionTransformer: it is not reweighted"):
        timm_remem.merge(make_vit())
    with pytest.raises(NotReweightedError, match=r"cannot unreweight"):
        timm_remem.unreweight(make_vit())


def test_merge_twice_says_it_was_merged_already():
    model = timm_remem.merge(timm_remem.reweight(make_vit(), alpha=0.8))
    with pytest.raises(NotReweightedError, match=r"already merged"):
        timm_remem.merge(model)


def test_inference_scales_in_place_without_touching_an_aliased_input(x):
    class Echo(torch.nn.Module):  # returns its input: scaling it in place would corrupt the residual stream
        def forward(self, t):
            return t

    wrapper = timm_remem.reweighting.ScaledBranch(Echo(), 0.5)
    t = torch.ones(3)
    with torch.no_grad():
        out = wrapper(t)
    assert torch.equal(t, torch.ones(3)) and torch.equal(out, torch.full((3,), 0.5))
    model = make_vit()
    ref = hooked_reference(model, {i: 0.7 ** (i + 1) for i in range(DEPTH)})
    timm_remem.reweight(model, alpha=0.7)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    out = model(x)
    out.sum().backward()  # the training path keeps an out-of-place multiply (autograd-safe)
