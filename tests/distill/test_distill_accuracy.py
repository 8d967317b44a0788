"""The logit losses are numerically honest: kd_loss and dist_loss (and DistillationLoss and RememDistillationTask,
which use them) are within 1e-5 of an exact reference at every temperature they accept, for float32, bfloat16 and
float16 logits of small and large scale, and so is kd_loss's gradient (1e-5, what docs/guarantees.md promises).

The reference is the textbook definition written out here, evaluated with 50 significant digits (mpmath, a torch
dependency) on the very values the loss receives (the bf16/fp16 logits widened exactly). A float64 evaluation of the
same definition is not enough at large temperatures: ``log softmax(z/T)`` is ``-log C`` plus a deviation of order
``1/T``, so at ``T = 1e6`` float64 keeps only about 4 digits of the KL divergence (the test below that checks the
reference shows float64 agreeing at moderate temperatures and drifting at 1e6).
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from distill_refs import np_log_softmax, vit

from timm_remem.distill import DistillationLoss, RememDistillationTask, dist_loss, kd_loss
from timm_remem.distill.functional import MAX_TEMPERATURE, MIN_TEMPERATURE

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = 50
TOLERANCE = 1e-5  # the promise of the docstrings: relative error of the loss (and of kd_loss's gradient)
TEMPERATURES = [MIN_TEMPERATURE, 1e-2, 0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 20.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7,
                MAX_TEMPERATURE]
SCALES = [1e-2, 1.0, 1e3]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = ["independent", "close", "near", "offset"]  # the student's logits against the teacher's: see logits()


# ------------------------------------------------------------------------------------------------ references

def _rows(z: torch.Tensor, temperature: float) -> list[list[mpmath.mpf]]:
    t = mpmath.mpf(temperature)
    return [[mpmath.mpf(v) / t for v in row] for row in z.detach().double().tolist()]


def _log_softmax(row: list[mpmath.mpf]) -> list[mpmath.mpf]:
    log_z = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in row))
    return [v - log_z for v in row]


def exact_kd(s: torch.Tensor, t: torch.Tensor, temperature: float) -> float:
    """T^2 * mean_i sum_c p_t log(p_t / p_s), straight from the definition."""
    with mpmath.workdps(DIGITS):
        total = mpmath.mpf(0)
        for a, b in zip(_rows(s, temperature), _rows(t, temperature), strict=True):
            log_ps, log_pt = _log_softmax(a), _log_softmax(b)
            total += mpmath.fsum(mpmath.exp(lt) * (lt - ls) for ls, lt in zip(log_ps, log_pt, strict=True))
        return float(total * mpmath.mpf(temperature) ** 2 / s.shape[0])


def exact_kd_grad(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """d kd / d s = T (p_s - p_t) / B."""
    with mpmath.workdps(DIGITS):
        grad = []
        for a, b in zip(_rows(s, temperature), _rows(t, temperature), strict=True):
            grad.append([float(mpmath.mpf(temperature) * (mpmath.exp(ls) - mpmath.exp(lt)) / s.shape[0])
                         for ls, lt in zip(_log_softmax(a), _log_softmax(b), strict=True)])
        return torch.tensor(grad, dtype=torch.float64)


def _one_minus_pearson(a: list, b: list, eps: mpmath.mpf) -> mpmath.mpf:
    """1 - <a', b'> / (|a'| |b'| + eps), a' and b' centred: the DIST authors' Pearson."""
    ma, mb = mpmath.fsum(a) / len(a), mpmath.fsum(b) / len(b)
    ca, cb = [v - ma for v in a], [v - mb for v in b]
    dot = mpmath.fsum(x * y for x, y in zip(ca, cb, strict=True))
    norms = mpmath.sqrt(mpmath.fsum(x * x for x in ca)) * mpmath.sqrt(mpmath.fsum(y * y for y in cb))
    return 1 - dot / (norms + eps)


def exact_dist(s: torch.Tensor, t: torch.Tensor, temperature: float, beta: float = 1.0, gamma: float = 1.0) -> float:
    with mpmath.workdps(DIGITS):
        ys = [[mpmath.exp(v) for v in _log_softmax(row)] for row in _rows(s, temperature)]
        yt = [[mpmath.exp(v) for v in _log_softmax(row)] for row in _rows(t, temperature)]
        eps = mpmath.mpf("1e-8")
        inter = mpmath.fsum(_one_minus_pearson(a, b, eps) for a, b in zip(ys, yt, strict=True)) / len(ys)
        cols_s, cols_t = list(zip(*ys, strict=True)), list(zip(*yt, strict=True))
        intra = mpmath.fsum(_one_minus_pearson(list(a), list(b), eps)
                            for a, b in zip(cols_s, cols_t, strict=True)) / len(cols_s)
        return float(mpmath.mpf(temperature) ** 2 * (beta * inter + gamma * intra))


def _relative(got: float, exact: float) -> float:
    """Relative error; an exact value below 1e-30 (e.g. e^-1000 for a student that agrees with a saturated teacher)
    is measured against 1e-30, the float32 result being 0 or a subnormal there."""
    return abs(got - exact) / max(abs(exact), 1e-30)


def logits(kind: str, scale: float, dtype: torch.dtype, shape=(4, 10)) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded student and teacher logits: independent, close (student = teacher + 1% noise), near (+ 0.1% noise: a
    student that agrees, where 1 - rho is small) or offset (an affine map of the teacher's plus a large common
    offset, the case where ``s - t`` rounds in float32)."""
    g = torch.Generator().manual_seed(KINDS.index(kind) * 10 + SCALES.index(scale))
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    if kind == "independent":
        s = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    elif kind in ("close", "near"):
        noise = 0.01 if kind == "close" else 0.001
        s = t + noise * scale * torch.randn(*shape, generator=g, dtype=torch.float64)
    else:
        s = 0.5 * t + 3.0 * scale
    return s.to(dtype), t.to(dtype)


# ---------------------------------------------------------------------------------------------- the reference

def test_the_reference_is_the_float64_definition_where_float64_suffices():
    """At ordinary temperatures the 50-digit reference and a float64 numpy evaluation agree to 1e-9; at T = 1e6 the
    float64 one has drifted (the cancellation kd_loss avoids), which is why the sweep uses 50 digits."""
    s, t = logits("independent", 1.0, torch.float64)

    def float64_kd(temperature):
        total = 0.0
        for a, b in zip(s.numpy(), t.numpy(), strict=True):
            log_ps, log_pt = np_log_softmax(a / temperature), np_log_softmax(b / temperature)
            total += float(np.sum(np.exp(log_pt) * (log_pt - log_ps)))
        return temperature**2 * total / s.shape[0]

    for temperature in (0.5, 1.0, 4.0, 20.0):
        assert _relative(float64_kd(temperature), exact_kd(s, t, temperature)) < 1e-9
    assert _relative(float64_kd(1e6), exact_kd(s, t, 1e6)) > 1e-6


# ------------------------------------------------------------------------------------------------- the sweeps

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("kind", KINDS)
def test_kd_loss_is_within_1e_3_of_the_exact_value_at_every_accepted_temperature(kind, scale, dtype):
    s, t = logits(kind, scale, dtype)
    errors = {temperature: _relative(float(kd_loss(s, t, temperature)), exact_kd(s, t, temperature))
              for temperature in TEMPERATURES}
    bad = {f"{k:g}": f"{v:.2g}" for k, v in errors.items() if not v <= TOLERANCE}
    assert not bad, f"relative error above {TOLERANCE} at temperatures {bad}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("kind", KINDS)
def test_dist_loss_is_within_1e_3_of_the_exact_value_at_every_accepted_temperature(kind, scale, dtype):
    s, t = logits(kind, scale, dtype)
    errors = {temperature: _relative(float(dist_loss(s, t, temperature, 2.0, 0.5)),
                                     exact_dist(s, t, temperature, 2.0, 0.5))
              for temperature in TEMPERATURES}
    bad = {f"{k:g}": f"{v:.2g}" for k, v in errors.items() if not v <= TOLERANCE}
    assert not bad, f"relative error above {TOLERANCE} at temperatures {bad}"


def test_kd_loss_was_wrong_at_large_temperatures_in_the_textbook_form():
    """The form kd_loss replaced (float32 kl_div of log_softmax(z/T), times T^2) is far off at T = 1e4 and 1e6 on
    these logits; kd_loss is not (the sweep above), so the sweep can tell the two apart."""
    s, t = logits("independent", 1.0, torch.float32)

    def textbook(temperature):
        log_ps = torch.log_softmax(s / temperature, dim=-1)
        log_pt = torch.log_softmax(t / temperature, dim=-1)
        return float(torch.nn.functional.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
                     * temperature**2)

    assert _relative(textbook(1e4), exact_kd(s, t, 1e4)) > 1e-2
    assert _relative(textbook(1e6), exact_kd(s, t, 1e6)) > 1.0


def test_kd_loss_tends_to_half_the_variance_of_the_logit_difference():
    """The large-T limit (logit matching): T^2 KL -> (1/2) mean_i Var_c(s_i - t_i)."""
    s, t = logits("independent", 1.0, torch.float64)
    limit = float((s - t).var(dim=-1, unbiased=False).mean() / 2)
    assert float(kd_loss(s, t, MAX_TEMPERATURE)) == pytest.approx(limit, rel=1e-6)


# ------------------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("temperature", [MIN_TEMPERATURE, 0.1, 1.0, 4.0, 1e3, 1e6, MAX_TEMPERATURE])
@pytest.mark.parametrize("loss", [kd_loss, dist_loss], ids=["kd", "dist"])
def test_gradcheck_in_float64(loss, temperature):
    """Divided by T^2: DIST grows like T^2 (1e12 at T = 1e6), beyond what finite differences can resolve."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: loss(z, t, temperature) / temperature**2, (s,))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("kind", KINDS)
def test_kd_loss_gradient_is_within_1e_3_of_the_exact_gradient(kind, scale):
    s, t = logits(kind, scale, torch.float32)
    bad = {}
    for temperature in TEMPERATURES:
        student = s.clone().requires_grad_(True)
        kd_loss(student, t, temperature).backward()
        exact = exact_kd_grad(s, t, temperature)
        error = float((student.grad.double() - exact).norm()) / max(float(exact.norm()), 1e-30)
        if not error <= TOLERANCE:
            bad[f"{temperature:g}"] = f"{error:.2g}"
    assert not bad, f"relative gradient error above {TOLERANCE} at temperatures {bad}"


@pytest.mark.parametrize(("loss", "dtype"), [
    (kd_loss, torch.float32), (kd_loss, torch.bfloat16), (kd_loss, torch.float16),
    # not float16: DIST's gradient grows with T (about 1e5 at T = 1e4 here), beyond float16's 65504
    (dist_loss, torch.float32), (dist_loss, torch.bfloat16),
], ids=["kd-fp32", "kd-bf16", "kd-fp16", "dist-fp32", "dist-bf16"])
def test_gradients_are_finite_at_the_largest_temperatures(loss, dtype):
    for temperature in (1e4, 1e6, MAX_TEMPERATURE):
        for scale in SCALES:
            s, t = logits("independent", scale, dtype)
            student = s.clone().requires_grad_(True)
            loss(student, t, temperature).backward()
            assert student.grad.dtype == dtype and bool(torch.isfinite(student.grad).all()), (temperature, scale)
            assert float(student.grad.abs().max()) > 0, (temperature, scale)


def test_identical_logits_give_zero_kd_and_a_zero_gradient():
    s, t = logits("independent", 1.0, torch.float32)
    for temperature in (0.1, 4.0, 1e6):
        student = t.clone().requires_grad_(True)
        value = kd_loss(student, t, temperature)
        value.backward()
        assert abs(float(value.detach())) < 1e-12 and float(student.grad.abs().max()) < 1e-6, temperature


def test_a_non_finite_logit_gives_a_non_finite_loss():
    """So the training loop's finite-loss guard still sees a broken student or teacher (NaN, or +inf: an overflow;
    -inf is a probability of 0, which DIST handles as such)."""
    s, t = logits("independent", 1.0, torch.float32)
    for bad in (math.nan, math.inf):
        broken = s.clone()
        broken[1, 3] = bad
        for temperature in (0.1, 4.0, 1e6):
            assert not math.isfinite(float(kd_loss(broken, t, temperature))), (bad, temperature)
            assert not math.isfinite(float(kd_loss(s, broken, temperature))), (bad, temperature)
            assert not math.isfinite(float(dist_loss(broken, t, temperature))), (bad, temperature)


# ------------------------------------------------------------------------ the loss module and the training task

@pytest.mark.parametrize("method", ["kd", "dist"])
def test_distillation_loss_is_as_accurate_as_the_functions(method):
    exact = exact_kd if method == "kd" else exact_dist
    for temperature in (1e4, 1e6, MAX_TEMPERATURE):
        s, t = logits("close", 1.0, torch.bfloat16)
        loss = DistillationLoss(method, task_weight=0.0, temperature=temperature)
        assert _relative(float(loss(s, t)), exact(s, t, temperature)) <= TOLERANCE, temperature


def test_remem_distillation_task_reports_the_exact_kd_at_a_large_temperature():
    torch.manual_seed(0)
    task = RememDistillationTask(vit(), vit(), DistillationLoss("kd", task_weight=0.0, temperature=1e6),
                                 verbose=False)
    out = task(torch.randn(4, 3, 32, 32), None)
    exact = exact_kd(out["output"], out["teacher_logits"], 1e6)
    assert _relative(float(out["kd_loss"]), exact) <= TOLERANCE
    assert _relative(float(out["loss"].detach()), exact) <= TOLERANCE


def test_the_ends_of_the_range_are_accepted_and_hard_distillation_takes_any_temperature():
    """Outside the range the losses refuse (rows of docs/bad-input.md, tests/bad_input/test_bad_distill.py); "hard"
    has no temperature in its formula and keeps accepting any positive one."""
    s, t = logits("independent", 1.0, torch.float32)
    for temperature in (MIN_TEMPERATURE, MAX_TEMPERATURE):
        assert torch.isfinite(kd_loss(s, t, temperature)) and torch.isfinite(dist_loss(s, t, temperature))
    assert DistillationLoss("hard", temperature=1e9).temperature == 1e9
