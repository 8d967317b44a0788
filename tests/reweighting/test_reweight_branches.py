"""``Branch.kind``: where the scale on each branch sits, checked against the hand-written family table.

The reference is ``reweight_cases``: a path listed in ``input_column_slices`` is a fused projection's input columns,
a family whose MLP is marked "inside the branch: the norm after it ends the branch" is a post-norm family, and every
other branch path is the MLP's own output.
"""

from __future__ import annotations

import pytest
from reweight_cases import CASES, create

import timm_remem
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
