"""Distillation losses as pure functions: ``kd_loss`` (Hinton), ``dist_loss`` (DIST) and ``spectral_loss``.

Each takes student and teacher tensors, treats the teacher side as a constant, computes in float32 (float64 inputs
in float64) and returns a scalar tensor. The loss modules (:class:`~timm_remem.distill.DistillationLoss`,
:class:`~timm_remem.distill.FeatureDistillation`) are built on these.

The logit losses are computed in forms that stay accurate where the textbook ones cancel: at a large temperature
``softmax(z/T)`` is ``1/C`` plus a deviation of order ``1/T``, so ``log p_t - log p_s`` (``kd_loss``) and
``p - mean(p)`` (``dist_loss``) lose about ``log10(T)`` digits and the ``T^2`` factor then multiplies the rounding
error. Both are within ``1e-3`` (relative) of a 50-digit reference for every temperature in
``[MIN_TEMPERATURE, MAX_TEMPERATURE]`` (``tests/distill/test_distill_accuracy.py``, fp32, bf16 and fp16 logits of
scale 1e-2 to 1e3); other temperatures are refused.

Example:
    >>> import torch
    >>> from timm_remem.distill.functional import kd_loss
    >>> float(kd_loss(torch.zeros(2, 5), torch.zeros(2, 5), temperature=4.0))
    0.0
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ._checks import check_logit_pair, check_nchw, check_temperature, check_weight
from ._maps import match_spatial, pool_channels

__all__ = ["kd_loss", "dist_loss", "spectral_loss", "MIN_TEMPERATURE", "MAX_TEMPERATURE"]

#: The temperatures ``kd_loss`` and ``dist_loss`` accept: inside, both are within 1e-3 of an exact reference.
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 1e8

# 1/(k+2)! for k = 0, 1, ...: the Taylor coefficients of (e^x - 1 - x) / x^2. On |x| <= 1/2, 7 terms leave a relative
# error below 5e-8 (float32's resolution), 14 terms below 1e-16 (float64's).
_PHI_COEFFS = tuple(1.0 / math.factorial(k + 2) for k in range(14))


def check_temperature_range(temperature: float) -> float:
    """A temperature ``kd_loss`` and ``dist_loss`` compute accurately: a number in ``[1e-4, 1e8]``, as ``float``.

    Raises:
        ConfigError: Not a positive finite number, or outside ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``.

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


def _phi_over_square(x: torch.Tensor) -> torch.Tensor:
    """``(e^x - 1 - x) / x^2`` for ``x <= 1`` without cancellation: a Taylor series on ``|x| <= 1/2``, elsewhere
    ``expm1(x) - x`` (which loses at most a factor 5 of the dtype's resolution there)."""
    small = x.abs() <= 0.5
    xs = torch.where(small, x, 0.0)
    coeffs = _PHI_COEFFS[: 14 if x.dtype == torch.float64 else 7]
    series = torch.full_like(xs, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        series = series * xs + c
    xd = torch.where(small, 1.0, x)  # harmless where the series is used: no 0/0 in either branch's gradient
    return torch.where(small, series, (torch.expm1(xd) - xd) / xd.square())


def _log1p_over(n: torch.Tensor) -> torch.Tensor:
    """``log1p(n) / n`` for ``n >= 0`` (1 at 0; below 1e-4 its series, whose first omitted term is under 2e-17)."""
    tiny = n < 1e-4
    ns = torch.where(tiny, 1.0, n)
    return torch.where(tiny, 1.0 - n * (0.5 - n * (1.0 / 3.0 - n * 0.25)), torch.log1p(ns) / ns)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton knowledge-distillation loss: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch.

    The same value as ``timm.task.LogitDistillationTask`` (``kl_div(..., reduction="batchmean") * T**2``), computed
    in float32 (float64 for float64 inputs) in a form that stays accurate at any accepted temperature. The ``T^2``
    factor keeps gradient magnitudes comparable across temperatures; as ``T`` grows the loss tends to half the
    variance over classes of ``s - t`` (logit matching).

    How: with ``d = s - t`` centred under ``p_t`` (``d' = d - sum_c p_t,c d_c``) and ``x = d' / T``, the KL
    divergence is exactly ``log(1 + sum_c p_t,c phi(x_c))`` with ``phi(x) = e^x - 1 - x >= 0``: a sum of
    non-negative terms, so nothing cancels however large ``T`` is. ``T^2 phi(x)`` is evaluated as
    ``d'^2 (phi(x) / x^2)`` (a Taylor series near 0) and ``T^2 log(1 + n)`` as ``T^2 n * (log1p(n) / n)``, so no
    ``1/T^2`` underflows; ``d`` is formed exactly (an error-free difference), so a large common offset of the logits
    costs nothing. Entries with ``x > 1`` (small ``T``) are summed in log space instead, their exponents
    ``log p_t,c + x_c`` formed from the student's and teacher's gaps to their own maxima (no large cancelling terms),
    so nothing overflows. Every branch is differentiable with finite gradients.

    Args:
        student_logits: Student logits ``[B, C]`` (gradients flow through these).
        teacher_logits: Teacher logits ``[B, C]`` (treated as a constant target).
        temperature: Softmax temperature, in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]`` (``[1e-4, 1e8]``).

    Returns:
        A scalar tensor.

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
    dtype = _compute_dtype(student_logits, teacher_logits)
    return _scaled_kl_rows(student_logits.to(dtype), teacher_logits.detach().to(dtype), temperature).mean()


def _exact_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a - b`` as ``hi + lo`` with no rounding error (Knuth's two-sum of ``a`` and ``-b``)."""
    hi = a - b
    back = hi - a
    lo = (a - (hi - back)) + (-b - back)
    return hi, lo


def _scaled_kl_rows(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(t/T) || softmax(s/T))`` of each row, in the form described in :func:`kd_loss`."""
    gap_t = t.amax(dim=-1, keepdim=True) - t  # >= 0; the teacher's softmax from gaps, not from large t/T values
    gap_s = s.amax(dim=-1, keepdim=True) - s
    scaled = -gap_t / temperature
    lse_t = torch.logsumexp(scaled, dim=-1, keepdim=True)
    log_p = scaled - lse_t
    p = log_p.exp()
    # d = s - t centred under p: exactly formed, then taken relative to its value at the teacher's top class (a data
    # value, so a large common offset of s - t drops out before the weighted mean is rounded)
    hi, lo = _exact_difference(s, t)
    top = t.argmax(dim=-1, keepdim=True)
    hi, lo = hi - hi.gather(-1, top), lo - lo.gather(-1, top)
    d = (hi - (p * hi).sum(dim=-1, keepdim=True)) + (lo - (p * lo).sum(dim=-1, keepdim=True))  # sum_c p_c d_c = 0
    x = d / temperature
    far = x > 1  # e^x could overflow: these entries are summed in log space
    # T^2 * sum_c p_c phi(x_c) over the other entries, then T^2 * log1p(n) with n that sum / T^2
    near = torch.where(far, 0.0, d)
    y = (p * near.square() * _phi_over_square(torch.where(far, 0.0, x))).sum(dim=-1)
    n = y / temperature**2
    # Rows with far entries: KL = log(1 + n + sum_far p_c phi(x_c)), the far sum a log-sum-exp of
    # log p_c + x_c + log(1 - (1 + x_c) e^-x_c), where log p_c + x_c = (kappa - gap_s,c) / T - lse_t and
    # kappa = s_max - t_max - sum_c p_c d_c = sum_c p_c gap_s,c - sum_c p_c gap_t,c (sums of non-negative terms).
    # Both row forms are computed (no host sync), each from inputs made harmless where the other is used.
    has_far = far.any(dim=-1)
    xf = torch.where(far, x, 2.0)
    kappa = (p * gap_s).sum(dim=-1, keepdim=True) - (p * gap_t).sum(dim=-1, keepdim=True)
    exponent = (kappa - gap_s) / temperature - lse_t + torch.log1p(-(1.0 + xf) * torch.exp(-xf))
    exponent = torch.where(far, exponent, -math.inf)
    exponent = torch.where(has_far.unsqueeze(-1), exponent, 0.0)
    far_kl = torch.logaddexp(torch.log1p(n), torch.logsumexp(exponent, dim=-1))
    return torch.where(has_far, far_kl * temperature**2, y * _log1p_over(n))


def _one_minus_pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 - rho`` of each row pair, ``rho = <a', b'> / (|a'| |b'| + eps)`` with ``a'``, ``b'`` the centred rows (the
    DIST authors' Pearson). Formed as ``(|a'| |b'| * |a'/|a'| - b'/|b'||^2 / 2 + eps) / (|a'| |b'| + eps)``: the
    same number, but when the rows are nearly parallel the small ``1 - cos`` comes from the difference of the unit
    vectors rather than from ``1`` minus a rounded cosine."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    norm_a, norm_b = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    tiny = torch.finfo(a.dtype).tiny  # a zero row: its product of norms is 0, so 1 - rho = eps / eps = 1, as before
    half_gap = (a / norm_a.clamp_min(tiny) - b / norm_b.clamp_min(tiny)).square().sum(dim=1) / 2  # 1 - cos
    product = (norm_a * norm_b).squeeze(1)
    return (product * half_gap + eps) / (product + eps)


def _softmax_parts(z: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``p = softmax(z / T)``, ``dev = T * (p - 1 / C)`` and the rounding scale of ``dev / T``, per row.

    With ``a = (z - max z) / T <= 0``, ``dev = T * (expm1(a) - mean(expm1(a))) / sum(exp(a))``, which never subtracts
    two numbers close to ``1 / C``: accurate when the softmax is close to uniform (large ``T``), where ``p - 1/C``
    would cancel. ``p`` itself is accurate for the small probabilities of a peaked softmax (small ``T``), which
    ``dev`` loses against ``1 / C``.
    """
    a = (z - z.amax(dim=1, keepdim=True)) / temperature
    total = torch.exp(a).sum(dim=1, keepdim=True)
    e = torch.expm1(a)
    e_mean = e.mean(dim=1, keepdim=True)
    dev = temperature * (e - e_mean) / total
    return torch.exp(a) / total, dev, (e.abs() + e_mean.abs()) / total


def _batch_centred(p: torch.Tensor, dev: torch.Tensor, dev_scale: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T * (p - mean over the batch)`` of each class column, from ``dev`` (near-uniform columns) or from ``p``
    (columns holding a peak or only small probabilities), whichever rounds less there."""
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
    """DIST loss (Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher").

    With ``Y_s = softmax(s/T)`` and ``Y_t = softmax(t/T)`` (``[B, C]``) and ``rho`` the Pearson correlation:

    - inter-class relation: ``1 - mean_i rho(Y_s[i, :], Y_t[i, :])`` (per sample, across classes);
    - intra-class relation: ``1 - mean_j rho(Y_s[:, j], Y_t[:, j])`` (per class, across the batch);
    - loss ``= T^2 * (beta * inter + gamma * intra)``.

    This matches the paper's equations and the authors' code (Pearson as the cosine of centred vectors with ``1e-8``
    added to the denominator). The intra-class term needs a batch of more than one sample to be informative.

    Computed in float32 (float64 for float64 inputs) without the cancellations of the textbook form: Pearson only
    sees centred vectors, so ``Y - 1/C`` is formed directly, without subtracting numbers close to ``1/C`` (each
    class column is centred from whichever of ``Y`` and ``Y - 1/C`` rounds less there); the vectors are scaled by
    ``T``, with ``1e-8 T^2`` in place of ``1e-8`` (the same ``rho``); and ``1 - rho`` comes from the difference of
    the normalised vectors, not from ``1`` minus a rounded cosine.

    Args:
        student_logits: Student logits ``[B, C]``.
        teacher_logits: Teacher logits ``[B, C]``.
        temperature: Softmax temperature, in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]`` (``[1e-4, 1e8]``).
        beta: Weight of the inter-class term.
        gamma: Weight of the intra-class term.

    Returns:
        A scalar tensor.

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
    dtype = _compute_dtype(student_logits, teacher_logits)
    p_s, dev_s, scale_s = _softmax_parts(student_logits.to(dtype), temperature)
    p_t, dev_t, scale_t = _softmax_parts(teacher_logits.detach().to(dtype), temperature)
    eps = 1e-8 * temperature**2  # rho(T * u, T * v) with 1e-8 T^2 equals rho(u, v) with 1e-8
    inter = _one_minus_pearson_rows(dev_s, dev_t, eps).mean()  # the rows of dev are Y - 1/C: already centred
    intra = _one_minus_pearson_rows(_batch_centred(p_s, dev_s, scale_s, temperature).t(),
                                    _batch_centred(p_t, dev_t, scale_t, temperature).t(), eps).mean()
    return (temperature**2) * (beta * inter + gamma * intra)


def spectral_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Spectral feature-distillation loss of Distillation Dynamics (arXiv 2511.06848) for one block pair.

    Steps: the teacher map is resized to the student's spatial size (average pooling when it is larger on both sides,
    bilinear interpolation otherwise; this is what lets a CNN student pair with a ViT teacher); the wider map's channels
    are average-pooled to the narrower width (the paper pools the teacher to the student width; we also pool a wider
    student rather than fail); both go through a 2-D real FFT over (H, W) with ``norm="ortho"`` in float32; the loss is
    the mean squared error over the stacked real and imaginary parts.

    Args:
        student_feature: Student block output ``[B, C_s, H_s, W_s]``.
        teacher_feature: Teacher block output ``[B, C_t, H_t, W_t]`` (treated as a constant).

    Returns:
        A scalar tensor.

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
