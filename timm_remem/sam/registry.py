"""SAM in timm's optimizer factory: ``create_optimizer_v2(model, "samsgd" | "sammomentum" | "samadam" | ...)``.

``register_with_timm()`` adds five names to timm's registry; ``import timm_remem`` (or ``timm_remem.sam``) calls it
once, and calling it again changes nothing. Everything timm's factory does for its own optimizers applies: weight
decay left off norms and biases, ``layer_decay`` groups, ``momentum`` and ``betas`` defaults. SAM's own keywords
(``rho``, ``adaptive``, ``eta``, ``every``, ...) pass through the factory.

======================  ================================================================
name                    SAM around
======================  ================================================================
``sam``, ``samsgd``     ``torch.optim.SGD`` with Nesterov momentum (timm's ``sgd``)
``sammomentum``         ``torch.optim.SGD`` with classical momentum (timm's ``momentum``)
``samadam``             ``torch.optim.Adam``
``samadamw``            ``torch.optim.AdamW``
======================  ================================================================

Example:
    >>> import torch, timm.optim
    >>> from timm_remem.sam import register_with_timm
    >>> register_with_timm()  # already done by the import; idempotent
    >>> opt = timm.optim.create_optimizer_v2(torch.nn.Linear(4, 2), "samadamw", lr=1e-3, rho=0.1)
    >>> type(opt).__name__, type(opt.base_optimizer).__name__
    ('SAM', 'AdamW')
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from timm.optim import OptimInfo, get_optimizer_info

from .optimizer import SAM

try:  # timm has no public way to register an optimizer; its factory reads this registry
    from timm.optim._optim_factory import default_registry
except ImportError:  # pragma: no cover - a timm without the optimizer registry
    default_registry = None

__all__ = ["register_with_timm", "sam_optimizer_infos"]

# The logger of timm's registry, which warns "Optimizer ... already registered, overwriting".
_TIMM_REGISTRY_LOGGER = "timm.optim._optim_factory"


def sam_optimizer_infos() -> list[OptimInfo]:
    """The ``OptimInfo`` entries that ``register_with_timm`` adds to timm's registry.

    Returns:
        One entry per name: ``sam``, ``samsgd``, ``sammomentum``, ``samadam``, ``samadamw``.

    Example:
        >>> [info.name for info in sam_optimizer_infos()]
        ['sam', 'samsgd', 'sammomentum', 'samadam', 'samadamw']
    """
    sgd = {"base_optimizer": torch.optim.SGD, "nesterov": True}
    return [
        OptimInfo(
            name="sam",
            opt_class=SAM,
            description="SAM (timm_remem) around SGD with Nesterov momentum; rho=, adaptive= pass through",
            has_eps=False,
            has_momentum=True,
            defaults=sgd,
        ),
        OptimInfo(
            name="samsgd",
            opt_class=SAM,
            description="SAM (timm_remem) around SGD with Nesterov momentum (same as 'sam')",
            has_eps=False,
            has_momentum=True,
            defaults=dict(sgd),
        ),
        OptimInfo(
            name="sammomentum",
            opt_class=SAM,
            description="SAM (timm_remem) around SGD with classical (non-Nesterov) momentum",
            has_eps=False,
            has_momentum=True,
            defaults={"base_optimizer": torch.optim.SGD, "nesterov": False},
        ),
        OptimInfo(
            name="samadam",
            opt_class=SAM,
            description="SAM (timm_remem) around torch.optim.Adam",
            has_betas=True,
            defaults={"base_optimizer": torch.optim.Adam},
        ),
        OptimInfo(
            name="samadamw",
            opt_class=SAM,
            description="SAM (timm_remem) around torch.optim.AdamW",
            has_betas=True,
            defaults={"base_optimizer": torch.optim.AdamW},
        ),
    ]


class _DropOverwriteWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "already registered" not in record.getMessage()


def _is_ours(opt_class: Any) -> bool:
    """Our SAM, also a stale copy of it left by ``importlib.reload`` of the optimizer module."""
    return opt_class is SAM or (
        getattr(opt_class, "__module__", None) == SAM.__module__ and getattr(opt_class, "__qualname__", None) == "SAM"
    )


def register_with_timm() -> None:
    """Register SAM in timm's optimizer factory; safe to run more than once.

    A name timm already gives to another optimizer is left to it, with a warning. A name that holds a stale copy of
    this SAM (after ``importlib.reload``) is pointed at the current class.

    Example:
        >>> import timm.optim
        >>> register_with_timm()
        >>> {"sam", "samsgd", "sammomentum", "samadam", "samadamw"} <= set(timm.optim.list_optimizers())
        True
    """
    if default_registry is None:  # pragma: no cover - a timm without the optimizer registry
        return
    timm_logger = logging.getLogger(_TIMM_REGISTRY_LOGGER)
    quiet = _DropOverwriteWarning()
    for info in sam_optimizer_infos():
        try:
            existing = get_optimizer_info(info.name)
        except ValueError:
            existing = None
        if existing is not None:
            if existing.opt_class is SAM:
                continue
            if not _is_ours(existing.opt_class):
                warnings.warn(
                    f"timm already has an optimizer named {info.name!r} ({existing.opt_class!r}); timm_remem leaves "
                    f"it in place. Create timm_remem's with timm_remem.SAM(...) directly.",
                    stacklevel=2,
                )
                continue
        timm_logger.addFilter(quiet)
        try:
            default_registry.register(info)
        finally:
            timm_logger.removeFilter(quiet)
