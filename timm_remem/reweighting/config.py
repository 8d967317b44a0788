"""What ``reweight`` did to a model (:class:`ReweightConfig`), the factor schedules, and the input checks."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._serialization import dataclass_from_dict, dataclass_to_dict
from .._validation import check_choice, check_float
from .._version import __version__
from ..errors import ConfigError

__all__ = ["SCHEDULES", "ReweightConfig", "check_factor", "check_factor_range", "check_model", "schedule_factors"]

#: The named schedules ``reweight`` accepts (besides a sequence of factors or a callable).
SCHEDULES = ("exponential", "constant")

_FACTOR_HINT = "ReMem uses factors in (0, 1], e.g. alpha=0.85."


@dataclass
class ReweightConfig:
    """What ``reweight`` did to a model, as :func:`~timm_remem.get_reweight_config` reports it.

    A report, never an instruction: changing one changes nothing in a model.

    Attributes:
        alpha: The MLP weight (``None`` for a custom schedule).
        schedule: ``"exponential"``, ``"constant"`` or ``"custom"``.
        top_k: Number of reweighted blocks counted from the top (``None``: all).
        learnable: Whether the factors are trainable parameters.
        factors: Factor of each reweighted block, bottom-up (length ``top_k`` or ``num_blocks``).
        num_blocks: Number of blocks with an MLP branch.
        merged: ``True`` once ``merge`` folded the factors into the weights.
        folded: Per-block factors earlier merges had already folded into the weights (bottom-up, length
            ``num_blocks``); empty unless ``reweight(..., compose=True)`` was called on a merged model.
        version: timm-remem version that wrote this config.

    Raises:
        ConfigError: A factor that is not a finite number ``>= 0``, or lengths that disagree (``factors`` with
            ``top_k`` and ``num_blocks``, ``folded`` with ``num_blocks``).

    Example:
        >>> from timm_remem import ReweightConfig
        >>> config = ReweightConfig(alpha=0.8, top_k=2, factors=[0.8, 0.64], num_blocks=6)
        >>> ReweightConfig.from_dict(config.to_dict()) == config
        True
        >>> config.total_factors()
        [1.0, 1.0, 1.0, 1.0, 0.8, 0.64]
    """

    alpha: float | None = 0.85
    schedule: str = "exponential"
    top_k: int | None = None
    learnable: bool = False
    factors: list[float] = field(default_factory=list)
    num_blocks: int = 0
    merged: bool = False
    folded: list[float] = field(default_factory=list)
    version: str = ""

    def __post_init__(self) -> None:
        check_choice("ReweightConfig.schedule", self.schedule, (*SCHEDULES, "custom"))
        if self.alpha is not None:
            check_factor("alpha", self.alpha, allow_zero=False)
        for name in ("factors", "folded"):
            values = getattr(self, name)
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise ConfigError(f"ReweightConfig.{name} must be a list of factors, got {values!r:.60}.")
            for i, f in enumerate(values):
                check_factor(f"{name}[{i}]", f, allow_zero=True)
            setattr(self, name, [float(f) for f in values])
        self._check_lengths()
        if not self.version:
            self.version = __version__

    def _check_lengths(self) -> None:
        n, k = self.num_blocks, self.top_k
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"ReweightConfig.num_blocks must be an int >= 0, got {n!r}.")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"ReweightConfig.top_k must be a positive int or None, got {k!r}.")
        if n and k is not None and k > n:
            raise ConfigError(f"ReweightConfig.top_k={k} is more than num_blocks={n}.")
        if self.factors and n and len(self.factors) != (n if k is None else k):
            raise ConfigError(
                f"ReweightConfig has {len(self.factors)} factors, but top_k={k} and num_blocks={n} say "
                f"{n if k is None else k} blocks are reweighted: the record is inconsistent."
            )
        if self.folded and len(self.folded) != n:
            raise ConfigError(f"ReweightConfig.folded has {len(self.folded)} factors, not one per block "
                              f"(num_blocks={n}): the record is inconsistent.")

    def total_factors(self) -> list[float]:
        """Each block's factor (bottom-up) relative to the weights before any reweighting: ``folded`` times ``factors``.

        Example:
            >>> ReweightConfig(alpha=0.5, top_k=1, factors=[0.5], num_blocks=2, folded=[0.9, 0.8]).total_factors()
            [0.9, 0.4]
        """
        n = self.num_blocks or len(self.factors)
        first = n - len(self.factors)
        folded = self.folded or [1.0] * n
        return [folded[i] * (self.factors[i - first] if i >= first else 1.0) for i in range(n)]

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-ready dict with sorted keys."""
        return dataclass_to_dict(self)

    def to_json(self) -> str:
        """Return the config as sorted, indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReweightConfig:
        """Build a config from a dict, dropping unknown keys with a warning (newer versions may add keys)."""
        return dataclass_from_dict(cls, data)


def check_factor(name: str, value: Any, *, allow_zero: bool) -> None:
    """Check one factor: a finite real number (a one-element tensor counts), ``>= 0`` or ``> 0``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a real number, got {value!r} ({type(value).__name__}).")
    check_float(name, value, low=0, low_open=not allow_zero, hint=_FACTOR_HINT)


def check_factor_range(name: str, value: float, *, allow_amplify: bool, allow_zero: bool) -> None:
    """Check that a finite factor ``>= 0`` is in ReMem's range (0, 1], unless ``allow_amplify`` / ``allow_zero``."""
    value = float(value)
    if value > 1 and not allow_amplify:
        raise ConfigError(
            f"{name}={value:g} is > 1: it would amplify the MLP branch, while ReMem scales branches down with "
            "factors in (0, 1] (e.g. alpha=0.85). Pass allow_amplify=True to reweight if amplifying is intended."
        )
    if value == 0 and not allow_zero:
        raise ConfigError(
            f"{name}=0 switches that MLP branch off, while ReMem scales branches down with factors in (0, 1]. "
            "Pass allow_zero=True to reweight if that is intended (timm_remem.zero_branches measures a switched-off "
            "branch without changing the model)."
        )


def check_model(model: Any) -> None:
    """Check that ``model`` is an ``nn.Module`` (a model name gets a hint to create it first).

    Example:
        >>> check_model("vit_base_patch16_224")
        Traceback (most recent call last):
        ...
        timm_remem.errors.ConfigError: expected a torch.nn.Module (a timm model), got str 'vit_base_patch16_224'. \
Create it first: timm.create_model(name, pretrained=...).
    """
    if not isinstance(model, nn.Module):
        hint = " Create it first: timm.create_model(name, pretrained=...)." if isinstance(model, str) else ""
        raise ConfigError(f"expected a torch.nn.Module (a timm model), got {type(model).__name__} {model!r:.60}.{hint}")


def schedule_factors(
    alpha: float, schedule: str | Sequence[float] | Callable[[int, int], float], k: int
) -> list[float]:
    """The checked factors of ``k`` reweighted blocks, bottom-up (see :func:`~timm_remem.reweight` for ``schedule``).

    Example:
        >>> schedule_factors(0.8, "constant", 2)
        [0.8, 0.8]
        >>> schedule_factors(0.0, lambda i, k: (i + 1) / k, 4)
        [0.25, 0.5, 0.75, 1.0]
    """
    if schedule == "exponential":
        return [float(alpha) ** (i + 1) for i in range(k)]
    if schedule == "constant":
        return [float(alpha)] * k
    if callable(schedule):
        named = {f"schedule({i}, {k})": schedule(i, k) for i in range(k)}
    else:
        values = list(schedule)
        if len(values) != k:
            raise ConfigError(
                f"schedule has {len(values)} factors but {k} blocks are reweighted: give one factor per reweighted "
                f"block, bottom-up (or change top_k to {len(values)})."
            )
        named = {f"schedule[{i}]": v for i, v in enumerate(values)}
    for name, v in named.items():
        check_factor(name, v, allow_zero=True)
    return [float(v) for v in named.values()]
