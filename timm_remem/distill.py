"""Distillation losses, teacher handling and a timm-style distillation task.

What lives here (see ``docs/distill.md`` for the full story and where each piece extends timm):

- ``kd_loss`` (Hinton logit KD, ``T^2 * KL``), ``dist_loss`` (DIST, Huang et al. 2022) and ``spectral_loss``
  (Distillation Dynamics' spectral feature loss) as pure functions.
- ``DistillationLoss``: task loss (hard labels, label smoothing or soft mixup/cutmix targets) plus one distillation
  term (``"kd"``, ``"hard"`` or ``"dist"``) with explicit weights.
- ``FeatureDistillation``: spectral or trainable-projector feature losses over (student, teacher) block pairs taken
  from ``forward_intermediates``; early pairs by default, a logged warning for late pairs.
- ``Teacher``: a frozen, always-eval teacher that re-normalises and resizes the student's input, refuses a class
  count that differs from the student's, and can serve logits from a ``TeacherLogitCache``.
- ``RememDistillationTask``: a ``timm.task.TrainingTask`` that ties them together (``forward(input, target)`` returns
  a dict with ``loss`` and ``output``) and accepts precomputed teacher logits so SAM's second pass reuses them.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import DistillationTeacher, TrainingTask
from timm.utils import unwrap_model

from .errors import ConfigError, UnsupportedModelError

__all__ = [
    "kd_loss",
    "dist_loss",
    "spectral_loss",
    "DistillationLoss",
    "FeatureDistillation",
    "DistillationStudent",
    "Teacher",
    "TeacherLogitCache",
    "precompute_teacher_logits",
    "RememDistillationTask",
    "DISTILL_METHODS",
    "FEATURE_KINDS",
]

_logger = logging.getLogger(__name__)

DISTILL_METHODS = ("kd", "hard", "dist")
FEATURE_KINDS = ("spectral", "projector")

_LATE_LAYER_MESSAGE = (
    "Feature distillation pair (student block {s}, teacher block {t}) aligns a late layer ({which} in the top "
    "{pct:.0f}% of its depth). Distillation Dynamics (arXiv 2511.06848) finds that ViTs compress information over "
    "their early blocks and expand it again in late blocks, where the teacher switches to a distributed, "
    "high-dimensional encoding specialised to its own head. A narrower student cannot reproduce that encoding, so "
    "forcing it to match late layers costs accuracy (DeiT-Tiny from CaiT-S24: last-layer alignment 76.83% top-1 vs "
    "76.99% for logit KD alone; first-layer alignment is neutral). Prefer early pairs (the default [(0, 0)]) or "
    "logit distillation alone."
)


# ----------------------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------------------


def _check_temperature(temperature: float) -> float:
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise ConfigError(
            f"temperature must be a positive finite number, got {temperature!r}; use e.g. temperature=1.0 or 4.0."
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"temperature must be a positive finite number, got {temperature!r}; use e.g. temperature=1.0 or 4.0."
        )
    return value


def _check_weight(name: str, value: float) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}.") from None
    if not math.isfinite(w) or w < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}; use 0 to switch the term off.")
    return w


def _check_logit_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.ndim != 2 or teacher_logits.ndim != 2:
        raise ConfigError(
            "distillation expects logits shaped [batch, num_classes], got student "
            f"{tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}; flatten extra dimensions or "
            "pass the classifier output (model(x)), not features."
        )
    if student_logits.shape[1] != teacher_logits.shape[1]:
        raise ConfigError(
            f"teacher has {teacher_logits.shape[1]} classes but student has {student_logits.shape[1]}; distillation "
            "needs the same label space. Create the student with num_classes equal to the teacher's (or fine-tune "
            "the teacher on the student's classes first)."
        )
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ConfigError(
            f"batch sizes differ: student logits {tuple(student_logits.shape)} vs teacher logits "
            f"{tuple(teacher_logits.shape)}; compute teacher logits on the same batch as the student."
        )


# ----------------------------------------------------------------------------------------------------------------------
# logit losses (pure functions)
# ----------------------------------------------------------------------------------------------------------------------


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
    temperature = _check_temperature(temperature)
    _check_logit_pair(student_logits, teacher_logits)
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
    temperature = _check_temperature(temperature)
    beta = _check_weight("beta", beta)
    gamma = _check_weight("gamma", gamma)
    _check_logit_pair(student_logits, teacher_logits)
    y_s = F.softmax(student_logits.float() / temperature, dim=1)
    y_t = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    inter = 1.0 - _pearson_rows(y_s, y_t).mean()
    intra = 1.0 - _pearson_rows(y_s.t(), y_t.t()).mean()
    return (temperature**2) * (beta * inter + gamma * intra)


# ----------------------------------------------------------------------------------------------------------------------
# feature losses
# ----------------------------------------------------------------------------------------------------------------------


def _check_nchw(name: str, x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ConfigError(
            f"{name} feature must be NCHW [B, C, H, W], got shape {tuple(x.shape)}; take features from "
            "forward_intermediates(..., output_fmt='NCHW')."
        )


def _match_spatial(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize an NCHW map to ``size``: average pooling when shrinking both sides, bilinear otherwise."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if h >= size[0] and w >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _pool_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Average-pool the channel axis of an NCHW map to ``channels`` (adaptive bins, like adaptive_avg_pool1d)."""
    if x.shape[1] == channels:
        return x
    return F.adaptive_avg_pool3d(x.unsqueeze(1), (channels, x.shape[2], x.shape[3])).squeeze(1)


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
    _check_nchw("student", student_feature)
    _check_nchw("teacher", teacher_feature)
    if student_feature.shape[0] != teacher_feature.shape[0]:
        raise ConfigError(
            f"batch sizes differ: student feature {tuple(student_feature.shape)} vs teacher feature "
            f"{tuple(teacher_feature.shape)}."
        )
    s = student_feature.float()
    t = _match_spatial(teacher_feature.detach().float(), tuple(s.shape[-2:]))
    width = min(s.shape[1], t.shape[1])
    s, t = _pool_channels(s, width), _pool_channels(t, width)
    s_fft = torch.fft.rfft2(s, norm="ortho")
    t_fft = torch.fft.rfft2(t, norm="ortho")
    return F.mse_loss(torch.stack([s_fft.real, s_fft.imag], dim=-1), torch.stack([t_fft.real, t_fft.imag], dim=-1))


def _standardize_channels(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel standardisation over (B, H, W) with batch statistics (BatchNorm without affine/running stats)."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


class _Projector(nn.Module):
    """Per-position Linear ``C_s -> C_t`` followed by BatchNorm2d, applied to an NCHW map."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.bn(x)


def _unwrap_teacher_model(model: nn.Module) -> nn.Module:
    if isinstance(model, (Teacher, DistillationTeacher)):
        model = model.model
    return unwrap_model(model)


def _num_feature_layers(model: nn.Module, role: str) -> list[int]:
    """Channel count of every index ``forward_intermediates`` can return, from ``feature_info``."""
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "forward_head"):
        raise UnsupportedModelError(
            f"{role} {type(model).__name__} has no forward_intermediates/forward_head; feature distillation needs a "
            "timm model that supports forward_intermediates (most timm models do)."
        )
    info = getattr(model, "feature_info", None)
    if not info:
        raise UnsupportedModelError(
            f"{role} {type(model).__name__} has no feature_info, so block widths are unknown; use a timm model "
            "created with timm.create_model."
        )
    return [int(entry["num_chs"]) for entry in info]


def _forward_with_intermediates(
    model: nn.Module, x: torch.Tensor, indices: Sequence[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and NCHW block outputs at ``indices`` (non-negative) from one ``forward_intermediates`` pass."""
    inner = unwrap_model(model)
    unique = sorted(set(indices))
    kwargs: dict[str, Any] = {"indices": unique, "intermediates_only": False}
    if "output_fmt" in inspect.signature(inner.forward_intermediates).parameters:
        kwargs["output_fmt"] = "NCHW"
    final, intermediates = model.forward_intermediates(x, **kwargs)
    logits = model.forward_head(final)
    if len(intermediates) != len(unique):
        raise UnsupportedModelError(
            f"{type(inner).__name__}.forward_intermediates returned {len(intermediates)} maps for indices {unique}."
        )
    by_index = dict(zip(unique, intermediates, strict=True))
    feats = [by_index[i] for i in indices]
    for i, f in zip(indices, feats, strict=True):
        if f.ndim != 4:
            raise UnsupportedModelError(
                f"{type(inner).__name__} block {i} output has shape {tuple(f.shape)}, not NCHW; feature distillation "
                "needs spatial maps (ViTs with patch tokens and CNNs qualify)."
            )
    return logits, feats


class FeatureDistillation(nn.Module):
    """Feature distillation over (student block, teacher block) pairs, per Distillation Dynamics (arXiv 2511.06848).

    Block indices are those of ``forward_intermediates`` (ViT: transformer blocks; ResNet: stem then stages) and may
    be negative (``-1`` is the last). Two kinds:

    - ``"spectral"``: :func:`spectral_loss` per pair (parameter-free).
    - ``"projector"``: a trainable per-position ``Linear(C_s, C_t)`` + ``BatchNorm2d(C_t)`` on the student map, MSE to
      the teacher map standardised per channel over (B, H, W) with batch statistics. The authors' code also applies an
      affine BatchNorm to the teacher; we keep the teacher side parameter-free because a trainable affine on both sides
      lets the loss collapse to zero. The projector parameters are ordinary ``nn.Module`` parameters (pass
      ``self.parameters()`` to the optimizer, or use :class:`RememDistillationTask`, which exposes them).

    Spatial sizes may differ (CNN students): the teacher map is resized to the student's (average pooling when larger
    on both sides, bilinear otherwise). The loss is the mean over pairs; ``weight`` (0.2 by default, as in the paper)
    is applied by :class:`RememDistillationTask`, not by :meth:`forward`.

    The default pairs are ``[(0, 0)]`` (first blocks). Any pair whose student or teacher index lies in the top
    ``1 - late_fraction`` of its model's depth logs a warning on logger ``timm_remem.distill`` that explains why late
    alignment tends to hurt ViT students.

    Args:
        student: The student timm model.
        teacher: The teacher timm model (or a :class:`Teacher` / ``timm.task.DistillationTeacher``).
        pairs: ``(student_index, teacher_index)`` pairs; ``None`` means ``[(0, 0)]``.
        kind: ``"spectral"`` or ``"projector"``.
        weight: Weight of the feature loss in the total loss.
        late_fraction: A block index ``i`` of a model with ``n`` indices counts as late when ``i >= late_fraction * n``.

    Raises:
        ConfigError: Unknown ``kind``, empty or out-of-range pairs, bad weight.
        UnsupportedModelError: A model has no ``forward_intermediates`` / ``feature_info``.

    Example:
        >>> import timm, torch
        >>> student = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=10)
        >>> teacher = timm.create_model("test_vit2", pretrained=False, img_size=32, num_classes=10)
        >>> fd = FeatureDistillation(student, teacher, kind="projector")
        >>> sum(p.numel() for p in fd.parameters()) > 0
        True
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        pairs: Sequence[tuple[int, int]] | None = None,
        kind: str = "spectral",
        *,
        weight: float = 0.2,
        late_fraction: float = 0.5,
    ):
        super().__init__()
        if kind not in FEATURE_KINDS:
            raise ConfigError(f"kind must be one of {FEATURE_KINDS}, got {kind!r}.")
        if not (0.0 < float(late_fraction) <= 1.0):
            raise ConfigError(f"late_fraction must be in (0, 1], got {late_fraction!r}.")
        self.kind = kind
        self.weight = _check_weight("weight", weight)
        student_chs = _num_feature_layers(unwrap_model(student), "student")
        teacher_chs = _num_feature_layers(_unwrap_teacher_model(teacher), "teacher")
        pairs = [(0, 0)] if pairs is None else [tuple(p) for p in pairs]
        if not pairs:
            raise ConfigError("pairs is empty; give at least one (student_index, teacher_index) pair, e.g. [(0, 0)].")
        s_idx, t_idx = [], []
        for pair in pairs:
            if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
                raise ConfigError(f"each pair must be (student_index, teacher_index) integers, got {pair!r}.")
            s, t = pair
            s_idx.append(self._normalize_index(s, len(student_chs), "student"))
            t_idx.append(self._normalize_index(t, len(teacher_chs), "teacher"))
        self.student_indices: list[int] = s_idx
        self.teacher_indices: list[int] = t_idx
        self.pairs: list[tuple[int, int]] = list(zip(s_idx, t_idx, strict=True))
        self.projectors = nn.ModuleList()
        if kind == "projector":
            for s, t in self.pairs:
                self.projectors.append(_Projector(student_chs[s], teacher_chs[t]))
        for s, t in self.pairs:
            late_s = s >= late_fraction * len(student_chs)
            late_t = t >= late_fraction * len(teacher_chs)
            if late_s or late_t:
                which = " and ".join(
                    name for name, late in (("student block", late_s), ("teacher block", late_t)) if late
                )
                _logger.warning(_LATE_LAYER_MESSAGE.format(s=s, t=t, which=which, pct=100 * (1 - late_fraction)))

    @staticmethod
    def _normalize_index(index: int, n: int, role: str) -> int:
        if not -n <= index < n:
            raise ConfigError(
                f"{role} block index {index} is out of range: forward_intermediates offers {n} indices "
                f"(0..{n - 1}, or -{n}..-1)."
            )
        return index % n

    def project(self, student_features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Apply the trainable projectors (``kind="projector"``); identity for ``"spectral"``."""
        if len(student_features) != len(self.pairs):
            raise ConfigError(
                f"expected {len(self.pairs)} student features (one per pair), got {len(student_features)}."
            )
        if self.kind != "projector":
            return list(student_features)
        out = []
        for feat, proj in zip(student_features, self.projectors, strict=True):
            _check_nchw("student", feat)
            out.append(proj(feat))
        return out

    def compare(self, projected: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean loss over pairs given already-projected student features (see :meth:`project`)."""
        if len(teacher_features) != len(self.pairs) or len(projected) != len(self.pairs):
            raise ConfigError(
                f"expected {len(self.pairs)} student and teacher features (one per pair), got {len(projected)} and "
                f"{len(teacher_features)}."
            )
        losses = []
        for s, t in zip(projected, teacher_features, strict=True):
            if self.kind == "spectral":
                losses.append(spectral_loss(s, t))
            else:
                _check_nchw("teacher", t)
                t = _match_spatial(t.detach().float(), tuple(s.shape[-2:]))
                losses.append(F.mse_loss(s.float(), _standardize_channels(t)))
        return torch.stack(losses).mean()

    def forward(
        self, student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Unweighted mean feature loss over the pairs (student features raw, in pair order)."""
        return self.compare(self.project(student_features), teacher_features)


class DistillationStudent(nn.Module):
    """The trainable unit for feature distillation: the student plus the feature projectors.

    ``forward(x)`` returns ``(logits, projected_student_features)`` from one ``forward_intermediates`` pass, so that
    everything with trainable parameters runs inside one module's forward (what DistributedDataParallel needs).

    Args:
        student: The student timm model.
        features: The :class:`FeatureDistillation` whose pairs and projectors to use.
    """

    def __init__(self, student: nn.Module, features: FeatureDistillation):
        super().__init__()
        self.student = student
        self.features = features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits, feats = _forward_with_intermediates(self.student, x, self.features.student_indices)
        return logits, self.features.project(feats)


# ----------------------------------------------------------------------------------------------------------------------
# task + distillation loss
# ----------------------------------------------------------------------------------------------------------------------


class DistillationLoss(nn.Module):
    """Task loss plus one logit-distillation term, with explicit weights.

    ``total = task_weight * task_loss + distill_weight * distill_term`` where ``distill_term`` is

    - ``"kd"``: :func:`kd_loss` (``T^2 * KL``, Hinton);
    - ``"hard"``: cross-entropy against the teacher's argmax (DeiT "hard" distillation; ``temperature`` unused);
    - ``"dist"``: :func:`dist_loss` (``T^2 * (beta * inter + gamma * intra)``, Huang et al. 2022).

    ``T^2`` always stays inside the distillation term, whatever the weights: it is not dropped when ``task_weight`` is
    0 (torchdistill does) and nothing is divided by the number of classes (DeiT's soft loss does). The weights are
    independent (not ``alpha`` / ``1 - alpha``); for the Distillation Dynamics recipe use ``task_weight=0.1,
    distill_weight=0.9, label_smoothing=0.1``.

    The task term depends on ``target``:

    - integer labels ``[B]``: cross-entropy with ``label_smoothing`` (same value as timm's
      ``LabelSmoothingCrossEntropy``);
    - float targets ``[B, C]`` (timm ``Mixup``/``CutMix`` output): soft-target cross-entropy
      ``mean_i sum_c -y_ic log p_ic``; ``label_smoothing`` is not applied again (Mixup already smooths);
    - ``None``: allowed only when ``task_weight == 0`` (pure distillation / function matching).

    Parts: ``forward(..., return_parts=True)`` returns ``(total, parts)``; every call also stores the same dict
    (detached) in ``self.last_parts``. Keys: ``"loss"``, ``"task_loss"``, ``"kd_loss"`` (the latter two unweighted).

    Args:
        method: ``"kd"``, ``"hard"`` or ``"dist"``.
        task_weight: Weight of the task loss (>= 0).
        distill_weight: Weight of the distillation term (>= 0).
        temperature: Softmax temperature for ``"kd"`` and ``"dist"``.
        label_smoothing: Label smoothing for integer targets, in ``[0, 1)``.
        dist_beta: DIST inter-class weight.
        dist_gamma: DIST intra-class weight.

    Raises:
        ConfigError: Unknown method, bad temperature / weights / smoothing, both weights zero, or bad targets.

    Example:
        >>> import torch
        >>> loss_fn = DistillationLoss("kd", task_weight=0.5, distill_weight=0.5, temperature=4.0)
        >>> s, t, y = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10), torch.randint(0, 10, (8,))
        >>> total, parts = loss_fn(s, t, y, return_parts=True)
        >>> sorted(parts)
        ['kd_loss', 'loss', 'task_loss']
    """

    def __init__(
        self,
        method: str = "kd",
        *,
        task_weight: float = 1.0,
        distill_weight: float = 1.0,
        temperature: float = 1.0,
        label_smoothing: float = 0.0,
        dist_beta: float = 1.0,
        dist_gamma: float = 1.0,
    ):
        super().__init__()
        if method not in DISTILL_METHODS:
            raise ConfigError(f"method must be one of {DISTILL_METHODS}, got {method!r}.")
        self.method = method
        self.task_weight = _check_weight("task_weight", task_weight)
        self.distill_weight = _check_weight("distill_weight", distill_weight)
        if self.task_weight == 0 and self.distill_weight == 0:
            raise ConfigError("task_weight and distill_weight are both 0, so the loss is constant; make one positive.")
        self.temperature = _check_temperature(temperature)
        smoothing = float(label_smoothing)
        if not (0.0 <= smoothing < 1.0):
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}; 0.1 is a common choice.")
        self.label_smoothing = smoothing
        self.dist_beta = _check_weight("dist_beta", dist_beta)
        self.dist_gamma = _check_weight("dist_gamma", dist_gamma)
        self.last_parts: dict[str, torch.Tensor] = {}

    @classmethod
    def function_matching(cls, temperature: float = 1.0) -> DistillationLoss:
        """The loss of Beyer et al. 2022 ("patient and consistent"): pure ``KL`` to the teacher, no label term.

        Pair it with ``RememDistillationTask(..., consistent=True)`` (the default), mixup on the shared view and a
        long schedule; see ``docs/distill.md``.

        Example:
            >>> DistillationLoss.function_matching().task_weight
            0.0
        """
        return cls("kd", task_weight=0.0, distill_weight=1.0, temperature=temperature)

    def extra_repr(self) -> str:
        return (
            f"method={self.method!r}, task_weight={self.task_weight}, distill_weight={self.distill_weight}, "
            f"temperature={self.temperature}, label_smoothing={self.label_smoothing}"
        )

    def task_loss(self, student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The task term alone (hard labels with smoothing, or soft ``[B, C]`` targets)."""
        if target.is_floating_point():
            if target.shape != student_logits.shape:
                raise ConfigError(
                    f"soft targets must have the logits' shape {tuple(student_logits.shape)}, got "
                    f"{tuple(target.shape)}; pass integer class labels [B] or Mixup/CutMix targets [B, num_classes]."
                )
            log_p = F.log_softmax(student_logits.float(), dim=-1)
            return torch.sum(-target.float() * log_p, dim=-1).mean()
        if target.ndim != 1 or target.shape[0] != student_logits.shape[0]:
            raise ConfigError(
                f"integer targets must be class labels shaped [{student_logits.shape[0]}], got {tuple(target.shape)} "
                f"({target.dtype}); pass labels [B] or float soft targets [B, num_classes]."
            )
        return F.cross_entropy(student_logits.float(), target.long(), label_smoothing=self.label_smoothing)

    def distill_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The distillation term alone (unweighted, ``T^2`` included where it applies)."""
        if self.method == "kd":
            return kd_loss(student_logits, teacher_logits, self.temperature)
        if self.method == "dist":
            return dist_loss(student_logits, teacher_logits, self.temperature, self.dist_beta, self.dist_gamma)
        _check_logit_pair(student_logits, teacher_logits)
        return F.cross_entropy(student_logits.float(), teacher_logits.detach().argmax(dim=-1))

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor | None = None,
        *,
        return_parts: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss (and, with ``return_parts=True``, the detached parts dict).

        Args:
            student_logits: Student logits ``[B, C]``.
            teacher_logits: Teacher logits ``[B, C]``.
            target: Labels ``[B]``, soft targets ``[B, C]``, or ``None`` when ``task_weight == 0``.
            return_parts: Also return ``{"loss", "task_loss", "kd_loss"}``.

        Returns:
            The total loss, or ``(total, parts)``.
        """
        kd = self.distill_loss(student_logits, teacher_logits)
        if self.task_weight > 0:
            if target is None:
                raise ConfigError(
                    f"target is None but task_weight={self.task_weight}; pass labels, or set task_weight=0 for pure "
                    "distillation (function matching)."
                )
            task = self.task_loss(student_logits, target)
            total = self.task_weight * task + self.distill_weight * kd
        else:
            task = kd.new_zeros(())
            total = self.distill_weight * kd
        parts = {"loss": total.detach(), "task_loss": task.detach(), "kd_loss": kd.detach()}
        self.last_parts = parts
        if return_parts:
            return total, parts
        return total


# ----------------------------------------------------------------------------------------------------------------------
# teacher handling
# ----------------------------------------------------------------------------------------------------------------------


class TeacherLogitCache:
    """Teacher logits stored by dataset sample index, for inputs that are the same every epoch.

    Only valid when the teacher sees a deterministic view of each sample (no random augmentation): then logits
    computed once serve every later epoch, which makes the checkpoint-selection protocol (many short distillations
    from fixed teachers) cheap. With random augmentation this is "fixed teacher" distillation, which Beyer et al. 2022
    found clearly worse than consistent teaching: leave the cache off there.

    Args:
        num_samples: Dataset length (indices are ``0..num_samples-1``).
        num_classes: Logit width; inferred from the first :meth:`put` when ``None``.
        dtype: Storage dtype (float32 keeps cached logits bit-identical to fresh ones).

    Example:
        >>> import torch
        >>> cache = TeacherLogitCache(4)
        >>> cache.put(torch.tensor([0, 2]), torch.ones(2, 3))
        >>> cache.get(torch.tensor([2, 0])).shape, cache.get(torch.tensor([1]))
        (torch.Size([2, 3]), None)
    """

    def __init__(self, num_samples: int, num_classes: int | None = None, *, dtype: torch.dtype = torch.float32):
        if not isinstance(num_samples, int) or num_samples <= 0:
            raise ConfigError(f"num_samples must be a positive int (the dataset length), got {num_samples!r}.")
        self.num_samples = num_samples
        self.dtype = dtype
        self._logits: torch.Tensor | None = None
        self._filled = torch.zeros(num_samples, dtype=torch.bool)
        self.hits = 0
        self.misses = 0
        if num_classes is not None:
            self._allocate(int(num_classes))

    def _allocate(self, num_classes: int) -> None:
        self._logits = torch.zeros(self.num_samples, num_classes, dtype=self.dtype)

    @property
    def num_classes(self) -> int | None:
        return None if self._logits is None else self._logits.shape[1]

    def _index(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        idx = torch.as_tensor(indices).reshape(-1).to("cpu", torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_samples):
            raise ConfigError(
                f"sample indices must lie in [0, {self.num_samples}), got min {int(idx.min())}, max {int(idx.max())}; "
                "pass dataset indices (not batch positions) and size the cache with len(dataset)."
            )
        return idx

    def __len__(self) -> int:
        return int(self._filled.sum())

    def __contains__(self, index: int) -> bool:
        return 0 <= int(index) < self.num_samples and bool(self._filled[int(index)])

    @property
    def complete(self) -> bool:
        """Whether every sample has cached logits."""
        return bool(self._filled.all())

    def get(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor | None:
        """Cached logits ``[len(indices), C]`` in the order given, or ``None`` if any index is missing."""
        idx = self._index(indices)
        if self._logits is None or not bool(self._filled[idx].all()):
            self.misses += 1
            return None
        self.hits += 1
        return self._logits[idx]

    def put(self, indices: torch.Tensor | Sequence[int], logits: torch.Tensor) -> None:
        """Store logits ``[len(indices), C]`` for ``indices``."""
        idx = self._index(indices)
        if logits.ndim != 2 or logits.shape[0] != idx.numel():
            raise ConfigError(f"logits must be [len(indices)={idx.numel()}, num_classes], got {tuple(logits.shape)}.")
        if self._logits is None:
            self._allocate(logits.shape[1])
        if logits.shape[1] != self._logits.shape[1]:
            raise ConfigError(
                f"cache holds {self._logits.shape[1]}-class logits, got {logits.shape[1]}; use one cache per teacher."
            )
        self._logits[idx] = logits.detach().to("cpu", self.dtype)
        self._filled[idx] = True

    def clear(self) -> None:
        """Forget every cached logit (e.g. after the teacher changed)."""
        self._filled.zero_()
        self.hits = self.misses = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to save (e.g. with safetensors): ``logits`` and ``filled``."""
        logits = self._logits if self._logits is not None else torch.zeros(self.num_samples, 0, dtype=self.dtype)
        return {"logits": logits.clone(), "filled": self._filled.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict`."""
        logits, filled = state.get("logits"), state.get("filled")
        n = self.num_samples
        if logits is None or filled is None or tuple(filled.shape) != (n,) or logits.ndim != 2 or logits.shape[0] != n:
            raise ConfigError(
                f"cache state does not match a cache of {self.num_samples} samples; it needs 'logits' "
                f"[{self.num_samples}, C] and 'filled' [{self.num_samples}]."
            )
        self._logits = logits.to(self.dtype).clone() if logits.shape[1] else None
        self._filled = filled.to(torch.bool).clone()


def _data_config(model: nn.Module) -> dict[str, Any]:
    from timm.data import resolve_model_data_config

    return resolve_model_data_config(unwrap_model(model))


def _fixed_img_size(model: nn.Module) -> tuple[int, int] | None:
    """The input size a model insists on (ViT-style strict patch embedding), or ``None`` if any size works."""
    pe = getattr(model, "patch_embed", None)
    if pe is None or getattr(model, "dynamic_img_size", False):
        return None
    if getattr(pe, "strict_img_size", False) and getattr(pe, "img_size", None) is not None:
        return tuple(int(v) for v in pe.img_size)
    return None


class Teacher(nn.Module):
    """A frozen distillation teacher: always eval mode, no gradients, the student's input adapted to it.

    Builds on ``timm.task.DistillationTeacher`` (which keeps the teacher in eval and re-normalises mean/std) and
    extends it: the teacher stays in eval even when ``.train()`` is called on a parent module or on the teacher
    itself (and every forward re-asserts eval, so BatchNorm statistics can never move); parameters get
    ``requires_grad=False``; the input is resized to the teacher's fixed image size when it has one; a teacher whose
    ``num_classes`` differs from the student's is a :class:`ConfigError`, never a silently re-initialised head; and
    logits can be served from a :class:`TeacherLogitCache` by sample index.

    Input adaptation, for an input ``x`` normalised for the student (mean ``m_s``, std ``s_s``): if the teacher's
    mean/std (``m_t``, ``s_t``) differ, ``x_t = (x * s_s + m_s - m_t) / s_t``; then, if the teacher has a fixed input
    size (a ViT with a strict patch embedding, or ``input_size=`` given) and ``x`` has another, ``x_t`` is resized with
    ``F.interpolate`` (the teacher's ``interpolation``, bicubic or bilinear, antialiased when shrinking). Mean/std come
    from ``timm.data.resolve_model_data_config`` of each model (ImageNet defaults for plain modules) unless given.

    Args:
        model: The teacher (a timm model, or a ``timm.task.DistillationTeacher`` whose ``.model`` is used).
        student: The student, to read its mean/std and ``num_classes`` from (optional).
        mean: Teacher normalisation mean (overrides its data config).
        std: Teacher normalisation std.
        student_mean: Student normalisation mean (overrides the student's data config).
        student_std: Student normalisation std.
        input_size: ``(H, W)`` the teacher must see; ``None`` detects a fixed size from the model.
        interpolation: ``"bicubic"`` or ``"bilinear"``; ``None`` uses the teacher's data config.
        cache: Optional :class:`TeacherLogitCache` used when :meth:`forward` gets ``indices``.
        use_inference_mode: Run under ``torch.inference_mode`` (outputs are cloned to normal tensors) instead of
            ``torch.no_grad``.

    Raises:
        ConfigError: ``num_classes`` or channel counts differ, or bad mean/std/size arguments.

    Example:
        >>> import timm, torch
        >>> student = timm.create_model("resnet18", pretrained=False, num_classes=10)
        >>> vit = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=10)
        >>> teacher = Teacher(vit, student)
        >>> teacher(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        model: nn.Module,
        student: nn.Module | None = None,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        student_mean: Sequence[float] | None = None,
        student_std: Sequence[float] | None = None,
        input_size: tuple[int, int] | None = None,
        interpolation: str | None = None,
        cache: TeacherLogitCache | None = None,
        use_inference_mode: bool = False,
    ):
        super().__init__()
        if isinstance(model, Teacher):
            model = model.model
        if isinstance(model, DistillationTeacher):
            model = model.model
        if not isinstance(model, nn.Module):
            raise ConfigError(f"teacher must be an nn.Module, got {type(model).__name__}; create it with timm first.")
        self.model = model
        self.model.eval()
        self.model.requires_grad_(False)
        inner = unwrap_model(model)

        if student is not None:
            t_classes = getattr(inner, "num_classes", None)
            s_classes = getattr(unwrap_model(student), "num_classes", None)
            if t_classes is not None and s_classes is not None and int(t_classes) != int(s_classes):
                raise ConfigError(
                    f"teacher num_classes={t_classes} differs from student num_classes={s_classes}; distillation "
                    "needs one label space. Fine-tune the teacher on the student's classes (or create the student "
                    f"with num_classes={t_classes}); the teacher's head is never re-initialised silently."
                )

        t_cfg = _data_config(inner)
        s_cfg = _data_config(student) if student is not None else t_cfg
        t_mean = tuple(mean) if mean is not None else tuple(t_cfg["mean"])
        t_std = tuple(std) if std is not None else tuple(t_cfg["std"])
        s_mean = tuple(student_mean) if student_mean is not None else tuple(s_cfg["mean"])
        s_std = tuple(student_std) if student_std is not None else tuple(s_cfg["std"])
        if not (len(t_mean) == len(t_std) == len(s_mean) == len(s_std)):
            raise ConfigError(
                f"teacher and student normalisation have different channel counts (teacher mean {t_mean}, std "
                f"{t_std}; student mean {s_mean}, std {s_std}); both models must take the same number of channels."
            )
        if any(v <= 0 for v in (*t_std, *s_std)):
            raise ConfigError(f"std values must be > 0, got teacher {t_std}, student {s_std}.")
        self.renormalize = t_mean != s_mean or t_std != s_std
        shape = (1, -1, 1, 1)
        self.register_buffer("mean", torch.tensor(t_mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(t_std).view(shape), persistent=False)
        self.register_buffer("student_mean", torch.tensor(s_mean).view(shape), persistent=False)
        self.register_buffer("student_std", torch.tensor(s_std).view(shape), persistent=False)

        if input_size is not None:
            if len(input_size) != 2 or any(int(v) <= 0 for v in input_size):
                raise ConfigError(f"input_size must be (H, W) with positive ints, got {input_size!r}.")
            input_size = (int(input_size[0]), int(input_size[1]))
        self.input_size: tuple[int, int] | None = input_size if input_size is not None else _fixed_img_size(inner)
        interpolation = interpolation or t_cfg.get("interpolation", "bicubic")
        self.interpolation = "bicubic" if interpolation == "bicubic" else "bilinear"
        self.cache = cache
        self.use_inference_mode = bool(use_inference_mode)

    @property
    def num_classes(self) -> int | None:
        return getattr(unwrap_model(self.model), "num_classes", None)

    def train(self, mode: bool = True) -> Teacher:
        """Ignore ``mode``: the teacher and everything in it stay in eval mode."""
        return super().train(False)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Re-normalise (and resize) a student-normalised batch for the teacher."""
        if x.ndim != 4:
            raise ConfigError(f"teacher input must be an image batch [B, C, H, W], got shape {tuple(x.shape)}.")
        if self.renormalize:
            if x.shape[1] != self.mean.shape[1]:
                raise ConfigError(
                    f"input has {x.shape[1]} channels but the normalisation has {self.mean.shape[1]}; check in_chans."
                )
            x = (x * self.student_std + self.student_mean - self.mean) / self.std
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            shrink = x.shape[-2] > self.input_size[0] or x.shape[-1] > self.input_size[1]
            x = F.interpolate(x, size=self.input_size, mode=self.interpolation, align_corners=False, antialias=shrink)
        param = next(self.model.parameters(), None)
        if param is not None and param.is_floating_point() and x.dtype != param.dtype:
            x = x.to(param.dtype)
        return x

    def _run(self, fn, *args):
        self.model.eval()  # re-assert on every call: someone may have called .train() on the inner model
        if self.use_inference_mode:
            with torch.inference_mode():
                out = fn(*args)
            return _clone_tree(out)
        with torch.no_grad():
            return fn(*args)

    def forward(self, x: torch.Tensor, indices: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Teacher logits for a student-normalised batch ``x``.

        Args:
            x: Input ``[B, C, H, W]`` normalised for the student.
            indices: Dataset indices of the samples; with a cache, cached logits are returned without running the
                teacher, and fresh ones are stored.

        Returns:
            Logits ``[B, num_classes]`` (no gradient).
        """
        if indices is not None and self.cache is not None:
            cached = self.cache.get(indices)
            if cached is not None:
                return cached.to(x.device)
        logits = self._run(lambda inp: self.model(self.prepare_input(inp)), x)
        if indices is not None and self.cache is not None:
            self.cache.put(indices, logits)
        return logits

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Teacher logits and NCHW block outputs at ``indices`` (non-negative) from one pass."""
        return self._run(lambda inp: _forward_with_intermediates(self.model, self.prepare_input(inp), indices), x)


def _inner_module(module: nn.Module) -> nn.Module | None:
    """The module wrapped by DDP / EMA (``.module``) or torch.compile (``._orig_mod``), else ``None``."""
    for name in ("module", "_orig_mod"):
        inner = getattr(module, name, None)
        if isinstance(inner, nn.Module):
            return inner
    return None


def _clone_tree(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (list, tuple)):
        return type(out)(_clone_tree(o) for o in out)
    return out


def precompute_teacher_logits(
    teacher: Teacher,
    loader: Iterable,
    cache: TeacherLogitCache | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> TeacherLogitCache:
    """Run the teacher once over a deterministic loader and fill a :class:`TeacherLogitCache`.

    Each batch must be a sequence whose first element is the input (student-normalised) and whose last element is the
    dataset indices of its samples, e.g. ``(input, target, index)``.

    Args:
        teacher: The :class:`Teacher`.
        loader: Batches ``(input, ..., index)``; no random augmentation.
        cache: The cache to fill; ``None`` creates one of ``len(loader.dataset)`` samples (or ``teacher.cache``).
        device: Where to run the teacher (default: the device of its parameters).
        progress: Show a tqdm progress bar.

    Returns:
        The filled cache (also set as ``teacher.cache`` when the teacher had none).

    Example:
        >>> import timm, torch
        >>> vit = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3)
        >>> batches = [(torch.randn(2, 3, 32, 32), torch.zeros(2), torch.tensor([0, 1]))]
        >>> cache = precompute_teacher_logits(Teacher(vit), batches, TeacherLogitCache(2), progress=False)
        >>> cache.complete
        True
    """
    from tqdm.auto import tqdm

    if cache is None:
        cache = teacher.cache
    if cache is None:
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise ConfigError("pass cache=TeacherLogitCache(len(dataset)): the loader has no .dataset to size one.")
        cache = TeacherLogitCache(len(dataset))
    if teacher.cache is None:
        teacher.cache = cache
    if device is None:
        param = next(teacher.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    for batch in tqdm(loader, desc="teacher logits", disable=not progress, leave=False):
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise ConfigError("each batch must be (input, ..., index) so logits can be stored by dataset index.")
        x, idx = batch[0], batch[-1]
        logits = teacher._run(lambda inp: teacher.model(teacher.prepare_input(inp)), x.to(device))
        cache.put(idx, logits)
    return cache


# ----------------------------------------------------------------------------------------------------------------------
# training task
# ----------------------------------------------------------------------------------------------------------------------


class RememDistillationTask(TrainingTask):
    """A ``timm.task.TrainingTask`` for logit (and optionally feature) distillation with a frozen :class:`Teacher`.

    Plugs into a timm-style loop exactly like ``timm.task.LogitDistillationTask``: ``task(input, target)`` returns a
    dict with ``"loss"`` (to backpropagate), ``"output"`` (student logits), ``"task_loss"``, ``"kd_loss"`` and, with
    features, ``"feature_loss"``; plus ``"teacher_logits"`` so a caller can reuse them. It extends timm's task with:
    any :class:`DistillationLoss` (kd / hard / DIST, soft targets), a teacher that refuses a class mismatch and resizes
    inputs, feature distillation from ``forward_intermediates`` block pairs, ``teacher_logits=`` / ``indices=`` to avoid
    recomputing teacher outputs (SAM's second pass, cached epochs), and the ``consistent`` flag of Beyer et al. 2022.

    The teacher runs at most once per call, and not at all when ``teacher_logits`` (and, with features,
    ``teacher_features``) are passed, or when its cache holds the batch's ``indices``.

    Args:
        student: The student model (trained).
        teacher: The teacher: a :class:`Teacher`, or a module wrapped into one with ``student``'s normalisation.
        loss: The logit loss; default ``DistillationLoss()`` (kd, both weights 1, T=1).
        features: Optional :class:`FeatureDistillation`; its projectors become part of the trainable module.
        consistent: ``True`` (default): the teacher sees exactly the student's (augmented) input, and a separate
            ``teacher_input`` is refused. ``False``: every call must pass ``teacher_input`` (or ``teacher_logits``).
        device: Device for task tensors.
        dtype: Dtype for task tensors.
        verbose: Log the configuration.

    Example:
        >>> import timm, torch
        >>> student = timm.create_model("resnet18", pretrained=False, num_classes=10)
        >>> teacher = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=10)
        >>> task = RememDistillationTask(student, teacher, DistillationLoss("dist", temperature=4.0), verbose=False)
        >>> out = task(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
        >>> out["loss"].backward()
        >>> sorted(out)
        ['kd_loss', 'loss', 'output', 'task_loss', 'teacher_logits']
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        loss: DistillationLoss | None = None,
        *,
        features: FeatureDistillation | None = None,
        consistent: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = True,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        self.teacher = teacher if isinstance(teacher, Teacher) else Teacher(teacher, student)
        t_classes = self.teacher.num_classes
        s_classes = getattr(unwrap_model(student), "num_classes", None)
        if t_classes is not None and s_classes is not None and int(t_classes) != int(s_classes):
            raise ConfigError(
                f"teacher num_classes={t_classes} differs from student num_classes={s_classes}; distillation needs one "
                "label space. Create the student with the teacher's num_classes."
            )
        self.loss = loss if loss is not None else DistillationLoss()
        if not isinstance(self.loss, DistillationLoss):
            raise ConfigError(f"loss must be a DistillationLoss, got {type(self.loss).__name__}.")
        self.features = features
        self.consistent = bool(consistent)
        self.trainable_module = student if features is None else DistillationStudent(student, features)
        if verbose:
            _logger.info(
                "RememDistillationTask: %s, features=%s, consistent=%s",
                self.loss.extra_repr(),
                None if features is None else f"{features.kind} pairs={features.pairs} weight={features.weight}",
                self.consistent,
            )

    def train(self, mode: bool = True) -> RememDistillationTask:
        super().train(mode)
        self.teacher.eval()
        return self

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs) -> RememDistillationTask:
        """Wrap the trainable module (student + projectors) in DDP; the frozen teacher stays unwrapped."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.teacher.requires_grad_(False)
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = "inductor", mode: str | None = None, **compile_kwargs) -> nn.Module:
        """Compile the student (train and eval paths) and the teacher model."""
        student = self._student_of(self.trainable_module)
        self.eval_model = torch.compile(student, backend=backend, mode=mode, **compile_kwargs)
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        self.teacher.model = torch.compile(self.teacher.model, backend=backend, mode=mode, **compile_kwargs)
        return self.eval_model

    @staticmethod
    def _student_of(module: nn.Module | None) -> nn.Module | None:
        current = module
        while current is not None:
            if isinstance(current, DistillationStudent):
                return current.student
            current = _inner_module(current)
        return module

    def get_eval_model(self, module: nn.Module | None = None, ema: bool = False) -> nn.Module | None:
        resolved = super().get_eval_model(module=module, ema=ema)
        return self._student_of(resolved)

    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
        """Projector weights (feature distillation) kept beside the student's state_dict in checkpoints."""
        module = module if module is not None else self.get_trainable_module(ema=ema)
        features = self._features_of(module)
        if features is None or not len(features.state_dict()):
            return {}
        return {"features": features.state_dict()}

    def load_task_state(
        self,
        state: dict[str, Any] | None,
        strict: bool = True,
        module: nn.Module | None = None,
        ema: bool = False,
    ) -> None:
        if not state or "features" not in state:
            return
        module = module if module is not None else self.get_trainable_module(ema=ema)
        features = self._features_of(module)
        if features is None:
            if strict:
                raise ConfigError("checkpoint has feature-distillation state but this task has no features=...")
            return
        features.load_state_dict(state["features"], strict=strict)

    @staticmethod
    def _features_of(module: nn.Module | None) -> FeatureDistillation | None:
        current = module
        while current is not None:
            if isinstance(current, DistillationStudent):
                return current.features
            current = _inner_module(current)
        return None

    def get_clip_parameters(self, exclude_head: bool = False):
        module = unwrap_model(self.trainable_module)
        if not exclude_head:
            return module.parameters()
        student = self._student_of(module)
        params = list(student.parameters())[:-2]
        if isinstance(module, DistillationStudent):
            params.extend(module.features.parameters())
        return params

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor | None,
        *,
        teacher_input: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        teacher_features: Sequence[torch.Tensor] | None = None,
        indices: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """One distillation step's forward.

        Args:
            input: Student input ``[B, C, H, W]`` (student-normalised, possibly augmented / mixed).
            target: Labels ``[B]``, soft targets ``[B, C]``, or ``None`` when the loss has ``task_weight == 0``.
            teacher_input: The teacher's view when ``consistent=False``.
            teacher_logits: Precomputed teacher logits (e.g. from the first SAM pass); skips the teacher.
            teacher_features: Precomputed teacher block outputs (feature distillation), in pair order.
            indices: Dataset indices of the batch, for the teacher's logit cache.

        Returns:
            ``{"loss", "output", "task_loss", "kd_loss", "teacher_logits"}`` plus ``"feature_loss"`` and
            ``"teacher_features"`` with feature distillation.
        """
        if self.consistent and teacher_input is not None:
            raise ConfigError(
                "consistent=True: the teacher sees the student's own input, so teacher_input must not be passed. "
                "Create the task with consistent=False to give the teacher a different view."
            )
        need_teacher = teacher_logits is None or (self.features is not None and teacher_features is None)
        if not self.consistent and teacher_input is None and need_teacher:
            raise ConfigError(
                "consistent=False needs teacher_input=<the teacher's view of the batch> (or precomputed "
                "teacher_logits); use consistent=True to show the teacher the student's input."
            )
        t_in = input if teacher_input is None else teacher_input
        out: dict[str, Any] = {}
        if self.features is None:
            student_logits = self.trainable_module(input)
            if teacher_logits is None:
                teacher_logits = self.teacher(t_in, indices=indices)
        else:
            student_logits, projected = self.trainable_module(input)
            if teacher_features is None:
                fresh_logits, teacher_features = self.teacher.forward_intermediates(t_in, self.features.teacher_indices)
                if teacher_logits is None:
                    teacher_logits = fresh_logits
            feature_loss = self.features.compare(projected, teacher_features)
            out["feature_loss"] = feature_loss.detach()
            out["teacher_features"] = list(teacher_features)
        total, parts = self.loss(student_logits, teacher_logits, target, return_parts=True)
        if self.features is not None:
            total = total + self.features.weight * feature_loss
        out.update(
            loss=total,
            output=student_logits,
            task_loss=parts["task_loss"],
            kd_loss=parts["kd_loss"],
            teacher_logits=teacher_logits.detach(),
        )
        return out
