"""Distillation losses as pure functions: ``kd_loss`` (Hinton), ``dist_loss`` (DIST) and ``spectral_loss``.

Each treats the teacher side as a constant and returns a scalar tensor, computed in float32 (float64 inputs in
float64). The logit losses avoid the cancellation of the textbook forms at large ``T`` (where ``softmax(z/T)`` is
``1/C`` plus a deviation of order ``1/T``): both are within ``1e-5`` of a 50-digit reference for every temperature in
``[MIN_TEMPERATURE, MAX_TEMPERATURE]`` (``tests/distill/test_distill_accuracy.py``); other temperatures are refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ._checks import check_logit_pair, check_nchw, check_temperature, check_weight
from ._maps import match_spatial, pool_channels

__all__ = ["kd_loss", "dist_loss", "spectral_loss", "MIN_TEMPERATURE", "MAX_TEMPERATURE"]

#: The temperatures ``kd_loss`` and ``dist_loss`` accept.
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 1e8

# phi(x) / x^2 = (e^x - 1 - x) / x^2 on [-1, 1], lowest order first: the polynomials of degree 7 (float32) and 13
# (float64) that interpolate it at the Chebyshev points, worked out in 40-digit arithmetic. Relative error on the
# interval below 6e-9 and 4e-17 (tests/distill/test_distill_kd_gradient.py checks both against mpmath).
_PHI_POLY32 = (0.49999999781421683, 0.16666666646842135, 0.04166673659523746, 0.00833333967591706,
               0.0013885396911807102, 0.00019838101968683888, 2.535851224463976e-05, 2.8062802582276946e-06)
_PHI_POLY64 = (0.5, 0.16666666666666666, 0.04166666666666609, 0.008333333333333299, 0.0013888888888981404,
               0.00019841269841324198, 2.4801587246096818e-05, 2.7557319191381816e-06, 2.755733506893373e-07,
               2.5052117695907823e-08, 2.0874435575864273e-09, 1.6057679623801638e-10, 1.1639194124150522e-11,
               7.746178593018827e-13)

# kd_loss: entries with x = d'/T above this are summed through the student's softmax instead (T^2 phi(x) would
# overflow); below it, T^2 phi(x) <= 1e16 * e^20 stays far from float32's limit.
_FAR = 20.0
# kd_loss's gradient: entries with |x| + KL <= this take the form built from x = d'/T (free of the cancellation of
# p_s - p_t at large T), the others T (p_s - p_t) (at small T, where the probabilities differ by more than rounding).
# At most _FAR: the first form reads phi(x) from the loss's terms, which hold phi(min(x, _FAR)).
_NEAR_GRADIENT = _FAR
# kd_loss on CPU works through blocks of about this many entries per thread, so that a block's temporaries stay in
# the L2 caches (and the per-kernel overhead is spread over enough work).
_BLOCK_ENTRIES = 1 << 16


def check_temperature_range(temperature: float) -> float:
    """A temperature ``kd_loss`` and ``dist_loss`` compute accurately: a number in ``[1e-4, 1e8]``, as ``float``.

    Example:
        >>> check_temperature_range(4)
        4.0
        >>> check_temperature_range(1e9)
        Traceback (most recent call last):
        ...
        timm_remem.errors.ConfigError: temperature=1e+09 is outside the range the distillation losses compute...
    """
    value = check_temperature(temperature)
    if not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        raise ConfigError(
            f"temperature={value:g} is outside the range the distillation losses compute accurately in float32, "
            f"{MIN_TEMPERATURE:g} <= temperature <= {MAX_TEMPERATURE:g}; use a temperature in that range (1 to 8 is "
            "usual; for logit matching, the large-T limit of kd_loss, T=1e4 is already within 1e-3 of it for "
            "logits of size 10)."
        )
    return value


def _compute_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(torch.float32, student.dtype), teacher.dtype)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    teacher_grad: bool = False,
) -> torch.Tensor:
    """Hinton knowledge-distillation loss: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch.

    The value of ``timm.task.LogitDistillationTask`` (``kl_div(..., reduction="batchmean") * T**2``); as ``T`` grows
    it tends to half the variance over classes of ``s - t``. With ``d' = (s - t) - sum_c p_t,c (s - t)_c`` and
    ``x = d' / T``, ``KL = log(1 + sum_c p_t,c phi(x_c))``, ``phi(x) = e^x - 1 - x >= 0``: a sum of non-negative
    terms, so nothing cancels at large ``T`` (see :func:`_kd_block`). The gradient is computed in closed form by the
    forward pass, so the loss can be differentiated once but not twice (a second backward raises); ``torch.func``
    transforms and forward-mode AD do not apply to it.

    Args:
        student_logits: Student logits ``[B, C]``.
        teacher_logits: Teacher logits ``[B, C]`` (a constant target unless ``teacher_grad``).
        temperature: Softmax temperature, in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]`` (``[1e-4, 1e8]``).
        teacher_grad: Let gradients flow into ``teacher_logits`` too (when they require grad).

    Raises:
        ConfigError: ``temperature`` is not a number in ``[1e-4, 1e8]``, the logits are not 2-D, or the batch sizes
            or class counts differ.

    Example:
        >>> import torch
        >>> s, t = torch.zeros(2, 5), torch.zeros(2, 5)
        >>> float(kd_loss(s, t, temperature=4.0))
        0.0
    """
    temperature = check_temperature_range(temperature)
    check_logit_pair(student_logits, teacher_logits)
    teacher = teacher_logits if teacher_grad else teacher_logits.detach()
    if torch.is_grad_enabled() and (student_logits.requires_grad or teacher.requires_grad):
        rows = _KDRows.apply(student_logits, teacher, temperature)
    else:
        rows = _kd_rows(student_logits, teacher, temperature, False, False)[0]
    return rows.mean()


class _KDRows(torch.autograd.Function):
    """``T^2 KL`` of each row: forward writes the closed-form gradient (all backward keeps), backward scales it."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        rows, grad_s, grad_t = _kd_rows(student, teacher, temperature, ctx.needs_input_grad[0],
                                        ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_s, grad_t)
        ctx.input_dtypes = (student.dtype, teacher.dtype)
        ctx.temperature = temperature
        return rows

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        twice = torch.is_grad_enabled()  # create_graph=True
        with torch.no_grad():
            grad_s, grad_t = ctx.saved_tensors
            weight = grad_rows.unsqueeze(1)
            if grad_s is not None:  # saved over T
                grad_s = (grad_s * (weight * ctx.temperature)).to(ctx.input_dtypes[0])
            if grad_t is not None:
                grad_t = (grad_t * weight).to(ctx.input_dtypes[1])
        if twice:
            grad_s, grad_t = (None if g is None else _NotTwice.apply(g.detach().requires_grad_())
                              for g in (grad_s, grad_t))
        return grad_s, grad_t, None


class _NotTwice(torch.autograd.Function):
    """Identity on ``kd_loss``'s gradient under ``create_graph=True``: differentiating it raises, where a gradient
    without a graph would silently count as a constant."""

    @staticmethod
    def forward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(
            "kd_loss can be differentiated once, not twice: its gradient is computed in closed form, so the "
            "gradient from backward(create_graph=True) has no graph to differentiate. Use a loss written with "
            "differentiable torch operations (e.g. the textbook kl_div form) for second derivatives."
        )


def _kd_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float, grad_student: bool,
             grad_teacher: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``T^2 KL`` of each row and, when asked, its gradients (the student's over ``T``), block by block, no graph."""
    dtype = _compute_dtype(student, teacher)
    batch, classes = student.shape
    options = dict(dtype=dtype, device=student.device)
    rows = torch.empty(batch, **options)
    grad_s = torch.empty(batch, classes, **options) if grad_student else None
    grad_t = torch.empty(batch, classes, **options) if grad_teacher else None
    # On CPU (eager): blocks whose temporaries fit the cache, and work skipped where a host check (free on CPU)
    # shows the block does not need it. Elsewhere, and under torch.compile, one block and no data-dependent branches.
    eager = _host_checks_are_free(student)
    step = max(1, _BLOCK_ENTRIES * torch.get_num_threads() // max(classes, 1)) if eager else max(batch, 1)
    coeffs = torch.tensor(_PHI_POLY64 if dtype == torch.float64 else _PHI_POLY32, **options)
    with torch.no_grad():
        for i in range(0, batch, step):
            j = min(i + step, batch)
            rows[i:j] = _kd_block(student[i:j], teacher[i:j], temperature, dtype, coeffs,
                                  None if grad_s is None else grad_s[i:j],
                                  None if grad_t is None else grad_t[i:j], eager)
    return rows, grad_s, grad_t


def _host_checks_are_free(tensor: torch.Tensor) -> bool:
    """Whether ``kd_loss`` may branch on values of ``tensor`` (eager CPU: no device to stall, no graph to break)."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def _kd_block(s: torch.Tensor, t: torch.Tensor, temperature: float, dtype: torch.dtype, coeffs: torch.Tensor,
              grad_s: torch.Tensor | None, grad_t: torch.Tensor | None, skip: bool) -> torch.Tensor:
    """``T^2 KL(softmax(t/T) || softmax(s/T))`` of each row of a block.

    ``T^2 phi(x)`` is ``d'^2 (phi(x) / x^2)`` on ``|x| <= 1`` (the polynomial ``coeffs``) and ``e^x - 1 - x`` beyond;
    ``T^2 log(1 + n)`` is ``T^2 n * (log1p(n) / n)``, so no ``1/T^2`` underflows; ``d`` is formed exactly. Entries
    with ``x > 20`` enter through the student's softmax: ``KL = log(1 + n) - log(1 - S)``, ``S = sum_c p_s,c (1 -
    e^(20 - max(x_c, 20)))``. ``grad_s`` / ``grad_t``, when given, receive ``p_s - p_t`` (``d/ds T^2 KL`` over ``T``,
    as ``p_t expm1(x - KL)`` where ``|x| + KL <= 20``) and ``-p_t d'``. ``skip``: leave out work that a host check
    shows this block does not need (eager CPU only: elsewhere it would stall the device or break a compiled graph)."""
    sq = temperature * temperature
    s, t = s.to(dtype), t.to(dtype)
    t_max, top = t.max(dim=1, keepdim=True)
    p_t = (t - t_max).div_(temperature).exp_()  # gaps to the row maximum: no overflow; divided, not
    # multiplied by a rounded 1/T, whose error would shift every exponent the same way
    z_t = p_t.sum(dim=1, keepdim=True)  # 1 / p_t at the top class
    p_t.div_(z_t)
    d = _difference_to_column(s, t, top)
    d.sub_(torch.linalg.vecdot(p_t, d).unsqueeze(1))  # d': sum_c p_t,c d'_c = 0
    x = d / temperature
    x_mid = x.clamp(-1.0, 1.0)
    # T^2 phi(x) = min(d'^2, T^2) P(x_mid) + T^2 [(e^x - x) - (e^x_mid - x_mid)], the bracket 0 where |x| <= 1
    q = d.square().clamp_(max=sq).mul_(_phi_poly(x_mid, coeffs))
    row_abs_max = x.abs().amax(dim=1)
    largest = float(row_abs_max.amax()) if skip else math.inf
    if largest > 1.0:
        x_near = x.clamp(max=_FAR) if largest > _FAR else x
        q.add_(x_near.exp().sub_(x_near).sub_(x_mid.exp().sub_(x_mid)), alpha=sq)
    y = torch.linalg.vecdot(p_t, q)  # T^2 n
    n = y / sq
    tiny = n.clamp(min=torch.finfo(dtype).tiny)  # below the smallest normal number, log1p(n) = n
    rows = y * torch.log1p(tiny).div_(tiny)  # T^2 log(1 + n), without forming T^2 * (a possibly subnormal) log1p(n)
    p_s = None
    if largest > _FAR:  # entries beyond _FAR: KL = log(1 + n) - log(1 - S)
        p_s, a_s, z_s = _softmax_with_parts(s, temperature)
        shift = x.clamp(min=_FAR).neg_().add_(_FAR)  # 20 - max(x, 20) <= 0
        far = torch.linalg.vecdot(p_s, shift.exp().neg_().add_(1.0))  # S, a sum of non-negative terms
        big = far > 0.5
        minus_log_gap = -torch.log1p(-far.clamp(max=0.5))  # -log(1 - S) while S <= 1/2
        if not skip or bool(big.any()):  # beyond 1/2, -log(1 - S) = log sum exp(a_s) - log sum exp(a_s + shift)
            minus_log_gap = torch.where(big, torch.log(z_s.squeeze(1)) - torch.logsumexp(a_s + shift, dim=1),
                                        minus_log_gap)
        rows = rows + sq * minus_log_gap
    if grad_t is not None:
        torch.mul(p_t, d, out=grad_t).neg_()
    if grad_s is not None:
        # p_t expm1(u), u = log p_s - log p_t = x - KL, as expm1(u) = e^-KL (x + phi(x)) + expm1(-KL) with phi(x) from
        # q (rounding error about |x| + KL ulps of 1, no cancellation otherwise)
        kl = (rows / sq).unsqueeze(1)
        if largest > _FAR:
            scale, offset = kl.neg().exp_(), kl.neg().expm1_()
        else:  # KL = log(1 + n): e^-KL = 1 / (1 + n), expm1(-KL) = -n / (1 + n)
            scale = n.add(1.0).reciprocal_().unsqueeze(1)
            offset = scale * n.neg().unsqueeze(1)
        near = torch.add(x, q, alpha=1.0 / sq).mul_(scale).add_(offset)
        if not skip:  # and p_s - p_t where |x| + KL > _NEAR_GRADIENT
            _blend_direct(grad_s, near.mul_(p_t), p_t, x, kl, s, temperature, p_s)
        else:  # the same, on the rows that have such entries only
            torch.mul(near, p_t, out=grad_s)
            rows_far = (row_abs_max + kl.squeeze(1) > _NEAR_GRADIENT).nonzero().squeeze(1)
            if rows_far.numel():
                part = grad_s[rows_far]
                _blend_direct(part, part, p_t[rows_far], x[rows_far], kl[rows_far], s[rows_far], temperature,
                              None if p_s is None else p_s[rows_far])
                grad_s.index_copy_(0, rows_far, part)
        # the teacher's top class: minus the sum of the others (the entries sum to 0). Its own value is the one the
        # two forms above give worst when p_t is peaked there: e.g. 1 - 1e-21 against 1 - 1e-96.
        if not skip or float(z_t.amin()) < 2.0:  # (only matters where p_t > 1/2 there)
            grad_s.scatter_(1, top, 0.0)
            grad_s.scatter_(1, top, grad_s.sum(dim=1, keepdim=True).neg_())
    return rows


def _blend_direct(out: torch.Tensor, near: torch.Tensor, p_t: torch.Tensor, x: torch.Tensor, kl: torch.Tensor,
                  s: torch.Tensor, temperature: float, p_s: torch.Tensor | None) -> None:
    """``out = near`` where ``|x| + KL <= _NEAR_GRADIENT``, ``p_s - p_t`` elsewhere (``x`` is overwritten)."""
    if p_s is None:
        p_s = _softmax_with_parts(s, temperature)[0]
    choose = x.abs_().neg_().add_(_NEAR_GRADIENT - kl).mul_(1e30).clamp_(0.0, 1.0)
    torch.lerp(p_s.sub_(p_t), near, choose, out=out)  # exact at weights 0 and 1


def _softmax_with_parts(z: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``softmax(z / T)`` of each row, ``a = (z - max z) / T`` and ``sum exp(a)`` (so ``log p = a - log sum``)."""
    a = (z - z.amax(dim=1, keepdim=True)).div_(temperature)
    p = a.exp()
    total = p.sum(dim=1, keepdim=True)
    return p.div_(total), a, total


def _difference_to_column(s: torch.Tensor, t: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """``d - d[column]`` for ``d = s - t``, rounded once, so a common offset of the logits costs nothing. With
    ``column`` the teacher's top class, the largest-weight entry of ``sum_c p_t,c d_c`` is exactly 0."""
    hi, lo = _exact_difference(s, t)
    return hi.sub_(hi.gather(1, column)).add_(lo.sub_(lo.gather(1, column)))


def _exact_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a - b`` as ``hi + lo`` with no rounding error (Knuth's two-sum of ``a`` and ``-b``)."""
    hi = a - b
    back = hi - a
    lo = torch.sub(a, hi - back)
    return hi, lo.sub_(back.add_(b))  # (a - (hi - back)) - (b + back)


def _phi_poly(x: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """``(e^x - 1 - x) / x^2`` on ``|x| <= 1``: Horner's scheme on ``coeffs``, one fused multiply-add per step."""
    r = torch.addcmul(coeffs[-2], x, coeffs[-1])
    for k in range(coeffs.numel() - 3, -1, -1):
        torch.addcmul(coeffs[k], x, r, out=r)
    return r


def _one_minus_pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 - rho`` of each row pair (the DIST authors' Pearson, ``eps`` in the denominator), with ``1 - cos`` taken
    from the difference of the unit vectors rather than from ``1`` minus a rounded cosine."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    norm_a, norm_b = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    tiny = torch.finfo(a.dtype).tiny  # a zero row: its product of norms is 0, so 1 - rho = eps / eps = 1, as before
    half_gap = (a / norm_a.clamp_min(tiny) - b / norm_b.clamp_min(tiny)).square().sum(dim=1) / 2  # 1 - cos
    product = (norm_a * norm_b).squeeze(1)
    return (product * half_gap + eps) / (product + eps)


def _softmax_parts(z: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``p = softmax(z / T)``, ``dev = T * (p - 1 / C)`` and the rounding scale of ``dev / T``, per row.

    ``dev = T * (expm1(a) - mean(expm1(a))) / sum(exp(a))`` never subtracts two numbers close to ``1 / C`` (accurate
    near uniform, large ``T``); ``p`` keeps the small probabilities of a peaked softmax (small ``T``)."""
    a = (z - z.amax(dim=1, keepdim=True)) / temperature  # out of place: autograd differentiates dist_loss
    total = torch.exp(a).sum(dim=1, keepdim=True)
    e = torch.expm1(a)
    e_mean = e.mean(dim=1, keepdim=True)
    return torch.exp(a) / total, temperature * (e - e_mean) / total, (e.abs() + e_mean.abs()) / total


def _batch_centred(p: torch.Tensor, dev: torch.Tensor, dev_scale: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T * (p - mean over the batch)`` of each class column, from ``dev`` or ``p``, whichever rounds less there."""
    from_p = temperature * (p - p.mean(dim=0, keepdim=True))
    from_dev = dev - dev.mean(dim=0, keepdim=True)
    return torch.where(dev_scale.amax(dim=0) < p.amax(dim=0), from_dev, from_p)


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> torch.Tensor:
    """DIST loss (Huang et al. 2022): ``T^2 * (beta * inter + gamma * intra)``.

    With ``Y = softmax(z/T)`` and ``rho`` the Pearson correlation (the authors' form, ``1e-8`` added to the
    denominator), ``inter = 1 - mean_i rho(Y_s[i, :], Y_t[i, :])`` and ``intra = 1 - mean_j rho(Y_s[:, j], Y_t[:, j])``
    (needs a batch of more than one). Computed in float64 (the input dtype on MPS) from ``Y - 1/C`` formed directly,
    so nothing cancels at large ``T``; returned in float32 (float64 for float64 inputs).

    Args:
        student_logits: Student logits ``[B, C]``.
        teacher_logits: Teacher logits ``[B, C]``.
        temperature: Softmax temperature, in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]`` (``[1e-4, 1e8]``).
        beta, gamma: Weights of the inter- and intra-class terms.

    Raises:
        ConfigError: Bad temperature or weights, or mismatched logits.

    Example:
        >>> import torch
        >>> t = torch.randn(4, 6)
        >>> float(dist_loss(t.clone(), t)) < 1e-4  # identical logits: 1e-8 in rho's denominator keeps it above 0
        True
    """
    temperature = check_temperature_range(temperature)
    beta = check_weight("beta", beta)
    gamma = check_weight("gamma", gamma)
    check_logit_pair(student_logits, teacher_logits)
    out_dtype = _compute_dtype(student_logits, teacher_logits)
    # float64 inside: near agreement 1 - rho is a difference of two separately rounded softmaxes, which float32
    # leaves with 1e-4 relative error (the loss is B x C numbers: the cost is nil); MPS has no float64
    dtype = out_dtype if student_logits.device.type == "mps" else torch.promote_types(out_dtype, torch.float64)
    p_s, dev_s, scale_s = _softmax_parts(student_logits.to(dtype), temperature)
    p_t, dev_t, scale_t = _softmax_parts(teacher_logits.detach().to(dtype), temperature)
    eps = 1e-8 * temperature**2  # rho(T * u, T * v) with 1e-8 T^2 equals rho(u, v) with 1e-8
    inter = _one_minus_pearson_rows(dev_s, dev_t, eps).mean()  # the rows of dev are Y - 1/C: already centred
    intra = _one_minus_pearson_rows(_batch_centred(p_s, dev_s, scale_s, temperature).t(),
                                    _batch_centred(p_t, dev_t, scale_t, temperature).t(), eps).mean()
    return ((temperature**2) * (beta * inter + gamma * intra)).to(out_dtype)


def spectral_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Spectral feature-distillation loss of Distillation Dynamics (arXiv 2511.06848) for one block pair.

    The teacher map is resized to the student's spatial size, the wider map's channels are average-pooled to the
    narrower width, and the loss is the MSE between the real and imaginary parts of both maps' ``rfft2`` over (H, W)
    (``norm="ortho"``, float32).

    Args:
        student_feature: Student block output ``[B, C_s, H_s, W_s]``.
        teacher_feature: Teacher block output ``[B, C_t, H_t, W_t]`` (treated as a constant).

    Raises:
        ConfigError: A map is not 4-D or the batch sizes differ.

    Example:
        >>> import torch
        >>> s = torch.randn(2, 8, 4, 4)
        >>> float(spectral_loss(s, s.repeat_interleave(2, dim=1)))  # teacher = student channels duplicated
        0.0
    """
    check_nchw("student", student_feature)
    check_nchw("teacher", teacher_feature)
    if student_feature.shape[0] != teacher_feature.shape[0]:
        raise ConfigError(
            f"batch sizes differ: student feature {tuple(student_feature.shape)} vs teacher feature "
            f"{tuple(teacher_feature.shape)}."
        )
    s = student_feature.float()
    t = match_spatial(teacher_feature.detach().float(), tuple(s.shape[-2:]))
    width = min(s.shape[1], t.shape[1])
    s, t = pool_channels(s, width), pool_channels(t, width)
    s_fft = torch.fft.rfft2(s, norm="ortho")
    t_fft = torch.fft.rfft2(t, norm="ortho")
    return F.mse_loss(torch.stack([s_fft.real, s_fft.imag], dim=-1), torch.stack([t_fft.real, t_fft.imag], dim=-1))
