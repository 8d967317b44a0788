"""Feature distillation over (student block, teacher block) pairs, per Distillation Dynamics (arXiv 2511.06848)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import DistillationTeacher
from timm.utils import unwrap_model

from .._validation import check_float
from ..errors import ConfigError, UnsupportedModelError
from ._checks import check_nchw, check_weight
from ._maps import forward_with_intermediates, match_spatial, standardize_channels
from .functional import spectral_loss

__all__ = ["FeatureDistillation", "DistillationStudent", "FEATURE_KINDS"]

_logger = logging.getLogger("timm_remem.distill")  # the room's logger: the late-pair warning is documented there

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


class _Projector(nn.Module):
    """Per-position Linear ``C_s -> C_t`` followed by BatchNorm2d, applied to an NCHW map."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


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


class FeatureDistillation(nn.Module):
    """The mean feature loss over (student block, teacher block) pairs.

    ``kind="spectral"``: :func:`~timm_remem.distill.spectral_loss` per pair. ``kind="projector"``: a trainable
    per-position ``Linear(C_s, C_t)`` + ``BatchNorm2d(C_t)`` on the student map, MSE to the teacher map standardised
    per channel (the teacher side stays parameter-free: trainable affines on both sides let the loss collapse). The
    teacher map is resized to the student's grid. A pair in the late part of either model logs a warning on logger
    ``timm_remem.distill``.

    Args:
        student: The student timm model.
        teacher: The teacher timm model (or a ``timm.task.DistillationTeacher`` such as
            :class:`~timm_remem.distill.Teacher`).
        pairs: ``(student_index, teacher_index)`` pairs in ``forward_intermediates`` numbering, negative allowed;
            ``None`` means ``[(0, 0)]``.
        kind: ``"spectral"`` or ``"projector"``.
        weight: Weight of the feature loss in the total, applied by :class:`~timm_remem.distill.RememDistillationTask`.
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
        late_fraction = check_float("late_fraction", late_fraction, low=0, high=1, low_open=True)
        self.kind = kind
        self.weight = check_weight("weight", weight)
        student_chs = _num_feature_layers(unwrap_model(student), "student")
        teacher_chs = _num_feature_layers(
            unwrap_model(teacher.model if isinstance(teacher, DistillationTeacher) else teacher), "teacher")
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
                which = " and ".join(name for name, late in (("student block", late_s), ("teacher block", late_t))
                                     if late)
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
            check_nchw("student", feat)
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
                check_nchw("teacher", t)
                t = match_spatial(t.detach().float(), tuple(s.shape[-2:]))
                losses.append(F.mse_loss(s.float(), standardize_channels(t)))
        return torch.stack(losses).mean()

    def forward(
        self, student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Unweighted mean feature loss over the pairs (student features raw, in pair order)."""
        return self.compare(self.project(student_features), teacher_features)


class DistillationStudent(nn.Module):
    """The student plus the feature projectors as one trainable module (what DDP needs).

    ``forward(x)`` returns ``(logits, projected_student_features)`` from one ``forward_intermediates`` pass.

    Example:
        >>> import timm, torch
        >>> vit = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=10)
        >>> logits, projected = DistillationStudent(vit, FeatureDistillation(vit, vit))(torch.randn(2, 3, 32, 32))
        >>> logits.shape, projected[0].ndim
        (torch.Size([2, 10]), 4)
    """

    def __init__(self, student: nn.Module, features: FeatureDistillation):
        super().__init__()
        self.student = student
        self.features = features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits, feats = forward_with_intermediates(self.student, x, self.features.student_indices)
        return logits, self.features.project(feats)
