"""The reweighting matrix over every timm family in ``reweight_cases`` (one small configuration each).

The reference is the hand-written table in ``tests/reweighting/reweight_cases.py`` (which submodule's output, or
which input columns, carry each block's MLP branch), built by reading timm's source and never by running the
discovery code.
For each family: factor 1 is bit-identical; random per-block factors give the same output as forward hooks that
scale the table's submodules; merge is exact and strict-reloads into a fresh timm model; unreweight is
bit-exact; every learnable factor receives a gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch
from reweight_cases import (
    CASES,
    ERROR_CASES,
    apply_reference_scaling,
    create,
    example_input,
    perturb,
    random_factors,
)

import timm_remem

# Judgement calls in the table where timm-remem deliberately draws the line elsewhere (documented in README):
# only modules named mlp/mlp<N>/mlp_channels/mlp_out_proj (plus SwiftFormer's `linear`) are MLP branches, so
# mobile conv hybrids whose FFN is called `ffn`/`channel_mixer` or sits in a Residual wrapper are not reweighted.
NOT_REWEIGHTED = {
    "repvit": "channel_mixer / ffn of a convnet with a MetaFormer layout",
    "shvit": "Residual(FFN) modules named ffn",
    "efficientvit_msra": "Residual(FFN) modules named ffn",
    "efficientvim": "ffn of a state-space mixer block",
    "iformer": "FFN as its own module in the stage Sequential",
    "cpubone": "MLP ResidualBlock nested in a Sequential of ResidualBlocks",
    "csatv2": "gate transformer inside conv blocks",
}
MATRIX = [c for c in CASES if c.id not in NOT_REWEIGHTED]


pytestmark = pytest.mark.usefixtures("one_thread")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _marks(case):
    return [pytest.mark.slow] if getattr(case, "slow", False) else []


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=_marks(c)) for c in MATRIX])
def test_family_matrix(case):
    model = perturb(create(case), seed=0)
    x = example_input(case)
    factors = random_factors(case, seed=1)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        plain = model(x)

        # factor 1 is bit-identical
        timm_remem.reweight(model, alpha=1.0)
        assert torch.equal(model(x), plain), "factor 1 changed the output"

        # random per-block factors equal the hand-written reference
        timm_remem.reweight(model, schedule=list(factors))
        handles = apply_reference_scaling(reference, case, list(factors))
        expected = reference(x)
        for h in handles:
            h.remove()
        out = model(x)
        assert _relative(expected, plain) > 1e-4, "reference factors do not change the output: vacuous case"
        assert _relative(out, expected) <= 1e-6, f"reweighted output differs from reference for {case.id}"

        # merge is exact and strict-reloads into a fresh timm model
        merged = timm_remem.merge(copy.deepcopy(model))
        assert not timm_remem.is_reweighted(merged)
        fresh = create(case)
        fresh.load_state_dict(merged.state_dict(), strict=True)
        assert _relative(fresh(x), out) <= 1e-5

        # unreweight restores the original bit for bit
        timm_remem.unreweight(model)
        assert torch.equal(model(x), plain)

    # learnable factors all receive a gradient
    timm_remem.reweight(model, schedule=list(factors), learnable=True)
    model(x).float().square().mean().backward()
    scales = {id(m): m.remem_scale for m in model.modules() if isinstance(m, timm_remem.reweighting.ScaledBranch)}
    assert scales and all(s.grad is not None and s.grad.abs() > 0 for s in scales.values())


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in ERROR_CASES])
def test_models_without_mlp_branch_raise_value_error_naming_the_class(case):
    model = create(case)
    with pytest.raises(ValueError, match=rf"{type(model).__name__} has no transformer MLP residual branch"):
        timm_remem.reweight(model)


@pytest.mark.parametrize("case_id", ["parallel_scaling_fused", "swinv2", "coat"])
def test_reweighting_a_reweighted_model_replaces_factors(case_id):
    case = next(c for c in CASES if c.id == case_id)
    model = perturb(create(case), seed=0)
    reference = copy.deepcopy(model)
    x = example_input(case)
    factors = random_factors(case, seed=2)
    timm_remem.reweight(model, alpha=0.5)
    timm_remem.reweight(model, schedule=list(factors))
    handles = apply_reference_scaling(reference, case, list(factors))
    with torch.no_grad():
        assert _relative(model(x), reference(x)) <= 1e-6
    # learnable factors are set in place: the same Parameter objects, now holding the new factors
    timm_remem.reweight(model, alpha=0.5, learnable=True)
    before = {id(m.remem_scale) for m in model.modules() if isinstance(m, timm_remem.reweighting.ScaledBranch)}
    timm_remem.reweight(model, schedule=list(factors), learnable=True)
    after = {id(m.remem_scale) for m in model.modules() if isinstance(m, timm_remem.reweighting.ScaledBranch)}
    assert after == before
    with torch.no_grad():
        assert _relative(model(x), reference(x)) <= 1e-6
    for h in handles:
        h.remove()
