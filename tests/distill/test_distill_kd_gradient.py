"""kd_loss's backward: the closed-form gradient its forward pass writes (a custom autograd function) is as accurate
as the loss against the 50-digit references of test_distill_accuracy.py, reaches the teacher's logits when asked,
is exactly 0 for a student equal to its teacher, keeps one [B, C] tensor per differentiated input for backward,
refuses a second derivative loudly, and works under torch.compile.

Both of kd_loss's code paths are checked: the eager CPU one (blocks of rows, work skipped where a host check shows
it is not needed) and the branch-free one that runs under torch.compile and on other devices.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from test_distill_accuracy import DIGITS, KINDS, SCALES, TEMPERATURES, exact_kd, exact_kd_grad, logits

import timm_remem.distill.functional as functional
from timm_remem.distill import kd_loss
from timm_remem.distill.functional import MAX_TEMPERATURE, MIN_TEMPERATURE

pytestmark = pytest.mark.usefixtures("one_thread")

# Relative error (2-norm) of the gradient against the exact one, float32 logits. The largest seen over the sweeps
# below is about 1.3e-6 (for the form autograd derived from the former loss it was 2.1e-5).
GRADIENT_TOLERANCE = 2e-5
PATHS = ["eager", "branch-free"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Run kd_loss on its eager CPU path or on its branch-free path (the one torch.compile and GPUs take)."""
    if request.param == "branch-free":
        monkeypatch.setattr(functional, "_host_checks_are_free", lambda tensor: False)
    return request.param


def _gradient_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got.double() - exact).norm()) / max(float(exact.norm()), 1e-30)


def _row_kd(a: list, b: list) -> mpmath.mpf:
    """KL(softmax(b) || softmax(a)) of one row of already-divided logits, from the definition."""
    log_za = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in a))
    log_zb = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in b))
    return mpmath.fsum(mpmath.exp(vb - log_zb) * ((vb - log_zb) - (va - log_za)) for va, vb in zip(a, b, strict=True))


def _exact_teacher_grad(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """d kd / d t by numerical differentiation of the 50-digit definition (independent of the closed form)."""
    grad = torch.zeros(t.shape, dtype=torch.float64)
    with mpmath.workdps(DIGITS):
        temp = mpmath.mpf(temperature)
        for i, (srow, trow) in enumerate(zip(s.double().tolist(), t.double().tolist(), strict=True)):
            a = [mpmath.mpf(v) / temp for v in srow]
            for j in range(len(trow)):
                def shifted(h, a=a, trow=trow, j=j):
                    b = [mpmath.mpf(v) / temp for v in trow]
                    b[j] += h / temp
                    return _row_kd(a, b)
                grad[i, j] = float(mpmath.diff(shifted, 0) * temp**2 / s.shape[0])
    return grad


# ------------------------------------------------------------------------------------------------- pieces

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_the_polynomial_is_phi_over_x_squared_on_the_unit_interval(dtype):
    """(e^x - 1 - x) / x^2 on [-1, 1]: the interpolating polynomial (exact arithmetic) within 6e-9 (float32's) and
    4e-17 (float64's, with its coefficients rounded to float64), and its evaluation in the dtype within a few
    rounding errors."""
    coeffs = functional._PHI_POLY32 if dtype == torch.float32 else functional._PHI_POLY64
    xs = [k / 100 - 1 for k in range(201)]
    with mpmath.workdps(DIGITS):
        exact = [mpmath.mpf(1) / 2 if x == 0 else (mpmath.expm1(mpmath.mpf(x)) - x) / mpmath.mpf(x) ** 2 for x in xs]
        truncation = max(abs(mpmath.polyval([mpmath.mpf(c) for c in reversed(coeffs)], mpmath.mpf(x)) - e) / e
                         for x, e in zip(xs, exact, strict=True))
    assert truncation < (6e-9 if dtype == torch.float32 else 4e-17)
    got = functional._phi_poly(torch.tensor(xs, dtype=dtype).reshape(3, 67), torch.tensor(coeffs, dtype=dtype))
    error = max(abs(g - float(e)) / float(e) for g, e in zip(got.flatten().tolist(), exact, strict=True))
    assert error < 8 * torch.finfo(dtype).eps


# ---------------------------------------------------------------------------------------------- accuracy

@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("kind", KINDS)
def test_student_gradient_is_exact_to_2e_5_at_every_accepted_temperature(path, kind, scale):
    s, t = logits(kind, scale, torch.float32)
    bad = {}
    for temperature in TEMPERATURES:
        student = s.clone().requires_grad_(True)
        kd_loss(student, t, temperature).backward()
        error = _gradient_error(student.grad, exact_kd_grad(s, t, temperature))
        if not error <= GRADIENT_TOLERANCE:
            bad[f"{temperature:g}"] = f"{error:.2g}"
    assert not bad, f"relative gradient error above {GRADIENT_TOLERANCE} at temperatures {bad}"


@pytest.mark.parametrize("scale", SCALES)
def test_teacher_gradient_matches_the_differentiated_definition(path, scale):
    """teacher_grad=True: d/dt (T^2 KL) = -p_t d' (d' = s - t centred under p_t), against mpmath's derivative."""
    s, t = logits("independent", scale, torch.float32, shape=(2, 6))
    for temperature in (MIN_TEMPERATURE, 0.1, 1.0, 4.0, 1e3, 1e6, MAX_TEMPERATURE):
        student, teacher = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
        kd_loss(student, teacher, temperature, teacher_grad=True).backward()
        assert _gradient_error(teacher.grad, _exact_teacher_grad(s, t, temperature)) <= GRADIENT_TOLERANCE, temperature
        assert _gradient_error(student.grad, exact_kd_grad(s, t, temperature)) <= GRADIENT_TOLERANCE, temperature


@pytest.mark.parametrize("temperature", [MIN_TEMPERATURE, 0.1, 1.0, 4.0, 1e3, 1e6, MAX_TEMPERATURE])
def test_gradcheck_in_float64_student_and_teacher(path, temperature):
    """Finite differences in float64 (divided by T^2 as in test_distill_accuracy.py's gradcheck)."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: kd_loss(a, b, temperature, teacher_grad=True) / temperature**2, (s, t))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_logits_get_finite_correctly_rounded_gradients(dtype):
    """The gradient comes back in the logits' dtype, finite, and within one rounding of that dtype of the exact one
    (where the exact one is below float16's smallest subnormal, both are 0): relative eps, plus half the subnormal
    spacing per element where the gradient is that small."""
    eps = torch.finfo(dtype).eps
    spacing = torch.finfo(dtype).smallest_normal * eps  # between subnormals
    for kind in KINDS:
        for scale in SCALES:
            s, t = logits(kind, scale, dtype)
            for temperature in TEMPERATURES:
                student = s.clone().requires_grad_(True)
                kd_loss(student, t, temperature).backward()
                assert student.grad.dtype == dtype and bool(torch.isfinite(student.grad).all())
                exact = exact_kd_grad(s, t, temperature)
                error = float((student.grad.double() - exact.to(dtype).double()).norm())
                assert error <= eps * float(exact.norm()) + 0.5 * spacing * s.numel() ** 0.5, (kind, scale,
                                                                                                  temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_a_student_equal_to_its_teacher_gets_a_zero_gradient(path, dtype):
    for scale in SCALES:
        t = logits("independent", scale, dtype)[1]
        for temperature in TEMPERATURES:
            student, teacher = t.clone().requires_grad_(True), t.clone().requires_grad_(True)
            value = kd_loss(student, teacher, temperature, teacher_grad=True)
            value.backward()
            assert float(value.detach()) == 0.0, (scale, temperature)
            assert float(student.grad.abs().max()) <= 1e-12, (scale, temperature)
            assert float(teacher.grad.abs().max()) <= 1e-12, (scale, temperature)


# ------------------------------------------------------------------------------------------------ behaviour

def test_the_teacher_is_a_constant_unless_teacher_grad():
    s, t = logits("independent", 1.0, torch.float32)
    student, teacher = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    value = kd_loss(student, teacher, 2.0)
    value.backward()
    assert teacher.grad is None and student.grad is not None
    assert float(kd_loss(s, teacher, 2.0, teacher_grad=True).detach()) == float(value.detach())


def test_the_value_does_not_depend_on_the_graph_or_the_blocks(monkeypatch):
    """The same loss with and without autograd, and with the rows cut into blocks of 1 and 3 (B = 7, not a multiple)."""
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(7, 10, generator=g) * 3, torch.randn(7, 10, generator=g) * 3
    for temperature in (0.05, 2.0, 1e5):
        with torch.no_grad():
            reference = float(kd_loss(s, t, temperature))
        student = s.clone().requires_grad_(True)
        value = kd_loss(student, t, temperature)
        value.backward()
        assert float(value.detach()) == reference
        for entries in (10, 30):
            monkeypatch.setattr(functional, "_BLOCK_ENTRIES", entries)
            blocked = s.clone().requires_grad_(True)
            value = kd_loss(blocked, t, temperature)
            value.backward()
            assert float(value.detach()) == pytest.approx(reference, rel=1e-6)
            assert torch.allclose(blocked.grad, student.grad, rtol=1e-5, atol=1e-12 * float(student.grad.abs().max()))
            monkeypatch.undo()


def _saved_tensors(*args, **kwargs) -> list[torch.Size]:
    """The shapes of the tensors that kd_loss(*args, **kwargs) saves for backward."""
    shapes = []

    def pack(tensor):
        shapes.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        kd_loss(*args, **kwargs)
    return shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_keeps_one_batch_by_class_tensor_per_differentiated_input(dtype):
    """The autograd graph holds the gradient only (the autograd-derived backward of the former form kept 24 to 25
    distinct [B, C] tensors, saved 38 times; the textbook kl_div form keeps 2)."""
    g = torch.Generator().manual_seed(2)
    s, t = (torch.randn(16, 100, generator=g) * 2).to(dtype), (torch.randn(16, 100, generator=g) * 2).to(dtype)
    student, teacher = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    for temperature in (1e-3, 4.0, 1e6):  # the small-T and large-T forms included
        shapes = _saved_tensors(student, t, temperature)
        assert [x for x in shapes if x.numel() >= s.numel()] == [s.shape]
        shapes = _saved_tensors(student, teacher, temperature, teacher_grad=True)
        assert [x for x in shapes if x.numel() >= s.numel()] == [s.shape, s.shape]
        assert sum(x.numel() for x in shapes) <= 2 * s.numel() + 64


def test_a_second_derivative_is_refused_loudly():
    """backward(create_graph=True) works (for the rest of a loss), but differentiating kd_loss's gradient raises
    rather than counting it as a constant."""
    s, t = logits("independent", 1.0, torch.float64)
    student = s.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(kd_loss(student, t, 2.0), student, create_graph=True)
    assert torch.allclose(grad, torch.autograd.grad(kd_loss(student, t, 2.0), student)[0])
    with pytest.raises(RuntimeError, match="differentiated once, not twice"):
        (grad.square().sum() + student.sum()).backward()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph_gives_the_eager_values(backend):
    torch._dynamo.reset()
    s, t = logits("close", 1.0, torch.float32)

    def loss(a, b):
        return kd_loss(a, b, 4.0, teacher_grad=True)

    compiled = torch.compile(loss, backend=backend, fullgraph=True)
    results = []
    for fn in (loss, compiled):
        student, teacher = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
        value = fn(student, teacher)
        value.backward()
        results.append((float(value.detach()), student.grad, teacher.grad))
    (v0, gs0, gt0), (v1, gs1, gt1) = results
    assert v1 == pytest.approx(v0, rel=1e-6) and math.isfinite(v1)
    assert _gradient_error(gs1, gs0.double()) < 1e-5 and _gradient_error(gt1, gt0.double()) < 1e-5
    assert v0 == pytest.approx(exact_kd(s, t, 4.0), rel=1e-5)
