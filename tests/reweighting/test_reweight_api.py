"""Behaviour of timm_remem.reweight / merge / unreweight / get_scales on small timm models.

References are independent of the code under test: factors are computed by hand from the documented formula,
and reweighted outputs are compared with forward hooks that scale the named submodule (``blocks.i.mlp``) of an
untouched copy of the model.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
from pathlib import Path

import pytest
import timm
import timm.optim
import torch
from dist_wrappers import WRAPPERS, process_group
from reweight_cases import create, get_case, perturb
from torch.nn.parallel import DistributedDataParallel

import timm_remem
from timm_remem import ConfigError, NotReweightedError, TrainingError, UnsupportedModelError
from timm_remem.reweighting import ScaledBranch, unscale

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


# ---------------------------------------------------------------------------------------------------------------
# One source of truth for the factors (issue 20): every report is read from the modules when it is asked for; a
# merged model remembers its factors and refuses to stack new ones silently; what is reported is what is computed.


def _wrappers(model: torch.nn.Module) -> list[ScaledBranch]:
    """Every scaled branch once, bottom-up."""
    unique = {id(m): m for m in model.modules() if isinstance(m, ScaledBranch)}
    return sorted(unique.values(), key=lambda w: w.remem_index)


def _train_like(model: torch.nn.Module, values: list[float]) -> None:
    """Move the learnable factors away from their schedule, as an optimizer would."""
    with torch.no_grad():
        for w, v in zip(_wrappers(model), values, strict=True):
            w.remem_scale.fill_(v)


def _scaled_by_hand(factors: list[float]) -> torch.nn.Module:
    """The un-reweighted model with block ``i``'s MLP output multiplied by ``factors[i]`` (forward hooks)."""
    return hooked_reference(make_vit(), dict(enumerate(factors)))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


TRAINED = [0.9, 0.6, 0.45, 0.3]


def test_reports_are_read_from_the_modules_at_the_time_of_the_call(x):
    model = timm_remem.reweight(make_vit(), alpha=0.8, learnable=True)
    _train_like(model, TRAINED)
    config = timm_remem.get_reweight_config(model)
    assert config.factors == pytest.approx(TRAINED) and config.alpha == 0.8 and config.learnable
    assert list(timm_remem.get_scales(model).values()) == pytest.approx(TRAINED)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _scaled_by_hand(config.total_factors())(x), rtol=0, atol=0)
    config.factors[3], config.alpha = 0.01, 0.01  # a report is a copy: changing it changes nothing
    assert timm_remem.get_reweight_config(model).factors == pytest.approx(TRAINED)
    assert timm_remem.get_reweight_config(model).alpha == 0.8


def test_export_writes_the_factors_the_model_computes_with(tmp_path, x):
    model = timm_remem.reweight(make_vit(), alpha=0.8, learnable=True)
    _train_like(model, TRAINED)
    folder = timm_remem.save_pretrained(model, tmp_path / "teacher")
    remem = json.loads((folder / "config.json").read_text())["remem"]
    assert remem["factors"] == pytest.approx(TRAINED) and remem["merged"] is True
    loaded = timm_remem.load_teacher(folder)
    assert timm_remem.get_reweight_config(loaded).total_factors() == pytest.approx(TRAINED)
    with torch.no_grad():
        assert _relative(loaded(x), _scaled_by_hand(TRAINED)(x)) <= 1e-5


def test_a_wrapper_removed_by_hand_makes_the_record_disagree_and_it_is_refused():
    model = timm_remem.reweight(make_vit(), alpha=0.8)
    unscale(model.blocks[1].mlp)
    with pytest.raises(ConfigError, match=r"record of VisionTransformer says blocks \[0, 1, 2, 3\] are reweighted "
                                          r"\(top_k=None, 4 blocks\), but its wrappers are on blocks \[0, 2, 3\]"):
        timm_remem.get_reweight_config(model)


def test_parallel_branches_of_one_block_with_different_factors_are_refused_not_misreported(x):
    model = perturb(create(get_case("parallel_things")), seed=0).eval()
    timm_remem.reweight(model, alpha=0.8, learnable=True)
    with torch.no_grad():
        model.blocks[1].ffns[0].mlp.remem_scale.fill_(0.3)  # as if training had moved one branch only
        before = model(x)
    state = copy.deepcopy(model.state_dict())
    match = r"the parallel MLP branches of block 1 of VisionTransformer hold different factors \(blocks\.1\.ffns\.0" \
            r"\.mlp=0\.3, blocks\.1\.ffns\.1\.mlp=0\.64\)"
    with pytest.raises(ConfigError, match=match):
        timm_remem.get_reweight_config(model)
    with pytest.raises(ConfigError, match=match):
        timm_remem.merge(model)
    assert timm_remem.is_reweighted(model) and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(model(x), before)
    timm_remem.reweight(model, schedule=[0.7, 0.3], learnable=True)  # the fix the message names: one per block
    assert timm_remem.get_reweight_config(model).factors == pytest.approx([0.7, 0.3])


# ---------------------------------------------------------------------------------------------- merged, then again


def test_reweight_after_merge_is_refused_naming_both_fixes_and_changes_nothing(x):
    model = timm_remem.merge(timm_remem.reweight(make_vit(), alpha=0.5, top_k=2))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"VisionTransformer was reweighted and merged before: its weights already "
                                          r"hold the factors \[1, 1, 0\.5, 0\.25\] .*Pass compose=True to reweight.*"
                                          r"timm_remem\.unreweight\(model\) before merging"):
        timm_remem.reweight(model, alpha=0.9)
    assert not timm_remem.is_reweighted(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert timm_remem.get_reweight_config(model).factors == pytest.approx([0.5, 0.25])


@pytest.mark.parametrize("learnable", [False, True])
def test_compose_reports_the_product_and_the_model_computes_it(x, learnable):
    model = timm_remem.merge(timm_remem.reweight(make_vit(), alpha=0.5, top_k=2))
    timm_remem.reweight(model, alpha=0.8, top_k=3, compose=True, learnable=learnable)
    config = timm_remem.get_reweight_config(model)
    assert config.folded == pytest.approx([1, 1, 0.5, 0.25]) and config.factors == pytest.approx([0.8, 0.64, 0.512])
    total = [1.0, 0.8, 0.5 * 0.64, 0.25 * 0.512]
    assert config.total_factors() == pytest.approx(total)
    assert list(timm_remem.get_scales(model).values()) == pytest.approx([0.8, 0.64, 0.512])  # the wrappers' own
    reference = _scaled_by_hand(total)
    with torch.no_grad():
        assert _relative(model(x), reference(x)) <= 1e-5
        assert _relative(model(x), make_vit()(x)) > 1e-3  # the check can fail
        timm_remem.merge(model)  # and again: the record keeps both parts
        assert timm_remem.get_reweight_config(model).total_factors() == pytest.approx(total)
        assert _relative(model(x), reference(x)) <= 1e-5


def test_merged_record_survives_deepcopy_pickle_and_save_load(tmp_path, x):
    model = timm_remem.merge(timm_remem.reweight(make_vit(), alpha=0.5, top_k=2))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    folder = timm_remem.save_pretrained(model, tmp_path / "merged")
    copies = {"deepcopy": copy.deepcopy(model), "torch.save": torch.load(buffer, weights_only=False),
              "save_pretrained": timm_remem.load_teacher(folder)}
    for how, clone in copies.items():
        with pytest.raises(ConfigError, match=r"was reweighted and merged before"):
            timm_remem.reweight(clone, alpha=0.9)
        timm_remem.reweight(clone, alpha=0.9, top_k=1, compose=True)
        assert timm_remem.get_reweight_config(clone).total_factors() == pytest.approx([1, 1, 0.5, 0.25 * 0.9]), how
        with torch.no_grad():
            assert _relative(clone(x), _scaled_by_hand([1, 1, 0.5, 0.225])(x)) <= 1e-5, how


@pytest.mark.parametrize("merge", [False, True])
def test_composed_model_saved_and_loaded_keeps_both_parts(tmp_path, x, merge):
    model = timm_remem.merge(timm_remem.reweight(make_vit(), alpha=0.5, top_k=2))
    timm_remem.reweight(model, alpha=0.8, compose=True, learnable=True)
    _train_like(model, TRAINED)
    folder = timm_remem.save_pretrained(model, tmp_path / "composed", merge=merge)
    remem = json.loads((folder / "config.json").read_text())["remem"]
    assert remem["folded"] == pytest.approx([1, 1, 0.5, 0.25]) and remem["factors"] == pytest.approx(TRAINED)
    loaded = timm_remem.load_teacher(folder)
    total = [0.9, 0.6, 0.5 * 0.45, 0.25 * 0.3]
    assert timm_remem.is_reweighted(loaded) is not merge
    assert timm_remem.get_reweight_config(loaded).total_factors() == pytest.approx(total)
    with torch.no_grad():
        assert _relative(loaded(x), _scaled_by_hand(total)(x)) <= 1e-5
    with pytest.raises(ConfigError, match=r"merged before"):  # and it still refuses to stack silently
        timm_remem.reweight(loaded, alpha=0.9, learnable=True)


def test_unreweight_after_compose_gives_the_merged_model_back(x):
    model = timm_remem.merge(timm_remem.reweight(make_vit(), alpha=0.5, top_k=2))
    with torch.no_grad():
        merged = model(x)
    timm_remem.unreweight(timm_remem.reweight(model, alpha=0.8, compose=True))
    config = timm_remem.get_reweight_config(model)
    assert config.merged and config.total_factors() == pytest.approx([1, 1, 0.5, 0.25])
    with torch.no_grad():
        assert torch.equal(model(x), merged)
    with pytest.raises(ConfigError, match=r"merged before"):  # the weights still hold them
        timm_remem.reweight(model, alpha=0.8)


def test_compose_on_a_model_never_merged_is_a_plain_reweight():
    model = timm_remem.reweight(make_vit(), alpha=0.5, compose=True)
    assert timm_remem.get_reweight_config(model).folded == []


def test_merge_then_reweight_again_after_unreweight_starts_from_the_original(x):
    model = timm_remem.unreweight(timm_remem.reweight(make_vit(), alpha=0.5))  # unreweight: the original back
    timm_remem.reweight(model, alpha=0.9)  # nothing folded: no compose needed
    with torch.no_grad():
        torch.testing.assert_close(model(x), _scaled_by_hand([0.9 ** (i + 1) for i in range(DEPTH)])(x))


# ---------------------------------------------------------------------------------------------- non-finite factors


@pytest.mark.parametrize("where", ["factor", "weight"])
def test_non_finite_factors_or_branch_weights_are_never_merged_or_exported(tmp_path, x, where):
    model = timm_remem.reweight(make_vit(), alpha=0.8, learnable=True)
    with torch.no_grad():
        if where == "factor":
            model.blocks[2].mlp.remem_scale.fill_(math.nan)
        else:
            model.blocks[2].mlp.fc2.weight[0, 0] = math.inf
    state = copy.deepcopy(model.state_dict())
    match = (r"the factor of the MLP branch blocks\.2\.mlp \(block 2\) is nan" if where == "factor" else
             r"the MLP branch blocks\.2\.mlp \(block 2\) holds NaN or infinite weights \(blocks\.2\.mlp\.fc2\.weight\)")
    for call in (timm_remem.merge, timm_remem.get_reweight_config, timm_remem.reweighting.check_factors,
                 lambda m: timm_remem.save_pretrained(m, tmp_path / "out"),
                 lambda m: timm_remem.save_pretrained(m, tmp_path / "out", merge=False)):
        with pytest.raises(TrainingError, match=match):
            call(model)
    assert not (tmp_path / "out").exists()
    assert timm_remem.is_reweighted(model)
    after = model.state_dict()
    assert all(torch.equal(v.nan_to_num(), after[k].nan_to_num()) for k, v in state.items())


def test_non_finite_weights_outside_the_scaled_branches_are_not_the_factors_business():
    model = timm_remem.reweight(make_vit(), alpha=0.8, top_k=1)
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight[0, 0] = math.nan  # block 0 is not reweighted
    timm_remem.reweighting.check_factors(model)


# ---------------------------------------------------------------------------------------------- wrappers


@pytest.mark.parametrize("kind", list(WRAPPERS))
def test_reweighting_a_model_inside_a_distributed_wrapper_is_refused(kind):
    wrap, path = WRAPPERS[kind]
    with process_group():
        model = wrap(make_vit())
        where = "it is" if not path else f"its submodule '{path}' is"
        with pytest.raises(ConfigError, match=rf"cannot reweight {type(model).__name__}: {where} wrapped for "
                                              r"distributed training .*Reweight before wrapping"):
            timm_remem.reweight(model, alpha=0.8, learnable=True)
        assert not timm_remem.is_reweighted(model)


def test_the_fix_reweight_then_wrap_works_and_reports_see_through_the_wrapper(x):
    with process_group():
        model = timm_remem.reweight(make_vit(), alpha=0.8, top_k=2, learnable=True)
        ddp = DistributedDataParallel(model)
        assert timm_remem.get_scales(ddp) == pytest.approx({"blocks.2.mlp": 0.8, "blocks.3.mlp": 0.64})
        assert timm_remem.get_reweight_config(ddp).factors == pytest.approx([0.8, 0.64])
        ddp(x).sum().backward()
        assert model.blocks[3].mlp.remem_scale.grad is not None


@pytest.mark.parametrize("kind", ["fsdp", "fully-shard"])
def test_merging_a_sharded_model_is_refused(kind):
    wrap, _ = WRAPPERS[kind]
    with process_group():
        model = wrap(timm_remem.reweight(make_vit(), alpha=0.8))
        with pytest.raises(ConfigError, match=r"cannot merge .*wrapped for distributed training .*sharded or "
                                              r"flattened.*full_state_dict=True"):
            timm_remem.merge(model)
        assert timm_remem.is_reweighted(model)


def test_torch_compile_is_seen_through_and_recompiles(x):
    eager = timm_remem.reweight(make_vit(), alpha=0.6, top_k=2)
    compiled = torch.compile(make_vit(), backend="eager")
    with torch.no_grad():
        plain = compiled(x)  # compiled before reweighting: the graph must be rebuilt
        timm_remem.reweight(compiled, alpha=0.6, top_k=2)
        assert timm_remem.get_scales(compiled) == pytest.approx({"blocks.2.mlp": 0.6, "blocks.3.mlp": 0.36})
        torch.testing.assert_close(compiled(x), eager(x))
        assert not torch.allclose(compiled(x), plain)
        timm_remem.merge(compiled)
        timm_remem.merge(eager)
        torch.testing.assert_close(compiled(x), eager(x))


# ---------------------------------------------------------------------------------------------- records read back


def _saved_unmerged(tmp_path: Path, learnable: bool = True) -> Path:
    model = timm_remem.reweight(make_vit(), alpha=0.8, top_k=2, learnable=learnable)
    _train_like(model, [0.7, 0.4])
    return timm_remem.save_pretrained(model, tmp_path / "teacher", merge=False)


def _edit_factors(folder: Path, factors: list[float]) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["remem"]["factors"] = factors
    (folder / "config.json").write_text(json.dumps(config))


def test_factors_edited_in_config_json_are_not_reported(tmp_path, x):
    folder = _saved_unmerged(tmp_path)
    _edit_factors(folder, [0.1, 0.2])
    loaded = timm_remem.load_teacher(folder)
    assert timm_remem.get_reweight_config(loaded).factors == pytest.approx([0.7, 0.4])  # the loaded tensors
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), _scaled_by_hand([1, 1, 0.7, 0.4])(x))


def test_restore_warns_when_the_record_disagrees_and_the_model_wins(tmp_path):
    folder = _saved_unmerged(tmp_path)
    _edit_factors(folder, [0.1, 0.2])
    record = timm_remem.ReweightConfig.from_dict(
        {k: v for k, v in json.loads((folder / "config.json").read_text())["remem"].items()
         if k in {f.name for f in dataclasses.fields(timm_remem.ReweightConfig)}})
    model = timm_remem.load_teacher(folder)
    with pytest.warns(UserWarning, match=r"the reweighting record read for VisionTransformer disagrees with the model: "
                                         r"factors \[0\.1, 0\.2\] in the record, \[0\.7, 0\.4\] in the model\. The "
                                         r"record .* is what was saved, not an instruction"):
        report = timm_remem.reweighting.restore_reweight_config(model, record)
    assert report.factors == pytest.approx([0.7, 0.4]) and report.alpha == 0.8
    assert timm_remem.get_reweight_config(model).factors == pytest.approx([0.7, 0.4])


def test_restore_accepts_an_agreeing_record_silently(tmp_path, recwarn):
    folder = _saved_unmerged(tmp_path)
    model = timm_remem.load_teacher(folder)
    record = timm_remem.get_reweight_config(model)
    assert timm_remem.reweighting.restore_reweight_config(model, record) == record
    assert not [w for w in recwarn if "reweighting record" in str(w.message)]


def test_restore_refuses_an_unmerged_record_on_a_model_without_wrappers():
    record = timm_remem.ReweightConfig(alpha=0.8, top_k=2, factors=[0.8, 0.64], num_blocks=DEPTH)
    with pytest.raises(ConfigError, match=r"says the factors of VisionTransformer are kept separate \(merged=False\), "
                                          r"but it holds no ScaledBranch"):
        timm_remem.reweighting.restore_reweight_config(make_vit(), record)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = timm_remem.reweight(make_vit(), alpha=0.8, learnable=True)  # the fix: reweight, then wrap
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(rank))  # each rank its own data
    ddp(x).square().mean().backward()
    opt.step()
    torch.save(timm_remem.get_scales(model), f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_reweight_then_wrap_keeps_learnable_factors_in_step_across_ranks(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert first == second and first != {f"blocks.{i}.mlp": pytest.approx(0.8 ** (i + 1)) for i in range(DEPTH)}
