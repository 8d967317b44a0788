"""Teacher logits computed once and served by dataset index."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .._validation import check_int
from ..errors import ConfigError

if TYPE_CHECKING:  # annotation only: teacher.py imports this module
    from .teacher import Teacher

__all__ = ["TeacherLogitCache", "precompute_teacher_logits"]


class TeacherLogitCache:
    """Teacher logits stored by dataset sample index, for inputs that are the same every epoch.

    Only valid without random augmentation: with it, this is "fixed teacher" distillation, which Beyer et al. 2022
    found clearly worse than consistent teaching.

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
        self.num_samples = check_int("num_samples", num_samples, low=1, hint="pass the dataset length, len(dataset).")
        self.dtype = dtype
        self._logits: torch.Tensor | None = None
        self._filled = torch.zeros(self.num_samples, dtype=torch.bool)
        self.hits = self.misses = 0
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


def precompute_teacher_logits(
    teacher: Teacher,
    loader: Iterable,
    cache: TeacherLogitCache | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> TeacherLogitCache:
    """Run the teacher once over a deterministic loader and fill a :class:`TeacherLogitCache`.

    Args:
        teacher: The :class:`~timm_remem.distill.Teacher`.
        loader: Batches ``(input, ..., index)`` (student-normalised input, dataset indices); no random augmentation.
        cache: The cache to fill; ``None``: ``teacher.cache``, else a new one of ``len(loader.dataset)`` samples.
        device: Where to run the teacher (default: the device of its parameters).
        progress: Show a tqdm progress bar.

    Returns:
        The filled cache (also set as ``teacher.cache`` when the teacher had none).

    Example:
        >>> import timm, torch
        >>> from timm_remem.distill import Teacher
        >>> vit = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3)
        >>> batches = [(torch.randn(2, 3, 32, 32), torch.zeros(2), torch.tensor([0, 1]))]
        >>> cache = precompute_teacher_logits(Teacher(vit), batches, TeacherLogitCache(2), progress=False)
        >>> cache.complete
        True
    """
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
        cache.put(idx, teacher.logits(x.to(device)))
    return cache
