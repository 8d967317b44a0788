"""Top-down pruning diagnostic (ReMem): zero the top-k MLP branches versus the top-k attention branches of a timm
vision transformer and measure accuracy and :func:`~timm_remem.analysis.information.teacher_information` per k.

Branches are removed by hooks (from :func:`~timm_remem.reweighting.find_branches`) that are taken off afterwards, so
the model is left exactly as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..reweighting import find_branches
from .information import TeacherInformation, teacher_information

__all__ = ["PruningResult", "pruning_diagnostic", "zero_branches"]

_KINDS = ("mlp", "attn")


@dataclass
class PruningResult:
    """Accuracy and information per number of pruned top blocks.

    Attributes:
        num_blocks: ``L``, the number of blocks with branches of every measured kind.
        rows: One entry per (kind, k): ``{"kind", "k", "blocks", "accuracy", "error", "i_xf", "i_fy",
            "i_xf_given_y"}``, ``blocks`` the pruned block indices; ``k = 0`` is measured once, reported per kind.
        infos: The full :class:`TeacherInformation` per row.
    """

    num_blocks: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    infos: list[TeacherInformation] = field(default_factory=list)

    def curve(self, kind: str, key: str = "accuracy") -> list[tuple[int, float | None]]:
        """``[(k, value)]`` for one kind, sorted by ``k`` (``key`` any row field, e.g. ``"i_xf"``)."""
        return sorted((r["k"], r[key]) for r in self.rows if r["kind"] == kind)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dictionary."""
        return {"num_blocks": self.num_blocks, "rows": [dict(r) for r in self.rows]}


def _zero_output(_mod: nn.Module, _args: Any, output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return torch.zeros_like(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (torch.zeros_like(output[0]), *output[1:])
    raise UnsupportedModelError(
        f"cannot zero the output of {type(_mod).__name__}: it returned {type(output).__name__}, not a tensor."
    )


def _zero_columns(columns: tuple[int, int]):
    start, end = columns

    def pre_hook(_mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0].clone()
        x[..., start:end] = 0
        return (x, *args[1:])

    return pre_hook


@contextlib.contextmanager
def zero_branches(branches: Sequence[Any]) -> Iterator[None]:
    """Context manager: zero the residual contribution of the given branches (from ``find_branches``).

    Example:
        >>> import timm, torch, timm_remem
        >>> model = timm.create_model("test_vit", pretrained=False, img_size=32).eval()
        >>> x = torch.randn(1, 3, 32, 32)
        >>> with zero_branches(timm_remem.reweighting.find_branches(model, "mlp")[-2:]):
        ...     pruned = model(x)
        >>> torch.equal(model(x), pruned)  # hooks are gone after the block
        False
    """
    handles = []
    try:
        seen: set[int] = set()
        for b in branches:
            if getattr(b, "columns", None) is not None:
                handles.append(b.module.register_forward_pre_hook(_zero_columns(tuple(b.columns))))
            elif id(b.module) not in seen:
                handles.append(b.module.register_forward_hook(_zero_output))
            seen.add(id(b.module))
        yield
    finally:
        for h in handles:
            h.remove()


def pruning_diagnostic(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    kinds: Sequence[str] = _KINDS,
    ks: Sequence[int] | None = None,
    progress: bool | None = None,
    **kwargs: Any,
) -> PruningResult:
    """Zero the top-k MLP branches versus the top-k attention branches and measure accuracy and MI for each k.

    Args:
        loader: ``(images, labels)`` batches, read once per (kind, k): keep it small and deterministic.
        kinds: Branch kinds to prune, from ``("mlp", "attn")``.
        ks: Numbers of top blocks to prune (default ``0..L``).
        progress: Show progress bars (None: only on an interactive terminal).
        **kwargs: Passed to :func:`~timm_remem.analysis.information.teacher_information` (same noise seed for every k).

    Raises:
        UnsupportedModelError: The model has no MLP (or attention) branches.
        ConfigError: Unknown kind, or k outside ``0..L``.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3)
        >>> data = [(torch.randn(32, 3, 32, 32), torch.randint(0, 3, (32,)))]
        >>> result = pruning_diagnostic(model, data, ks=[0, 2], progress=False)
        >>> [(r["kind"], r["k"]) for r in result.rows]
        [('mlp', 0), ('mlp', 2), ('attn', 0), ('attn', 2)]
    """
    kinds = tuple(kinds) if not isinstance(kinds, str) else (kinds,)
    bad = [k for k in kinds if k not in _KINDS]
    if bad or not kinds:
        raise ConfigError(f"kinds must be a non-empty subset of {_KINDS}, got {kinds!r}.")
    found = {kind: find_branches(model, kind) for kind in kinds}
    levels = {kind: sorted({b.index for b in branches}) for kind, branches in found.items()}
    num_blocks = min(len(v) for v in levels.values())
    ks = list(range(num_blocks + 1)) if ks is None else list(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= num_blocks:
            raise ConfigError(f"each k must be an int in 0..{num_blocks} (the number of blocks), got {k!r}.")
    result = PruningResult(num_blocks=num_blocks)
    base: TeacherInformation | None = None
    for kind in kinds:
        for k in ks:
            top = levels[kind][len(levels[kind]) - k :] if k else []
            if k == 0 and base is not None:
                info = base
            else:
                with zero_branches([b for b in found[kind] if b.index in set(top)]):
                    info = teacher_information(model, loader, progress=progress, **kwargs)
                if k == 0:
                    base = info
            result.infos.append(info)
            result.rows.append({
                "kind": kind,
                "k": k,
                "blocks": list(top),
                "accuracy": info.accuracy,
                "error": info.error,
                "i_xf": info.i_xf,
                "i_fy": info.i_fy,
                "i_xf_given_y": info.i_xf_given_y,
            })
    return result
