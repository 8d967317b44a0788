"""Sharpness-Aware Minimization (SAM, ASAM) as ``torch.optim.Optimizer`` classes for real training loops.

``SAM`` is the exact, two-pass algorithm for loops you write (``step(closure)`` or the two-step API);
``OnePassSAM`` (Momentum-SAM) costs one pass and serves loops that only call ``step()`` (timm's ``train.py``,
HF's Trainer), under timm's optimizer names ``sam``, ``samsgd``, ``sammomentum``, ``samadam`` and ``samadamw``.
``create_sam`` builds either around any timm optimizer. See docs/sam.md.

Example:
    >>> import torch
    >>> from timm_remem.sam import SAM
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
    >>> def closure():
    ...     loss = torch.nn.functional.mse_loss(model(x), y)
    ...     loss.backward()
    ...     return loss
    >>> loss = opt.step(closure)
    >>> opt.stats.sam_step
    True
"""

from __future__ import annotations

from .onepass import OnePassSAM, OnePassStats
from .optimizer import SAM
from .registry import OnePassSAMAdam, OnePassSAMAdamW, OnePassSAMSGD, create_sam, register_with_timm
from .schedule import RHO_SCHEDULES, RhoScheduler
from .stats import SAMStats

__all__ = ["SAM", "SAMStats", "OnePassSAM", "OnePassStats", "OnePassSAMSGD", "OnePassSAMAdam", "OnePassSAMAdamW",
           "create_sam", "RhoScheduler", "RHO_SCHEDULES", "register_with_timm"]
