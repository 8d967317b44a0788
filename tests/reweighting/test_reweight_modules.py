"""A reweighted model behaves like any PyTorch module (issue 11 items 6 and 7).

The references are torch's own tools applied to the same model (``model.state_dict()``, ``model(x)``), an untouched
copy of the model with forward hooks that scale ``blocks.i.mlp`` by hand, and the modes and Parameter objects the
model had before the call.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict

import timm_remem
from timm_remem import UnsupportedModelError

pytestmark = pytest.mark.usefixtures("one_thread")

FACTORS = {4: 0.7, 5: 0.49}


def make_vit() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hooked(model: nn.Module, factors: dict[int, float]) -> nn.Module:
    ref = copy.deepcopy(model)
    for i, f in factors.items():
        ref.blocks[i].mlp.register_forward_hook(lambda mod, args, out, f=f: out * f)
    return ref


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------------- modes (11.6)


def _mixed_modes(model: nn.Module) -> dict[str, bool]:
    model.train()
    model.blocks[1].eval()  # e.g. a frozen block
    model.blocks[4].mlp.drop1.eval()
    model.norm.eval()
    return {n: m.training for n, m in model.named_modules()}


@pytest.mark.parametrize("call", [
    pytest.param(lambda m: timm_remem.reweight(m, alpha=0.7, top_k=2), id="reweight"),
    pytest.param(lambda m: timm_remem.reweighting.find_branches(m), id="find-branches"),
    pytest.param(lambda m: timm_remem.reweighting.find_branches(m, "attn"), id="find-attn-branches"),
])
def test_submodule_modes_are_kept(call):
    model = make_vit()
    modes = _mixed_modes(model)
    assert len(set(modes.values())) == 2
    call(model)
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_reweight_learnable_again_keeps_the_parameters_an_optimizer_holds(x):
    model = timm_remem.reweight(make_vit(), alpha=0.5, top_k=2, learnable=True)
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if n.endswith("remem_scale")], lr=0.1)
    timm_remem.reweight(model, schedule=[0.7, 0.49], top_k=2, learnable=True)
    assert timm_remem.get_scales(model) == pytest.approx({"blocks.4.mlp": 0.7, "blocks.5.mlp": 0.49})
    model(x).sum().backward()
    grads = {i: model.blocks[i].mlp.remem_scale.grad.item() for i in FACTORS}
    opt.step()  # the optimizer built before the second reweight trains the live factors
    for i, f in FACTORS.items():
        assert model.blocks[i].mlp.remem_scale.item() == pytest.approx(f - 0.1 * grads[i])


# -------------------------------------------------------------------------------------- torch tools (11.7)


def test_functional_call_with_the_state_dict_equals_the_forward(x):
    model = timm_remem.reweight(make_vit(), schedule=list(FACTORS.values()), top_k=2)
    with torch.no_grad():
        expected = hooked(make_vit(), FACTORS)(x)
        out = torch.func.functional_call(model, model.state_dict(), (x,))
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        # and the swapped tensors are really used: halving the last factor through functional_call changes it
        sd = {**model.state_dict(), "blocks.5.mlp.remem_scale": torch.tensor(0.245)}
        torch.testing.assert_close(torch.func.functional_call(model, sd, (x,)),
                                   hooked(make_vit(), {4: 0.7, 5: 0.245})(x), rtol=0, atol=0)


@pytest.mark.parametrize("learnable", [False, True])
def test_every_state_dict_key_is_a_real_parameter_or_buffer(learnable):
    model = timm_remem.reweight(make_vit(), alpha=0.8, learnable=learnable)
    params = dict(model.named_parameters())
    for key, value in model.state_dict(keep_vars=True).items():
        got = model.get_parameter(key) if key in params else model.get_buffer(key)
        assert got is value
    assert ("blocks.5.mlp.remem_scale" in params) is learnable


def test_distributed_checkpoint_state_dict_is_the_state_dict():
    model = timm_remem.reweight(make_vit(), alpha=0.8, learnable=True)
    sd, dcp = model.state_dict(), get_model_state_dict(model)
    assert list(dcp) == list(sd)
    assert all(torch.equal(dcp[k], v) for k, v in sd.items())


def test_meta_build_then_assign_load_equals_the_original(x):
    original = timm_remem.reweight(make_vit(), schedule=list(FACTORS.values()), top_k=2, learnable=True)
    with torch.device("meta"):
        meta = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5)
    timm_remem.reweight(meta, alpha=0.5, top_k=2, learnable=True)
    meta.load_state_dict(original.state_dict(), strict=True, assign=True)
    meta.eval()
    assert not any(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    assert timm_remem.get_scales(meta) == pytest.approx({"blocks.4.mlp": 0.7, "blocks.5.mlp": 0.49})
    assert isinstance(meta.blocks[5].mlp.remem_scale, nn.Parameter)
    with torch.no_grad():
        torch.testing.assert_close(meta(x), hooked(make_vit(), FACTORS)(x), rtol=0, atol=0)


def test_meta_model_of_an_unlisted_family_is_refused():
    with torch.device("meta"):
        model = timm.create_model("poolformerv2_s12", pretrained=False)  # its value checks cannot run on meta
    with pytest.raises(UnsupportedModelError, match=r"is on the meta device and its block .* Build the model on a "
                                                    r"real device"):
        timm_remem.reweight(model)


def test_forward_hooks_on_the_mlp_see_the_same_tensor_with_and_without_grad(x):
    model = timm_remem.reweight(make_vit(), schedule=list(FACTORS.values()), top_k=2)
    seen: dict[str, list[torch.Tensor]] = {"mlp": [], "fc2": []}
    model.blocks[5].mlp.register_forward_hook(lambda m, a, out: seen["mlp"].append(out))
    model.blocks[5].mlp.fc2.register_forward_hook(lambda m, a, out: seen["fc2"].append(out))
    with torch.no_grad():
        model(x)
    model(x)
    for name, (no_grad, grad) in seen.items():
        torch.testing.assert_close(no_grad, grad.detach(), rtol=0, atol=0, msg=name)
    # the mlp hook sees the branch's contribution (scaled), as it does after merge; fc2 sees its own output
    ref = hooked(make_vit(), FACTORS)  # the scaling hook runs first, so the next hook sees the scaled output
    ref_seen: dict[str, torch.Tensor] = {}
    ref.blocks[5].mlp.register_forward_hook(lambda m, a, out: ref_seen.setdefault("mlp", out))
    ref.blocks[5].mlp.fc2.register_forward_hook(lambda m, a, out: ref_seen.setdefault("fc2", out))
    with torch.no_grad():
        ref(x)
    for name in seen:
        torch.testing.assert_close(seen[name][0], ref_seen[name], rtol=0, atol=0, msg=name)
    assert not torch.allclose(ref_seen["mlp"], ref_seen["fc2"])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_jit_script_raises_one_clear_error_and_trace_works(x):
    model = timm_remem.reweight(make_vit(), alpha=0.8)
    with pytest.raises(UnsupportedModelError, match=r"torch\.jit\.script cannot compile the reweighted branch "
                                                    r"ScaledMlp .*timm_remem\.merge\(model\).*torch\.jit\.trace"):
        torch.jit.script(model)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), model(x), rtol=1e-6, atol=1e-6)
