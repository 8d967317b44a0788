"""Sanity checks of the hand-written reference table in ``reweight_cases.py``.

These test the table itself, not timm_remem: every case builds and runs, its paths exist and run in the order the
table claims, the reference scaling is exact at factor 1 and changes the output otherwise, and each listed module
really enters a residual add linearly (the output of the module that performs the add is affine in the factor,
which fails when a norm sits between the listed module and the add).
"""

from __future__ import annotations

import fnmatch
import functools
import re
from typing import Any

import pytest
import torch
from reweight_cases import (
    CASES,
    ERROR_CASES,
    Case,
    apply_reference_scaling,
    create,
    example_input,
    get_case,
    perturb,
    random_factors,
    scale_path,
)
from torch import nn

CASE_PARAMS = [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in CASES]
ERROR_PARAMS = [pytest.param(c, id=c.id) for c in ERROR_CASES]

_MLP_NAME = re.compile(r"^(?!norm).*(mlp|ffn)", re.IGNORECASE)  # norm_mlp (TnT) is a norm
_MLP_CLASS = re.compile(r"Mlp|MLP|FFN|SwiGLU|GLU")


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _prepared(case_id: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Perturbed model, input and plain output, built once per case (tests remove every hook they add)."""
    case = get_case(case_id)
    model = perturb(create(case), seed=1)
    x = example_input(case)
    with torch.no_grad():
        y = model(x)
    return model, x, y


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _site_output(model: nn.Module, case: Case, path: str, args: tuple, kwargs: dict, c: float) -> list[torch.Tensor]:
    run_path, observe = case.affine_sites.get(path, (path.rsplit(".", 1)[0], None))
    run = model.get_submodule(run_path)
    seen: list[torch.Tensor] = []
    handles = [scale_path(model, path, c, case.input_column_slices.get(path))]
    if observe is not None:
        handles.append(model.get_submodule(observe).register_forward_pre_hook(
            lambda _m, a: seen.append(a[0].clone())))
    try:
        cloned = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        with torch.no_grad():
            out = run(*cloned, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen[:1] if observe is not None else _tensors(out)


def test_case_ids_are_unique():
    ids = [c.id for c in CASES] + [c.id for c in ERROR_CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_paths_and_blocks_exist(case):
    model, _, _ = _prepared(case.id)
    names = dict(model.named_modules())
    missing = [p for p in case.all_paths + case.block_paths if p not in names]
    missing += [p for paths in case.inner_paths for p in paths if p not in names]
    assert not missing, f"{case.id}: no module at {missing}"
    for path, start in case.input_column_slices.items():
        proj = names[path]
        assert isinstance(proj, nn.Linear) and 0 < start < proj.in_features


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_block_classes(case):
    model, _, _ = _prepared(case.id)
    found = {type(model.get_submodule(p)).__name__ for p in case.block_paths}
    assert found == set(case.block_classes)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_unit_factors_are_bit_identical(case):
    model, x, y = _prepared(case.id)
    handles = apply_reference_scaling(model, case, [1.0] * len(case.branch_paths))
    try:
        y1 = _forward(model, x)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(y1, y)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_random_factors_change_output(case):
    model, x, y = _prepared(case.id)
    handles = apply_reference_scaling(model, case, random_factors(case, seed=3))
    try:
        y1 = _forward(model, x)
    finally:
        for h in handles:
            h.remove()
    assert torch.isfinite(y1).all()
    assert (y1 - y).abs().max() > 1e-3 * y.abs().max()


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_branches_run_in_table_order(case):
    model, x, _ = _prepared(case.id)
    calls: list[int] = []
    handles = []
    for index, paths in enumerate(case.branch_paths):
        for path in paths:
            handles.append(model.get_submodule(path).register_forward_pre_hook(
                lambda _m, _a, i=index: calls.append(i)))
    try:
        _forward(model, x)
    finally:
        for h in handles:
            h.remove()
    assert set(calls) == set(range(len(case.branch_paths))), "some listed branch never ran"
    assert calls == sorted(calls), f"forward order {calls} differs from the table order"


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_branch_enters_residual_add_linearly(case):
    """The module performing the add returns r + c * m: output(0.5) is the mean of output(0) and output(1)."""
    model, x, _ = _prepared(case.id)
    run_paths = {case.affine_sites.get(p, (p.rsplit(".", 1)[0], None))[0] for p in case.all_paths}
    captured: dict[str, tuple[tuple, dict]] = {}
    hooks = [
        model.get_submodule(rp).register_forward_pre_hook(
            lambda _m, a, k, rp=rp: captured.setdefault(rp, (a, k)) and None, with_kwargs=True)
        for rp in run_paths
    ]
    try:
        _forward(model, x)
    finally:
        for h in hooks:
            h.remove()
    for path in case.all_paths:
        run_path = case.affine_sites.get(path, (path.rsplit(".", 1)[0], None))[0]
        args, kwargs = captured[run_path]
        outs = [_site_output(model, case, path, args, kwargs, c) for c in (0.0, 0.5, 1.0)]
        changed = False
        for o0, oh, o1 in zip(*outs, strict=True):
            scale = float(o1.abs().max().clamp_min(1e-6))
            changed |= bool((o1 - o0).abs().max() > 1e-4 * scale)
            torch.testing.assert_close(oh, (o0 + o1) / 2, rtol=1e-4, atol=1e-5 * scale,
                                       msg=f"{path}: {run_path} output not affine in the factor")
        assert changed, f"{path}: the factor has no effect on {run_path}"


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_every_mlp_like_module_is_accounted_for(case):
    """Each module named like an MLP / FFN (or of an MLP class) is a branch, inside one, or a listed non-branch."""
    model, _, _ = _prepared(case.id)
    listed = case.all_paths + [p for paths in case.inner_paths for p in paths]

    def covered(name: str) -> bool:
        if any(name == p or name.startswith(p + ".") or p.startswith(name + ".") for p in listed):
            return True
        return any(fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(name, pat + ".*")
                   for pat in case.non_branch_paths)

    unaccounted = [
        name for name, mod in model.named_modules()
        if name and any(True for _ in mod.parameters())
        and (_MLP_NAME.search(name.rsplit(".", 1)[-1]) or _MLP_CLASS.search(type(mod).__name__))
        and not covered(name)
    ]
    assert not unaccounted, f"{case.id}: MLP-like modules neither branches nor listed non-branches: {unaccounted}"


def test_reference_rejects_wrong_number_of_factors():
    case = get_case("vit")
    model, _, _ = _prepared(case.id)
    with pytest.raises(ValueError, match="3 blocks, got 2 factors"):
        apply_reference_scaling(model, case, [0.5, 0.5])


def test_reference_hooks_a_shared_module_once():
    """CoaT's mlp2 is mlp3 is mlp4: scaling by c must multiply each call's output by c, not c**3."""
    case = get_case("coat")
    model, x, y = _prepared(case.id)
    factors = [1.0] * (len(case.branch_paths) - 1) + [0.5]
    handles = apply_reference_scaling(model, case, factors)
    try:
        shared = model.get_submodule(case.branch_paths[-1][0])
        outputs: list[torch.Tensor] = []
        probe = shared.register_forward_hook(lambda _m, _a, out: outputs.append(out))
        try:
            _forward(model, x)
        finally:
            probe.remove()
    finally:
        for h in handles:
            h.remove()
    plain: list[torch.Tensor] = []
    probe = shared.register_forward_hook(lambda _m, _a, out: plain.append(out))
    try:
        _forward(model, x)
    finally:
        probe.remove()
    assert len(outputs) == len(plain) == 3
    # the reference hook was registered first, so the probe sees the scaled outputs of all three calls
    for scaled, unscaled in zip(outputs, plain, strict=True):
        torch.testing.assert_close(scaled, unscaled * 0.5)


def test_inner_factors_scale_tnt_pixel_mlp():
    """TnT's inner MLP (inner_paths) is reachable through inner_factors and does reach the output."""
    case = get_case("tnt")
    model, x, y = _prepared(case.id)
    ones = [1.0] * len(case.branch_paths)
    handles = apply_reference_scaling(model, case, ones, inner_factors=[0.5] * len(case.inner_paths))
    try:
        y1 = _forward(model, x)
    finally:
        for h in handles:
            h.remove()
    assert (y1 - y).abs().max() > 1e-3 * y.abs().max()


def test_perturb_leaves_no_constant_parameter():
    model = perturb(create(get_case("levit")), seed=0)
    constant = [n for n, p in model.named_parameters() if p.numel() > 1 and bool((p == p.reshape(-1)[0]).all())]
    assert not constant


def test_perturb_randomises_batchnorm_statistics():
    model = perturb(create(get_case("levit")), seed=0)
    bn = model.get_submodule("stages.0.blocks.0.mlp.ln2.bn")
    assert bn.running_mean.abs().max() > 0 and not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_perturb_is_deterministic():
    a = perturb(create(get_case("vit_layerscale")), seed=7).state_dict()
    b = perturb(create(get_case("vit_layerscale")), seed=7).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", ERROR_PARAMS)
def test_error_cases_build_and_run(case):
    model = create(case)
    y = _forward(model, example_input(case))
    assert y.shape == (2, 5)
