"""``SAMStats``: the diagnostics of the latest SAM step, as plain Python numbers."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SAMStats"]


@dataclass
class SAMStats:
    """Diagnostics of the latest SAM step (``SAM.stats``).

    Attributes:
        step: Index of the step (0 for the first ``second_step`` / ``step`` call).
        sam_step: True when the weights were perturbed and a second pass ran (False on the plain steps of
            ``every > 1`` and on skipped steps).
        skipped: True when a non-finite gradient skipped the step (weights and base state untouched).
        grad_norm: ``||g||`` at ``w`` over all groups (``T g`` for adaptive groups); None on plain steps.
        perturbation_norm: ``||e||`` over all groups (rho for one non-adaptive group); None when not perturbed.
        final_grad_norm: Norm of the gradient handed to the base optimizer, before clipping.
        loss: Loss at ``w`` (closure path only).
        perturbed_loss: Loss at ``w + e`` (closure path only).
        loss_increase: ``perturbed_loss - loss`` (closure path only), a cheap sharpness estimate.

    Example:
        >>> stats = SAMStats(step=3, sam_step=True, loss=0.9, perturbed_loss=1.1)
        >>> stats.skipped, stats.grad_norm
        (False, None)
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
