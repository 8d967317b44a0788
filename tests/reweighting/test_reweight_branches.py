"""``Branch.kind``: where the scale on each branch sits, checked against the hand-written family table; and
``check_not_shared``: a branch module or folded weight shared between blocks is refused, aliases inside one block
are not sharing.

The reference is ``reweight_cases``: a path listed in ``input_column_slices`` is a fused projection's input columns,
a family whose MLP is marked "inside the branch: the norm after it ends the branch" is a post-norm family, and every
other branch path is the MLP's own output. Shared modules and tied weights are made here by assigning one module or
``Parameter`` at two paths; the reference outputs are an untouched copy with forward hooks scaling ``blocks.i.mlp``.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from reweight_cases import CASES, create

import timm_remem
from timm_remem import ConfigError
from timm_remem.reweighting.branches import BRANCH_KINDS

pytestmark = pytest.mark.usefixtures("one_thread")

NOT_REWEIGHTED = {"repvit", "shvit", "efficientvit_msra", "efficientvim", "iformer", "cpubone", "csatv2"}
MATRIX = [c for c in CASES if c.id not in NOT_REWEIGHTED]


def expected_kind(case, path: str) -> str:
    if path in case.input_column_slices:
        return "fused-columns"
    if any("the norm after it ends the branch" in why for why in case.non_branch_paths.values()):
        return "post-norm"
    return "output"


@pytest.mark.parametrize("case", MATRIX, ids=[c.id for c in MATRIX])
def test_branch_kind_matches_the_table(case):
    branches = timm_remem.reweighting.find_branches(create(case))
    assert {b.path: b.kind for b in branches} == {p: expected_kind(case, p) for p in case.all_paths}


def test_the_matrix_covers_every_kind():
    kinds = {expected_kind(c, p) for c in MATRIX for p in c.all_paths}
    assert kinds == set(BRANCH_KINDS)


def test_kind_is_the_same_on_a_reweighted_model():
    case = next(c for c in MATRIX if c.id == "vit_rpn")
    model = create(case)
    before = [(b.path, b.kind) for b in timm_remem.reweighting.find_branches(model)]
    timm_remem.reweight(model, alpha=0.7)
    assert [(b.path, b.kind) for b in timm_remem.reweighting.find_branches(model)] == before
    assert {kind for _, kind in before} == {"post-norm"}


# --------------------------------------------------------------------------------------------- shared between blocks


def make_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, img_size=32, depth=4, num_classes=5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hooked(model: torch.nn.Module, factors: dict[int, float]) -> torch.nn.Module:
    ref = copy.deepcopy(model)
    for i, f in factors.items():
        ref.blocks[i].mlp.register_forward_hook(lambda mod, args, out, f=f: out * f)
    return ref


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _tie(model: torch.nn.Module, source: int, target: int) -> torch.nn.Module:
    model.blocks[target].mlp.fc2.weight = model.blocks[source].mlp.fc2.weight
    return model


def _same_memory(model: torch.nn.Module, source: int, target: int) -> torch.nn.Module:
    """Two Parameter objects over one storage (as a flattened or hand-tied checkpoint can leave them)."""
    model.blocks[target].mlp.fc2.weight = torch.nn.Parameter(model.blocks[source].mlp.fc2.weight.data)
    return model


def _unchanged(model: torch.nn.Module, state: dict) -> bool:
    return list(model.state_dict()) == list(state) and all(torch.equal(model.state_dict()[k], v)
                                                          for k, v in state.items())


@pytest.mark.parametrize(("share", "top_k", "match"), [
    pytest.param(lambda m: _tie(m, 2, 3), None, r"blocks\.2\.mlp\.fc2\.weight is also blocks\.3\.mlp\.fc2\.weight "
                 r"\(one tensor shared by two layers\): folding the factor of the MLP branch blocks\.2\.mlp into it "
                 r"would also scale blocks\.3\.mlp\.fc2\.weight", id="tied-fc2-weight"),
    pytest.param(lambda m: _tie(m, 0, 3), 1, r"blocks\.3\.mlp\.fc2\.weight is also blocks\.0\.mlp\.fc2\.weight",
                 id="tied-with-a-block-left-alone"),
    pytest.param(lambda m: _same_memory(m, 3, 1), 1, r"blocks\.3\.mlp\.fc2\.weight is also blocks\.1\.mlp\.fc2\.weight",
                 id="two-parameters-one-storage"),
    pytest.param(lambda m: setattr(m.blocks[3].mlp, "fc2", m.blocks[2].mlp.fc2), 2,
                 r"blocks\.2\.mlp\.fc2\.weight is also blocks\.3\.mlp\.fc2\.weight", id="shared-fc2-module"),
    pytest.param(lambda m: setattr(m.blocks[3], "mlp", m.blocks[2].mlp), 2,
                 r"the MLP branch blocks\.2\.mlp \(Mlp\) is one module registered in 2 blocks \(blocks\.2\.mlp, "
                 r"blocks\.3\.mlp\): it would be counted as one block \(so top_k would count the wrong blocks\).*"
                 r"copy\.deepcopy", id="shared-mlp-module"),
    pytest.param(lambda m: setattr(m.blocks[1], "mlp", m.blocks[0].mlp), 1, r"registered in 2 blocks",
                 id="shared-mlp-module-below-top-k"),
])
def test_a_branch_shared_between_blocks_is_refused_and_nothing_changes(share, top_k, match):
    model = make_vit()
    share(model)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=match):
        timm_remem.reweight(model, alpha=0.7, top_k=top_k)
    assert not timm_remem.is_reweighted(model) and _unchanged(model, state)


def test_weights_tied_after_reweight_are_refused_by_merge():
    model = timm_remem.reweight(make_vit(), alpha=0.7)
    _tie(model, 2, 3)
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        before = model(X)
    with pytest.raises(ConfigError, match=r"blocks\.2\.mlp\.fc2\.weight is also blocks\.3\.mlp\.fc2\.weight"):
        timm_remem.merge(model)
    assert timm_remem.is_reweighted(model) and _unchanged(model, state)
    with torch.no_grad():
        assert torch.equal(model(X), before)


def test_weights_tied_between_blocks_left_alone_do_not_matter():
    model = _tie(make_vit(), 0, 1)  # top_k=2 scales blocks 2 and 3: merge never touches the tied weight
    reference = hooked(model, {2: 0.7, 3: 0.49})
    timm_remem.merge(timm_remem.reweight(model, alpha=0.7, top_k=2))
    with torch.no_grad():
        torch.testing.assert_close(model(X), reference(X), rtol=1e-5, atol=1e-6)


def test_top_k_counts_blocks_not_the_names_a_module_has_inside_one_block():
    model = make_vit()
    model.blocks[3].mlp2 = model.blocks[3].mlp  # one Mlp at two paths of one block (as CoaT does): not sharing
    reference = hooked(make_vit(), {2: 0.7, 3: 0.49})
    timm_remem.reweight(model, alpha=0.7, top_k=2)
    assert timm_remem.get_reweight_config(model).num_blocks == 4
    assert sorted({p.rsplit(".", 1)[0] for p in timm_remem.get_scales(model)}) == ["blocks.2", "blocks.3"]
    with torch.no_grad():
        torch.testing.assert_close(model(X), reference(X), rtol=0, atol=0)
        timm_remem.merge(model)
        torch.testing.assert_close(model(X), reference(X), rtol=1e-5, atol=1e-6)
