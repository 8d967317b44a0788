"""Sharpness-Aware Minimization (SAM, ASAM) as a ``torch.optim.Optimizer`` that works in real training loops.

SAM (Foret et al., 2021) minimises the loss at the worst point of a small ball around the weights: it computes the
gradient ``g`` at ``w``, moves to ``w + e`` with ``e = rho * g / ||g||``, computes the gradient there, moves back
to ``w`` and lets a base optimizer (SGD, AdamW, ...) apply that second gradient. ASAM (Kwon et al., 2021) makes
the ball scale-invariant: ``e = rho * T^2 g / ||T g||`` with ``T = |w| + eta`` element-wise.

Two optimizers, for two kinds of training loop:

- ``SAM`` (exact, two forward/backward passes per step) for loops you write: ``step(closure)`` or the two-step API.
  It keeps the base optimizer's state in its checkpoints, supports ``torch.amp.GradScaler``, updates BatchNorm
  statistics once per step, replays dropout masks in the perturbed pass, runs the first pass under DDP's
  ``no_sync``, restores the weights in place and allocates its buffers once.
- ``OnePassSAM`` (Momentum-SAM, one pass, the base optimizer's cost) for loops that only call ``step()``: timm's
  ``train.py``, HF's Trainer. ``import timm_remem`` registers it in timm's optimizer factory as ``sam``,
  ``samsgd``, ``sammomentum``, ``samadam`` and ``samadamw`` (``register_with_timm``); ``create_sam`` builds either
  around any timm optimizer.

The files:

- ``optimizer.py``: ``SAM``, the algorithm (perturb, restore, base step, state dict).
- ``onepass.py``: ``OnePassSAM``; ``_attach.py``: the hooks through which it sees the training loop.
- ``passes.py``: the pass machinery (RNG capture and replay, frozen BatchNorm statistics, DDP ``no_sync``).
- ``registry.py``: ``register_with_timm``, the names in timm's optimizer factory, ``create_sam``.
- ``schedule.py``: ``RhoScheduler``, SAM's radius on a timm schedule shape (cosine, step, warm-up, ...).
- ``stats.py``: ``SAMStats``, the diagnostics of the latest step.

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
