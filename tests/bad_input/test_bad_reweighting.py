"""Bad input to reweighting (factor range, learnable factors, torch tools, peft adapters, one source of truth for the
factors): one clear error each.

Each case checks the exception's exact type and the quoted part of its message; "kept" cases also check that the
factors (the same Parameter objects), the weights and the outputs are what they were before the failure.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from reweighting.dist_wrappers import WRAPPERS, process_group  # tests/reweighting/dist_wrappers.py
from reweighting.reweight_cases import create, get_case, perturb  # tests/reweighting/reweight_cases.py

import timm_remem
from timm_remem import ConfigError, ReweightConfig, TrainingError, UnsupportedModelError
from timm_remem.reweighting import ScaledBranch, restore_reweight_config, unscale

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


# ----------------------------------------------------------------------------- one source of truth (issue 20)
def _merged(m):
    return timm_remem.merge(timm_remem.reweight(m, alpha=0.5, top_k=2))


def _tied(m):
    m.blocks[5].mlp.fc2.weight = m.blocks[4].mlp.fc2.weight
    return m


def _shared_mlp(m):
    m.blocks[5].mlp = m.blocks[4].mlp
    return m


def _learnable(m, value=None, weight=None):
    timm_remem.reweight(m, alpha=0.8, learnable=True)
    with torch.no_grad():
        if value is not None:
            m.blocks[5].mlp.remem_scale.fill_(value)
        if weight is not None:
            m.blocks[5].mlp.fc2.weight[0, 0] = weight
    return m


def _diverged_parallel(_):
    model = perturb(create(get_case("parallel_things")), seed=1).eval()
    timm_remem.reweight(model, alpha=0.8, learnable=True)
    with torch.no_grad():
        model.blocks[1].ffns[0].mlp.remem_scale.fill_(0.3)
    return model


def _unscaled_by_hand(m):
    timm_remem.reweight(m, alpha=0.8)
    unscale(m.blocks[1].mlp)
    return m


_UNMERGED_RECORD = ReweightConfig(alpha=0.8, top_k=2, factors=[0.8, 0.64], num_blocks=6)
_TRUTH = [
    pytest.param(_merged, lambda m, tmp: timm_remem.reweight(m, alpha=0.9), ConfigError,
                 r"VisionTransformer was reweighted and merged before: its weights already hold the factors "
                 r"\[1, 1, 1, 1, 0\.5, 0\.25\].*Pass compose=True to reweight to do that on purpose.*"
                 r"timm_remem\.unreweight\(model\) before merging gives them back", id="reweight-after-merge"),
    pytest.param(None, lambda m, tmp: timm_remem.reweight(m, compose="yes"), ConfigError,
                 r"compose must be True or False, got 'yes'", id="compose-string"),
    pytest.param(_tied, lambda m, tmp: timm_remem.reweight(m, alpha=0.8), ConfigError,
                 r"blocks\.4\.mlp\.fc2\.weight is also blocks\.5\.mlp\.fc2\.weight \(one tensor shared by two "
                 r"layers\).*Give each layer its own copy before reweighting", id="tied-fc2-weight"),
    pytest.param(_shared_mlp, lambda m, tmp: timm_remem.reweight(m, alpha=0.8, top_k=2), ConfigError,
                 r"the MLP branch blocks\.4\.mlp \(Mlp\) is one module registered in 2 blocks \(blocks\.4\.mlp, "
                 r"blocks\.5\.mlp\): it would be counted as one block.*copy\.deepcopy", id="shared-mlp-module"),
    pytest.param(lambda m: _tied(timm_remem.reweight(m, alpha=0.8)), lambda m, tmp: timm_remem.merge(m), ConfigError,
                 r"blocks\.4\.mlp\.fc2\.weight is also blocks\.5\.mlp\.fc2\.weight", id="merge-tied-after-reweight"),
    pytest.param(lambda m: _learnable(m, value=float("nan")), lambda m, tmp: timm_remem.merge(m), TrainingError,
                 r"the factor of the MLP branch blocks\.5\.mlp \(block 5\) is nan: non-finite factors are never "
                 r"merged, exported or reported, and nothing was changed.*resume from an earlier checkpoint",
                 id="merge-nan-factor"),
    pytest.param(lambda m: _learnable(m, weight=float("inf")), lambda m, tmp: timm_remem.merge(m), TrainingError,
                 r"the MLP branch blocks\.5\.mlp \(block 5\) holds NaN or infinite weights "
                 r"\(blocks\.5\.mlp\.fc2\.weight\)", id="merge-inf-branch-weight"),
    pytest.param(lambda m: _learnable(m, value=float("inf")),
                 lambda m, tmp: timm_remem.save_pretrained(m, tmp / "teacher", merge=False), TrainingError,
                 r"the factor of the MLP branch blocks\.5\.mlp \(block 5\) is inf", id="export-inf-factor"),
    pytest.param(_diverged_parallel, lambda m, tmp: timm_remem.merge(m), ConfigError,
                 r"the parallel MLP branches of block 1 of VisionTransformer hold different factors "
                 r"\(blocks\.1\.ffns\.0\.mlp=0\.3, blocks\.1\.ffns\.1\.mlp=0\.64\).*"
                 r"reweight\(model, schedule=\[\.\.\.\], learnable=True\)", id="parallel-branches-disagree"),
    pytest.param(_unscaled_by_hand, lambda m, tmp: timm_remem.get_reweight_config(m), ConfigError,
                 r"the reweighting record of VisionTransformer says blocks \[0, 1, 2, 3, 4, 5\] are reweighted "
                 r"\(top_k=None, 6 blocks\), but its wrappers are on blocks \[0, 2, 3, 4, 5\]",
                 id="wrapper-removed-by-hand"),
    pytest.param(None, lambda m, tmp: restore_reweight_config(m, _UNMERGED_RECORD), ConfigError,
                 r"the reweighting record says the factors of VisionTransformer are kept separate \(merged=False\), "
                 r"but it holds no ScaledBranch: reweight it as recorded", id="restore-unmerged-record-on-plain-model"),
    pytest.param(None, lambda m, tmp: ReweightConfig(alpha=0.8, top_k=2, factors=[0.8], num_blocks=6), ConfigError,
                 r"ReweightConfig has 1 factors, but top_k=2 and num_blocks=6 say 2 blocks are reweighted: the record "
                 r"is inconsistent", id="record-lengths-disagree"),
]


@pytest.mark.parametrize(("prepare", "call", "error", "match"), _TRUTH)
def test_reweighting_keeps_one_truth(prepare, call, error, match, tmp_path):
    model = _vit() if prepare is None else prepare(_vit())
    before = copy.deepcopy(model.state_dict())
    wrapped = timm_remem.is_reweighted(model)
    _raises(error, match, call, model, tmp_path)
    after = model.state_dict()  # nothing changed: same wrappers, same tensors (NaN compared as NaN)
    assert timm_remem.is_reweighted(model) == wrapped and list(after) == list(before)
    assert all(torch.equal(after[k].nan_to_num(), v.nan_to_num()) for k, v in before.items())
    assert not (tmp_path / "teacher").exists()


@pytest.mark.parametrize(("kind", "action"), [
    pytest.param("ddp", "reweight", id="ddp"),
    pytest.param("ddp-in-a-module", "reweight", id="ddp-nested-in-module-chain"),
    pytest.param("compiled-ddp", "reweight", id="torch-compile-of-ddp"),
    pytest.param("fsdp", "reweight", id="fsdp"),
    pytest.param("fully-shard", "reweight", id="fully-shard"),
    pytest.param("fully-shard", "merge", id="merge-fully-shard"),
])
def test_reweighting_refuses_distributed_wrappers(kind, action):
    wrap, path = WRAPPERS[kind]
    where = "it is" if not path else f"its submodule '{path}' is"
    with process_group():
        model = wrap(_vit() if action == "reweight" else timm_remem.reweight(_vit(), alpha=0.8))
        wrapped = timm_remem.is_reweighted(model)
        if action == "reweight":
            _raises(ConfigError, rf"cannot reweight {type(model).__name__}: {where} wrapped for distributed "
                    r"training \(\w+\), and the wrapper fixed the parameters it synchronises or shards when it was "
                    r"built.*Reweight before wrapping: timm_remem\.reweight\(model, \.\.\.\), then "
                    r"DistributedDataParallel\(model\)", timm_remem.reweight, model, alpha=0.8, learnable=True)
        else:
            _raises(ConfigError, rf"cannot merge {type(model).__name__}: {where} wrapped for distributed training "
                    r"\(fully_shard\), whose parameters are sharded or flattened.*full_state_dict=True",
                    timm_remem.merge, model)
        assert timm_remem.is_reweighted(model) == wrapped


def test_reweighting_warns_when_an_edited_record_disagrees_with_the_model():
    model = timm_remem.reweight(_vit(), alpha=0.8, top_k=2)
    edited = ReweightConfig(alpha=0.8, top_k=2, factors=[0.1, 0.2], num_blocks=6)  # as if config.json was edited
    with pytest.warns(UserWarning, match=r"the reweighting record read for VisionTransformer disagrees with the "
                                         r"model: factors \[0\.1, 0\.2\] in the record, \[0\.8, 0\.64\] in the model\. "
                                         r"The record \(the remem block of config\.json\) is what was saved, not an "
                                         r"instruction"):
        report = restore_reweight_config(model, edited)
    assert report.factors == pytest.approx([0.8, 0.64])
