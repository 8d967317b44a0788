"""Bad input to reweighting (factor range, learnable factors, torch tools, peft adapters): one clear error each.

Each case checks the exception's exact type and the quoted part of its message; "kept" cases also check that the
factors (the same Parameter objects), the weights and the outputs are what they were before the failure.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from reweighting.reweight_cases import create, get_case, perturb  # tests/reweighting/reweight_cases.py

import timm_remem
from timm_remem import ConfigError, UnsupportedModelError
from timm_remem.reweighting import ScaledBranch

pytestmark = pytest.mark.usefixtures("one_thread")


def _raises(error, match, call, *args, **kwargs):
    with pytest.raises(error, match=f"(?s){match}") as info:
        call(*args, **kwargs)
    assert type(info.value) is error, f"expected exactly {error.__name__}, got {type(info.value).__name__}"
    return info.value


def _vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5).eval()


X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))

# ------------------------------------------------------------------------------------------- factor range, flags
_CALLS = [
    pytest.param(lambda m: timm_remem.reweight(m, alpha=1.2), ConfigError,
                 r"alpha=1\.2 is > 1: it would amplify the MLP branch, while ReMem scales branches down with factors "
                 r"in \(0, 1\] \(e\.g\. alpha=0\.85\)\. Pass allow_amplify=True to reweight", id="alpha-above-one"),
    pytest.param(lambda m: timm_remem.reweight(m, schedule=[0.9] * 5 + [1.5]), ConfigError,
                 r"schedule\[5\]=1\.5 is > 1: it would amplify .*allow_amplify=True", id="schedule-factor-above-one"),
    pytest.param(lambda m: timm_remem.reweight(m, schedule=lambda i, k: 2.0), ConfigError,
                 r"schedule\(0, 6\)=2 is > 1: it would amplify .*allow_amplify=True", id="callable-factor-above-one"),
    pytest.param(lambda m: timm_remem.reweight(m, schedule=[0.9] * 5 + [0.0]), ConfigError,
                 r"schedule\[5\]=0 switches that MLP branch off, while ReMem scales branches down with factors in "
                 r"\(0, 1\]\. Pass allow_zero=True", id="schedule-zero-factor"),
    pytest.param(lambda m: timm_remem.reweight(m, alpha=1.2, allow_amplify="yes"), ConfigError,
                 r"allow_amplify must be True or False, got 'yes'", id="allow-amplify-string"),
    pytest.param(lambda m: timm_remem.reweight(m, alpha=0, allow_zero=True), ConfigError,
                 r"alpha must be a finite number > 0, got 0", id="alpha-zero-even-with-allow-zero"),
    pytest.param(lambda m: ScaledBranch(ScaledBranch(torch.nn.Linear(2, 2), 0.5), 0.5), ConfigError,
                 r"ScaledLinear is scaled already: call unscale\(module\) first", id="scaled-branch-twice"),
    pytest.param(lambda m: torch.jit.script(timm_remem.reweight(m, alpha=0.8)), UnsupportedModelError,
                 r"torch\.jit\.script cannot compile the reweighted branch ScaledMlp \(block 0\).*"
                 r"timm_remem\.merge\(model\).*torch\.jit\.trace\(model, example\)", id="jit-script"),
]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize(("call", "error", "match"), _CALLS)
def test_reweighting_rejects(call, error, match):
    model = _vit()
    before = copy.deepcopy(model.state_dict())
    _raises(error, match, call, model)
    if not timm_remem.is_reweighted(model):  # a refused reweight leaves the model as it was
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize(("kwargs", "factors"), [
    pytest.param({"alpha": 1.1, "top_k": 1, "allow_amplify": True}, {"blocks.5.mlp": 1.1}, id="amplify"),
    pytest.param({"schedule": [0.0, 0.5], "top_k": 2, "allow_zero": True}, {"blocks.4.mlp": 0.0, "blocks.5.mlp": 0.5},
                 id="zero"),
])
def test_reweighting_opt_ins_accept_what_they_name(kwargs, factors):
    model = timm_remem.reweight(_vit(), **kwargs)
    assert timm_remem.get_scales(model) == pytest.approx(factors)


# ------------------------------------------------------------------------------- learnable factors are kept
_LEARNABLE = [
    pytest.param({"alpha": 0.8}, r"VisionTransformer already has 6 learnable factors \(nn\.Parameter objects an "
                 r"optimizer may hold\) and learnable=False would turn them into buffers, replacing them\. Call "
                 r"reweight\(model, \.\.\., learnable=True\) with the same top_k", id="learnable-to-buffer"),
    pytest.param({"alpha": 0.8, "top_k": 2, "learnable": True}, r"already has 6 learnable factors .*blocks \[4, 5\] "
                 r"would get factors, not \[0, 1, 2, 3, 4, 5\].*timm_remem\.unreweight\(model\) first",
                 id="learnable-other-blocks"),
]


@pytest.mark.parametrize(("kwargs", "match"), _LEARNABLE)
def test_reweighting_keeps_learnable_factors(kwargs, match):
    model = timm_remem.reweight(_vit(), alpha=0.5, learnable=True)
    params = {n: p for n, p in model.named_parameters() if n.endswith("remem_scale")}
    with torch.no_grad():
        for i, p in enumerate(params.values()):
            p.fill_(0.3 + 0.1 * i)  # as if trained
        before = model(X)
    _raises(ConfigError, match, timm_remem.reweight, model, **kwargs)
    assert {n: p for n, p in model.named_parameters() if n.endswith("remem_scale")} == params  # same objects
    assert [p.item() for p in params.values()] == pytest.approx([0.3 + 0.1 * i for i in range(6)])
    with torch.no_grad():
        assert torch.equal(model(X), before)


def test_reweighting_rejects_meta_model_of_unlisted_family():
    with torch.device("meta"):
        model = timm.create_model("poolformerv2_s12", pretrained=False)
    _raises(UnsupportedModelError, r"MetaFormer is on the meta device and its block stages\.0\.blocks\.0 "
            r"\(MetaFormerBlock\) needs the value checks of the probe.*Build the model on a real device",
            timm_remem.reweight, model)


# ---------------------------------------------------------------------------------------------- peft adapters
def _lora(model, targets, **kwargs):
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    config = peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False, **kwargs)
    return peft.get_peft_model(model, config)


def _fused():
    case = get_case("parallel_scaling_fused")
    return perturb(create(case), seed=1).eval()


def test_reweighting_rejects_lora_that_never_runs():
    model = _lora(perturb(create(get_case("eva")), seed=1).eval(), ["qkv", "fc2"])
    _raises(UnsupportedModelError, r"the peft layer blocks\.0\.attn\.qkv \(Linear\) never runs in the forward pass: "
            r"EvaAttention reads its weight directly, so its LoRA update is ignored in training while "
            r"merge_and_unload\(\) would fold it in.*Leave 'qkv' out of target_modules", timm_remem.reweight, model)
    assert not timm_remem.is_reweighted(model)


def test_reweighting_rejects_lora_around_a_scaled_layer():
    model = timm_remem.reweight(_fused(), alpha=0.8)
    model = _lora(model, ["out_proj"])
    _raises(UnsupportedModelError, r"blocks\.0\.out_proj is a peft Linear around the reweighted layer "
            r"blocks\.0\.out_proj\.base_layer: its adapter update bypasses the factor.*Apply LoRA before reweight",
            timm_remem.get_scales, model)


def test_reweighting_rejects_a_branch_that_is_a_lora_layer():
    model = _lora(_fused(), ["out_proj"])
    _raises(UnsupportedModelError, r"the MLP branch of block 0 ends in the peft layer blocks\.0\.out_proj \(Linear\); "
            r"peft's merge_and_unload would drop a factor placed on it", timm_remem.reweight, model, alpha=0.8)
    assert not timm_remem.is_reweighted(model)


def test_reweighting_merge_rejects_dora_and_keeps_the_model():
    model = _lora(_vit(), ["fc2"], use_dora=True)
    timm_remem.reweight(model, alpha=0.8)
    with torch.no_grad():
        before = model(X)
    _raises(UnsupportedModelError, r"cannot fold the factor of ScaledMlp \(block 0\) into its peft layer Linear: only "
            r"plain LoRA layers \(no DoRA, no other adapter type\).*merge_and_unload\(\)\), then call "
            r"timm_remem\.merge\(model\)", timm_remem.merge, model)
    assert timm_remem.is_reweighted(model)
    with torch.no_grad():
        assert torch.equal(model(X), before)
