"""The frozen distillation teacher (:class:`Teacher`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import DistillationTeacher
from timm.utils import unwrap_model

from .._models import data_config, fixed_img_size
from .._validation import check_class_count
from ..errors import ConfigError
from ._checks import CLASS_COUNT_TEMPLATE
from ._maps import forward_with_intermediates
from .cache import TeacherLogitCache

__all__ = ["Teacher"]


def _clone_tree(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (list, tuple)):
        return type(out)(_clone_tree(o) for o in out)
    return out


class Teacher(DistillationTeacher):
    """A frozen ``timm.task.DistillationTeacher``: always eval (every forward re-asserts it), no gradients, a
    ``num_classes`` mismatch with the student refused, logits optionally served from a cache.

    :meth:`forward` and :meth:`logits` take the *student's* input: it is re-normalised to the teacher's mean/std
    (``timm.data.resolve_model_data_config`` of each model unless given) and resized to the teacher's fixed input
    size, if any. So do not call :meth:`normalize_input` first, as timm's ``LogitDistillationTask`` does.

    Args:
        model: The teacher (a timm model, or a ``timm.task.DistillationTeacher`` whose ``.model`` is used).
        student: The student, to read its mean/std and ``num_classes`` from (optional).
        mean, std, student_mean, student_std: Override the normalisation of the models' data configs.
        input_size: ``(H, W)`` the teacher must see; ``None`` detects a fixed size from the model.
        interpolation: ``"bicubic"`` or ``"bilinear"``; ``None`` uses the teacher's data config.
        cache: Optional :class:`~timm_remem.distill.TeacherLogitCache` used when :meth:`forward` gets ``indices``.
        use_inference_mode: Run under ``torch.inference_mode`` (outputs cloned) instead of ``torch.no_grad``.

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
        if isinstance(model, DistillationTeacher):  # a Teacher too
            model = model.model
        if not isinstance(model, nn.Module):
            raise ConfigError(f"teacher must be an nn.Module, got {type(model).__name__}; create it with timm first.")
        super().__init__(model)  # self.model in eval mode, and the mean_kd / std_kd buffers (set below)
        self.model.requires_grad_(False)
        inner = unwrap_model(model)

        if student is not None:
            t_classes = getattr(inner, "num_classes", None)
            check_class_count(
                t_classes, getattr(unwrap_model(student), "num_classes", None), template=CLASS_COUNT_TEMPLATE,
                fix="distillation needs one label space. Fine-tune the teacher on the student's classes (or create "
                f"the student with num_classes={t_classes}); the teacher's head is never re-initialised silently.",
            )

        t_cfg = data_config(inner)
        s_cfg = data_config(student) if student is not None else t_cfg
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
        self.mean_kd = torch.tensor(t_mean).view(shape)  # the parent's buffers, from the resolved data config
        self.std_kd = torch.tensor(t_std).view(shape)
        self.register_buffer("student_mean", torch.tensor(s_mean).view(shape), persistent=False)
        self.register_buffer("student_std", torch.tensor(s_std).view(shape), persistent=False)

        if input_size is not None:
            if len(input_size) != 2 or any(int(v) <= 0 for v in input_size):
                raise ConfigError(f"input_size must be (H, W) with positive ints, got {input_size!r}.")
            input_size = (int(input_size[0]), int(input_size[1]))
        self.input_size: tuple[int, int] | None = input_size if input_size is not None else fixed_img_size(inner)
        interpolation = interpolation or t_cfg.get("interpolation", "bicubic")
        self.interpolation = "bicubic" if interpolation == "bicubic" else "bilinear"
        self.cache = cache
        self.use_inference_mode = bool(use_inference_mode)

    @property
    def mean(self) -> torch.Tensor:
        """Teacher normalisation mean ``[1, C, 1, 1]`` (timm's ``mean_kd``)."""
        return self.mean_kd

    @property
    def std(self) -> torch.Tensor:
        """Teacher normalisation std ``[1, C, 1, 1]`` (timm's ``std_kd``)."""
        return self.std_kd

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
            if x.shape[1] != self.mean_kd.shape[1]:
                raise ConfigError(
                    f"input has {x.shape[1]} channels but the normalisation has {self.mean_kd.shape[1]}; check "
                    "in_chans."
                )
            x = self.normalize_input(x, self.student_mean, self.student_std)
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            shrink = x.shape[-2] > self.input_size[0] or x.shape[-1] > self.input_size[1]
            x = F.interpolate(x, size=self.input_size, mode=self.interpolation, align_corners=False, antialias=shrink)
        param = next(self.model.parameters(), None)
        if param is not None and param.is_floating_point() and x.dtype != param.dtype:
            x = x.to(param.dtype)
        return x

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.model.eval()  # re-assert on every call: someone may have called .train() on the inner model
        if self.use_inference_mode:
            with torch.inference_mode():
                out = fn(*args)
            return _clone_tree(out)
        with torch.no_grad():
            return fn(*args)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits for a student-normalised batch ``x``, always computed (the cache is not used).

        Example:
            >>> import timm, torch
            >>> teacher = Teacher(timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=4))
            >>> teacher.logits(torch.randn(3, 3, 32, 32)).requires_grad
            False
        """
        return self._run(lambda inp: self.model(self.prepare_input(inp)), x)

    def forward(self, x: torch.Tensor, indices: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Teacher logits (no gradient) for a student-normalised batch; with a cache and the samples' dataset
        ``indices``, cached logits are returned without running the teacher, and fresh ones are stored."""
        if indices is not None and self.cache is not None:
            cached = self.cache.get(indices)
            if cached is not None:
                return cached.to(x.device)
        logits = self.logits(x)
        if indices is not None and self.cache is not None:
            self.cache.put(indices, logits)
        return logits

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Teacher logits and NCHW block outputs at ``indices`` (non-negative) from one pass."""
        return self._run(lambda inp: forward_with_intermediates(self.model, self.prepare_input(inp), indices), x)
