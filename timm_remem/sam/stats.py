"""``SAMStats``: the diagnostics of the latest SAM step, as plain Python numbers.

Example:
    >>> from timm_remem.sam import SAMStats
    >>> stats = SAMStats(step=3, sam_step=True, loss=0.9, perturbed_loss=1.1)
    >>> stats.skipped, stats.grad_norm
    (False, None)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SAMStats"]


@dataclass
class SAMStats:
    """Diagnostics of the latest SAM step (``SAM.stats``), all plain Python numbers.

    Attributes:
        step: Index of the step (0 for the first ``second_step`` / ``step`` call).
        sam_step: True when the weights were perturbed and a second pass ran (False on the plain steps of
            ``every > 1`` and on skipped steps).
        skipped: True when the step was skipped because a gradient was not finite (the weights and the base
            optimizer's state are exactly as before the step).
        grad_norm: Global norm used to normalise the perturbation: ``||g||`` at ``w`` over all groups, with
            ``T g`` in place of ``g`` for adaptive groups. None on plain steps.
        perturbation_norm: ``||e||`` over all groups (equals rho for one non-adaptive group). None when not perturbed.
        final_grad_norm: Norm of the gradient handed to the base optimizer, before clipping.
        loss: Loss at ``w`` (closure path only).
        perturbed_loss: Loss at ``w + e`` (closure path only).
        loss_increase: ``perturbed_loss - loss`` (closure path only), a cheap sharpness estimate.

    Example:
        >>> import torch
        >>> from timm_remem.sam import SAM
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = SAM(model.parameters(), rho=0.1, lr=0.1)
        >>> x = torch.randn(4, 3)
        >>> def closure():
        ...     loss = model(x).pow(2).mean()
        ...     loss.backward()
        ...     return loss
        >>> _ = opt.step(closure)
        >>> round(opt.stats.perturbation_norm, 6), opt.stats.loss_increase is not None
        (0.1, True)
    """

    step: int = 0
    sam_step: bool = False
    skipped: bool = False
    grad_norm: float | None = None
    perturbation_norm: float | None = None
    final_grad_norm: float | None = None
    loss: float | None = None
    perturbed_loss: float | None = None
    loss_increase: float | None = None
