"""Distillation losses as pure functions: ``kd_loss`` (Hinton), ``dist_loss`` (DIST) and ``spectral_loss``.

Each takes student and teacher tensors, treats the teacher side as a constant, computes in float32 and returns a
scalar tensor. The loss modules (:class:`~timm_remem.distill.DistillationLoss`,
:class:`~timm_remem.distill.FeatureDistillation`) are built on these.

Example:
    >>> import torch
    >>> from timm_remem.distill.functional import kd_loss
    >>> float(kd_loss(torch.zeros(2, 5), torch.zeros(2, 5), temperature=4.0))
    0.0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ._checks import check_logit_pair, check_nchw, check_temperature, check_weight
from ._maps import match_spatial, pool_channels

__all__ = ["kd_loss", "dist_loss", "spectral_loss"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton knowledge-distillation loss: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch.

    The same form as ``timm.task.LogitDistillationTask`` (``kl_div(..., reduction="batchmean") * T**2``). Computed in
    float32 whatever the input dtype. The ``T^2`` factor keeps gradient magnitudes comparable across temperatures.

    Args:
        student_logits: Student logits ``[B, C]`` (gradients flow through these).
        teacher_logits: Teacher logits ``[B, C]`` (treated as a constant target).
        temperature: Softmax temperature ``T > 0``.

    Returns:
        A scalar tensor.

    Raises:
        ConfigError: ``temperature`` is not positive and finite, the logits are not 2-D, or the batch sizes or class
            counts differ.

    Example:
        >>> import torch
        >>> s, t = torch.zeros(2, 5), torch.zeros(2, 5)
        >>> float(kd_loss(s, t, temperature=4.0))
        0.0
    """
    temperature = check_temperature(temperature)
    check_logit_pair(student_logits, teacher_logits)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (temperature**2)


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


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

    Args:
        student_logits: Student logits ``[B, C]``.
        teacher_logits: Teacher logits ``[B, C]``.
        temperature: Softmax temperature ``T > 0``.
        beta: Weight of the inter-class term.
        gamma: Weight of the intra-class term.

    Returns:
        A scalar tensor.

    Raises:
        ConfigError: Bad temperature or weights, or mismatched logits.

    Example:
        >>> import torch
        >>> t = torch.randn(4, 6)
        >>> float(dist_loss(t.clone(), t)) < 1e-4  # identical logits: zero up to float32 rounding
        True
    """
    temperature = check_temperature(temperature)
    beta = check_weight("beta", beta)
    gamma = check_weight("gamma", gamma)
    check_logit_pair(student_logits, teacher_logits)
    y_s = F.softmax(student_logits.float() / temperature, dim=1)
    y_t = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    inter = 1.0 - _pearson_rows(y_s, y_t).mean()
    intra = 1.0 - _pearson_rows(y_s.t(), y_t.t()).mean()
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
