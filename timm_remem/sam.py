"""Sharpness-Aware Minimization (SAM, ASAM) as a ``torch.optim.Optimizer`` that works in real training loops.

SAM (Foret et al., 2021) minimises the loss at the worst point of a small ball around the weights: it computes the
gradient ``g`` at ``w``, moves to ``w + e`` with ``e = rho * g / ||g||``, computes the gradient there, moves back
to ``w`` and lets a base optimizer (SGD, AdamW, ...) apply that second gradient. ASAM (Kwon et al., 2021) makes
the ball scale-invariant: ``e = rho * T^2 g / ||T g||`` with ``T = |w| + eta`` element-wise.

This implementation keeps the base optimizer's state in its checkpoints, supports ``torch.amp.GradScaler``,
updates BatchNorm statistics once per step, replays dropout masks in the perturbed pass, runs the first pass under
DDP's ``no_sync``, restores the weights in place and allocates its buffers once. Importing the module registers
``sam``, ``samsgd``, ``sammomentum``, ``samadam`` and ``samadamw`` in timm's optimizer factory.

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

import contextlib
import logging
import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .errors import ConfigError, RememError

__all__ = ["SAM", "SAMStats"]

# Added to the gradient norm before dividing (as in the SAM and ASAM reference code).
_PERTURB_EPS = 1e-12
# Added to the gradient norm when clipping (as in torch.nn.utils.clip_grad_norm_).
_CLIP_EPS = 1e-6
# Keywords of SAM itself that arrive through ``**base_kwargs`` and are never passed to the base optimizer.
_SAM_KWARGS = ("eta", "every", "sync_perturbation", "replay_rng", "freeze_bn")

_IDLE, _PERTURBED, _PLAIN, _SKIP = "idle", "perturbed", "plain", "skip"

_USAGE = """SAM needs two forward/backward passes per step. Use it in one of two ways:

  1. closure (SAM runs it twice; the closure zeroes nothing):
         def closure():
             loss = criterion(model(x), y)
             loss.backward()
             return loss
         loss = opt.step(closure)

  2. two steps:
         criterion(model(x), y).backward()
         if opt.first_step(zero_grad=True):
             with opt.second_pass(model):
                 criterion(model(x), y).backward()
         opt.second_step(zero_grad=True)"""


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


class _SecondStepCall:
    """Internal request routed through ``SAM.step`` so LR schedulers and step hooks see exactly one step."""

    __slots__ = ("zero_grad", "scaler", "max_grad_norm")

    def __init__(self, zero_grad: bool, scaler: Any, max_grad_norm: float | None) -> None:
        self.zero_grad = zero_grad
        self.scaler = scaler
        self.max_grad_norm = max_grad_norm


def _check_rho(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where} rho must be a finite number >= 0 (typical: 0.05 to 0.5), got {value!r}.")
    return float(value)


def _check_eta(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where} eta must be a finite number >= 0 (ASAM uses 0.01), got {value!r}.")
    return float(value)


def _check_flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}.")
    return value


def _check_every(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"every must be an integer >= 1 (1 = SAM on every step), got {value!r}.")
    return value


def _check_max_grad_norm(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"max_grad_norm must be a finite number > 0 or None, got {value!r}.")
    return float(value)


def _sq_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of all elements (0-dim, fp32 or wider, on the first tensor's device), one read pass."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    device = norms[0].device
    return torch.stack([n.to(device) for n in norms]).square().sum()


def _dot_sum(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Sum over tensors of the inner products <a_i, b_i> (0-dim, fp32 or wider), one read pass over each list."""
    terms = []
    device = a[0].device
    for x, y in zip(a, b, strict=True):
        if x.dtype in (torch.float16, torch.bfloat16):
            x, y = x.float(), y.float()
        terms.append(torch.dot(x.reshape(-1), y.reshape(-1)).to(device))
    return torch.stack(terms).sum()


def _to_floats(tensors: list[torch.Tensor]) -> list[float]:
    """Move a list of 0-dim tensors to the host with a single synchronisation."""
    if not tensors:
        return []
    device = tensors[0].device
    return torch.stack([t.to(device) for t in tensors]).tolist()


def _capture_rng() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return torch.get_rng_state(), cuda


def _restore_rng(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _has_running_stats(module: nn.Module) -> bool:
    """BatchNorm-like modules whose buffers change in a training-mode forward."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.track_running_stats
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return module.track_running_stats
    return isinstance(getattr(module, "running_mean", None), torch.Tensor) or isinstance(
        getattr(module, "running_var", None), torch.Tensor
    )


def _ddp_class() -> type | None:
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover - builds without torch.distributed
        return None
    return DistributedDataParallel


@contextlib.contextmanager
def _global_forward_pre_hook(fn: Callable[[nn.Module, Any], None]) -> Iterator[None]:
    handle = nn.modules.module.register_module_forward_pre_hook(fn)
    try:
        yield
    finally:
        handle.remove()


class SAM(Optimizer):
    """Sharpness-Aware Minimization around any base optimizer, with AMP, DDP, BatchNorm and dropout handled.

    The base optimizer is built on SAM's own ``param_groups`` (the very same dicts), so an LR scheduler attached
    to SAM drives it, and ``state_dict()`` is the base optimizer's state dict plus SAM's settings.

    Args:
        params: Parameters or parameter groups. A group may set its own ``rho``, ``adaptive`` and ``eta``.
        base_optimizer: Optimizer class (or factory) applying the update, e.g. ``torch.optim.AdamW``.
        rho: Radius of the neighbourhood. A group field, so a scheduler can drive it (``group["rho"]``).
        adaptive: ASAM: perturb by ``rho * T^2 g / ||T g||`` with ``T = |w| + eta``. Needs a larger rho. Uses one
            more buffer the size of the adaptive groups' parameters.
        **base_kwargs: Passed to the base optimizer (``lr``, ``momentum``, ``weight_decay``, ...), except these
            SAM keywords: ``eta`` (float, 0.01: ASAM's offset in ``T``, a group field), ``every`` (int, 1: SAM on
            every k-th step, plain base steps in between), ``sync_perturbation`` (bool, False: under DDP, all-reduce
            the first-pass gradient so every replica uses the same perturbation), ``replay_rng`` (bool, True:
            the perturbed pass sees the same dropout / drop-path masks), ``freeze_bn`` (bool, True: BatchNorm
            statistics are updated by the first pass only).

    Attributes:
        base_optimizer: The base optimizer instance.
        stats: ``SAMStats`` of the latest step.
        skipped_steps: Number of steps skipped because a gradient was not finite.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3, weight_decay=0.05)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        >>> torch.nn.functional.cross_entropy(model(x), y).backward()
        >>> if opt.first_step(zero_grad=True):
        ...     with opt.second_pass(model):
        ...         torch.nn.functional.cross_entropy(model(x), y).backward()
        >>> opt.second_step(zero_grad=True)
        >>> round(opt.stats.perturbation_norm, 6)
        0.05
    """

    # GradScaler.step() hands optimizers with this flag ``grad_scale`` / ``found_inf`` attributes before calling
    # their step(); that is how SAM recognises ``scaler.step(sam, closure)`` and refuses it.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(base_optimizer, Optimizer):
            raise ConfigError(
                f"base_optimizer must be an optimizer class such as torch.optim.AdamW, got an instance of "
                f"{type(base_optimizer).__name__}. Pass the class and its arguments: "
                f"SAM(params, torch.optim.AdamW, rho=0.05, lr=1e-3)."
            )
        if not callable(base_optimizer):
            raise ConfigError(f"base_optimizer must be an optimizer class, got {base_optimizer!r}.")
        eta = _check_eta(base_kwargs.pop("eta", 0.01), "SAM")
        self.every = _check_every(base_kwargs.pop("every", 1))
        self.sync_perturbation = _check_flag(base_kwargs.pop("sync_perturbation", False), "sync_perturbation")
        self.replay_rng = _check_flag(base_kwargs.pop("replay_rng", True), "replay_rng")
        self.freeze_bn = _check_flag(base_kwargs.pop("freeze_bn", True), "freeze_bn")
        self._sam_defaults = {
            "rho": _check_rho(rho, "SAM"),
            "adaptive": _check_flag(adaptive, "adaptive"),
            "eta": eta,
        }
        self.base_optimizer: Optimizer | None = None
        super().__init__(params, dict(self._sam_defaults))
        try:
            base = base_optimizer(self.param_groups, **base_kwargs)
        except TypeError as error:
            if "unexpected keyword" not in str(error):
                raise
            raise ConfigError(
                f"SAM: {getattr(base_optimizer, '__name__', base_optimizer)} rejected a keyword ({error}). SAM's own "
                "keywords are rho, adaptive, eta, every, sync_perturbation, replay_rng, freeze_bn; every other "
                "keyword goes to the base optimizer: check its spelling against the base optimizer's arguments."
            ) from None
        if not isinstance(base, Optimizer):
            raise ConfigError(
                f"base_optimizer must build a torch.optim.Optimizer, {base_optimizer!r} returned {type(base).__name__}."
            )
        self.base_optimizer = base
        # Share everything with the base optimizer: the group dicts (LR schedulers, rho schedules) and the state.
        self.param_groups = base.param_groups
        self.state = base.state
        self.defaults = {**base.defaults, **self._sam_defaults}

        self.stats = SAMStats()
        self.skipped_steps = 0
        self._step_index = 0
        self._phase = _IDLE
        self._scaler: Any = None
        self._pending: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self._pert_sq = 0.0
        self._pert_sq_tensors: list[torch.Tensor] = []
        self._saved: dict[torch.Tensor, torch.Tensor] = {}
        self._scratch: dict[torch.Tensor, torch.Tensor] = {}
        self._bn_saved: weakref.WeakKeyDictionary[nn.Module, list[torch.Tensor]] = weakref.WeakKeyDictionary()
        self._rng_state: tuple[torch.Tensor, list[torch.Tensor] | None] | None = None

    _TRANSIENT = ("_saved", "_scratch", "_bn_saved", "_pending", "_pert_sq_tensors", "_rng_state", "_scaler")

    def __getstate__(self) -> dict[str, Any]:
        # Unlike Optimizer.__getstate__, keep SAM's attributes (base optimizer, settings, counters) so that
        # copy.deepcopy and pickling give a working optimizer; drop the per-step buffers.
        state = {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}
        state["_phase"] = _IDLE
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._saved = {}
        self._scratch = {}
        self._bn_saved = weakref.WeakKeyDictionary()
        self._pending = []
        self._pert_sq_tensors = []
        self._rng_state = None
        self._scaler = None

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to SAM and to the base optimizer (they share it).

        Args:
            param_group: The group; may set ``rho``, ``adaptive`` and ``eta`` besides the base optimizer's keys.
        """
        if not isinstance(param_group, dict):
            raise ConfigError(f"param_group must be a dict with a 'params' key, got {type(param_group).__name__}.")
        where = "param group"
        if "rho" in param_group:
            param_group["rho"] = _check_rho(param_group["rho"], where)
        if "eta" in param_group:
            param_group["eta"] = _check_eta(param_group["eta"], where)
        if "adaptive" in param_group:
            _check_flag(param_group["adaptive"], "param group adaptive")
        if self.base_optimizer is None:  # during Optimizer.__init__
            super().add_param_group(param_group)
            return
        for key, value in self._sam_defaults.items():
            param_group.setdefault(key, value)
        self.base_optimizer.add_param_group(param_group)

    @property
    def is_sam_step(self) -> bool:
        """Whether the coming step perturbs the weights (False on the plain steps in between when ``every > 1``)."""
        return self._step_index % self.every == 0

    def _collect(self) -> list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]]:
        out = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise ConfigError("SAM does not support sparse gradients; use dense embeddings (sparse=False).")
            out.append((group, params, grads))
        return out

    @staticmethod
    def _buffers(cache: dict[torch.Tensor, torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-parameter buffers allocated on first use and reused on every later step."""
        out = []
        for p in params:
            buf = cache.get(p)
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                buf = torch.empty_like(p, memory_format=torch.preserve_format)
                cache[p] = buf
            out.append(buf)
        return out

    def _resolve_scaler(self, scaler: Any) -> Any:
        if scaler is None:
            return None
        if not isinstance(scaler, torch.amp.GradScaler):
            raise ConfigError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}.")
        return scaler if scaler.is_enabled() else None

    def _refuse_grad_scaler_step(self) -> None:
        if "found_inf" in self.__dict__ or "grad_scale" in self.__dict__:
            self.__dict__.pop("found_inf", None)
            self.__dict__.pop("grad_scale", None)
            raise ConfigError(
                "GradScaler.step(sam, ...) cannot drive SAM: the closure's gradients would reach the base optimizer "
                "still multiplied by the loss scale. Give the scaler to SAM instead and do not call "
                "scaler.step() or scaler.update() yourself:\n"
                "  loss = opt.step(closure, scaler=scaler)   # closure calls scaler.scale(loss).backward()\n"
                "or\n"
                "  scaler.scale(loss).backward(); opt.first_step(zero_grad=True, scaler=scaler)\n"
                "  scaler.scale(loss2).backward(); opt.second_step(zero_grad=True, scaler=scaler)"
            )

    # ------------------------------------------------------------------ passes
    @contextlib.contextmanager
    def first_pass(self, model: nn.Module | None = None) -> Iterator[None]:
        """Context for the first forward/backward of a step (optional in the two-step usage).

        Records the RNG state so that ``second_pass`` can replay the dropout / drop-path masks, and, on SAM steps
        under DDP, skips the gradient all-reduce (``no_sync``) so each replica perturbs by its own gradient, as in
        the SAM paper (unless ``sync_perturbation=True``). Plain steps (``every > 1``) keep the all-reduce.

        Args:
            model: The (DDP-wrapped) model. When None, DDP modules are found through a temporary global forward
                pre-hook; pass the model explicitly with ``torch.compile`` or FSDP (its ``no_sync`` is used).

        Example:
            >>> import torch
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
            >>> opt = SAM(model.parameters(), lr=0.1)
            >>> x = torch.randn(2, 4)
            >>> with opt.first_pass(model):
            ...     model(x).sum().backward()
            >>> if opt.first_step(zero_grad=True):
            ...     with opt.second_pass(model):
            ...         model(x).sum().backward()
            >>> opt.second_step(zero_grad=True)
        """
        self._rng_state = _capture_rng() if self.replay_rng else None
        if not self.is_sam_step or self.sync_perturbation:
            yield
            return
        with self._no_sync(model):
            yield

    @contextlib.contextmanager
    def second_pass(self, model: nn.Module | None = None) -> Iterator[None]:
        """Context for the perturbed forward/backward: replays the RNG and keeps BatchNorm statistics unchanged.

        The running statistics and ``num_batches_tracked`` of every BatchNorm-like module that runs in training
        mode inside the context are restored exactly on exit, so they advance once per SAM step. The RNG state
        recorded by ``first_pass`` (if it was used) is restored on entry, so dropout and drop-path draw the same
        masks as in the first pass.

        Args:
            model: The model. When None, BatchNorm modules are found through a temporary global forward pre-hook;
                pass the model explicitly with ``torch.compile``.

        Example:
            >>> import torch
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
            >>> opt = SAM(model.parameters(), lr=0.1)
            >>> x = torch.randn(8, 4)
            >>> model(x).pow(2).mean().backward()
            >>> if opt.first_step(zero_grad=True):
            ...     with opt.second_pass(model):
            ...         model(x).pow(2).mean().backward()
            >>> opt.second_step(zero_grad=True)
            >>> int(model[1].num_batches_tracked)
            1
        """
        if self._rng_state is not None:
            _restore_rng(self._rng_state)
            self._rng_state = None
        if not self.freeze_bn:
            yield
            return
        with self._frozen_running_stats(model):
            yield

    @contextlib.contextmanager
    def _no_sync(self, model: nn.Module | None) -> Iterator[None]:
        if model is not None:
            no_sync = getattr(model, "no_sync", None)
            if callable(no_sync):
                with no_sync():
                    yield
                return
        ddp_cls = _ddp_class()
        if ddp_cls is None:
            yield
            return
        switched: list[nn.Module] = []

        def _switch(module: nn.Module) -> None:
            if module.require_backward_grad_sync:
                module.require_backward_grad_sync = False
                switched.append(module)

        try:
            if model is not None:
                for module in model.modules():
                    if isinstance(module, ddp_cls):
                        _switch(module)
                yield
            else:

                def hook(module: nn.Module, args: Any) -> None:
                    if isinstance(module, ddp_cls):
                        _switch(module)

                with _global_forward_pre_hook(hook):
                    yield
        finally:
            for module in switched:
                module.require_backward_grad_sync = True

    def _save_running_stats(self, module: nn.Module, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        buffers = list(module.buffers(recurse=False))
        copies = self._bn_saved.get(module)
        if copies is None or len(copies) != len(buffers) or any(
            (c.shape, c.dtype, c.device) != (b.shape, b.dtype, b.device) for c, b in zip(copies, buffers, strict=True)
        ):
            copies = [torch.empty_like(b) for b in buffers]
            self._bn_saved[module] = copies
        for buf, copy in zip(buffers, copies, strict=True):
            copy.copy_(buf)
            saved.append((buf, copy))

    @contextlib.contextmanager
    def _frozen_running_stats(self, model: nn.Module | None) -> Iterator[None]:
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        seen: set[int] = set()

        def visit(module: nn.Module) -> None:
            if id(module) in seen or not module.training or not _has_running_stats(module):
                return
            seen.add(id(module))
            self._save_running_stats(module, saved)

        try:
            with torch.no_grad():
                if model is not None:
                    for module in model.modules():
                        visit(module)
            if model is not None:
                yield
            else:
                with _global_forward_pre_hook(lambda module, args: visit(module)):
                    yield
        finally:
            with torch.no_grad():
                for buf, copy in saved:
                    buf.copy_(copy)

    # ------------------------------------------------------------------ steps
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, scaler: torch.amp.GradScaler | None = None) -> bool:
        """Move the weights to ``w + e`` using the gradients of the first pass.

        The weights are saved into buffers allocated once; nothing parameter-sized is allocated per step. With a
        ``scaler``, the gradients are unscaled first (through ``scaler.unscale_``). When the gradient norm is not
        finite, nothing is touched and the step will be skipped.

        Args:
            zero_grad: Zero the gradients (``set_to_none``) after perturbing, ready for the second pass.
            scaler: The ``torch.amp.GradScaler`` that scaled the first-pass loss; give the same to ``second_step``.

        Returns:
            True when the weights were perturbed and a second forward/backward pass is needed. False on a plain
            step (``every > 1``) or when the step will be skipped: call ``second_step`` right away then.

        Example:
            >>> import torch
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = SAM(model.parameters(), rho=0.1, lr=0.1)
            >>> model(torch.ones(2, 3)).sum().backward()
            >>> opt.first_step(zero_grad=True)
            True
            >>> model(torch.ones(2, 3)).sum().backward()
            >>> opt.second_step(zero_grad=True)
        """
        if self._phase != _IDLE:
            raise RememError(
                "first_step() was called twice without second_step() in between; call second_step() after the "
                "second backward pass to restore the weights and apply the update."
            )
        scaler = self._resolve_scaler(scaler)
        for group in self.param_groups:  # a scheduler may have written these
            _check_rho(group["rho"], "param group")
        groups = self._collect()
        if not groups:
            raise RememError(
                "first_step() found no gradients: run loss.backward() before first_step(), and do not zero the "
                "gradients in between."
            )
        self._scaler = scaler
        if scaler is not None:
            scaler.unscale_(self)
        self.stats = SAMStats(step=self._step_index)
        if not self.is_sam_step:
            self._phase = _PLAIN
            return False

        sq_terms: list[torch.Tensor] = []
        scratches: list[list[torch.Tensor] | None] = []
        for group, params, grads in groups:
            if group["adaptive"]:
                scratch = self._buffers(self._scratch, params)
                torch._foreach_copy_(scratch, params)
                torch._foreach_abs_(scratch)
                torch._foreach_add_(scratch, float(group["eta"]))  # T = |w| + eta
                torch._foreach_mul_(scratch, scratch)  # T^2
                torch._foreach_mul_(scratch, grads)  # T^2 g, the direction of e
                sq_terms.append(_dot_sum(scratch, grads))  # ||T g||^2 = <T^2 g, g>
                scratches.append(scratch)
            else:
                sq_terms.append(_sq_sum(grads))
                scratches.append(None)
        group_sq = _to_floats(sq_terms)  # the one host synchronisation of this call
        total = math.sqrt(sum(group_sq))
        self.stats.grad_norm = total
        if not math.isfinite(total):
            self._phase = _SKIP
            return False

        self._pending = []
        self._pert_sq = 0.0
        self._pert_sq_tensors = []
        for (group, params, grads), scratch, gsq in zip(groups, scratches, group_sq, strict=True):
            scale = group["rho"] / (total + _PERTURB_EPS)
            saved = self._buffers(self._saved, params)
            torch._foreach_copy_(saved, params)
            if scratch is None:
                torch._foreach_add_(params, grads, alpha=scale)  # w + rho g / ||g||
                self._pert_sq += scale * scale * gsq
            else:
                torch._foreach_add_(params, scratch, alpha=scale)  # w + rho T^2 g / ||T g||
                self._pert_sq_tensors.append(_sq_sum(scratch) * (scale * scale))
            self._pending.append((params, saved))
        self.stats.sam_step = True
        self._phase = _PERTURBED
        if zero_grad:
            self.zero_grad()
        return True

    def second_step(
        self,
        zero_grad: bool = False,
        *,
        scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        """Restore ``w`` in place and let the base optimizer apply the gradient of the perturbed pass.

        Routed through ``step`` so LR schedulers and optimizer step hooks see exactly one step per SAM step. With a
        ``scaler``, the gradients are unscaled, the step is skipped when any pass had inf/NaN, and
        ``scaler.update()`` is called exactly once (do not call it yourself).

        Args:
            zero_grad: Zero the gradients (``set_to_none``) after the update.
            scaler: The scaler given to ``first_step`` (defaults to it).
            max_grad_norm: Clip the final gradient to this global norm before the base step.

        Example:
            >>> import torch
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = SAM(model.parameters(), lr=0.1)
            >>> model(torch.ones(2, 3)).sum().backward()
            >>> opt.first_step(zero_grad=True)
            True
            >>> model(torch.ones(2, 3)).sum().backward()
            >>> opt.second_step(zero_grad=True, max_grad_norm=1.0)
            >>> opt.stats.final_grad_norm > 0
            True
        """
        self.step(_SecondStepCall(zero_grad, scaler, max_grad_norm))

    @torch.no_grad()
    def _abandon_step(self) -> None:
        """Undo a pending perturbation in place and return to the idle phase without a base step."""
        for params, saved in self._pending:
            torch._foreach_copy_(params, saved)
        self._pending = []
        self._pert_sq_tensors = []
        self._scaler = None
        self._phase = _IDLE

    def _second_step(self, call: _SecondStepCall) -> None:
        if self._phase == _IDLE:
            raise RememError(
                "second_step() was called without first_step(): call loss.backward(), then first_step(), then the "
                "second backward pass, then second_step() (or use step(closure))."
            )
        try:
            max_grad_norm = _check_max_grad_norm(call.max_grad_norm)
        except ConfigError:
            self._abandon_step()  # back to w exactly, so nothing is left perturbed
            raise
        scaler = self._resolve_scaler(call.scaler)
        if scaler is None:
            scaler = self._scaler
        elif self._scaler is not scaler:
            raise ConfigError(
                "second_step() got a different GradScaler than first_step(): pass the same scaler to both "
                "(or to first_step only)."
            )
        phase = self._phase
        stats = self.stats
        try:
            if phase == _PERTURBED:
                for params, saved in self._pending:
                    torch._foreach_copy_(params, saved)  # exact, in place
                self._pending = []
                if scaler is not None:
                    # A second optimizer object over the same parameters: GradScaler records this pass's inf
                    # check separately and update() backs off if either pass overflowed.
                    scaler.unscale_(self.base_optimizer)
            take_step = phase != _SKIP
            if take_step:
                grads = [g for _, _, gs in self._collect() for g in gs]
                host = _to_floats(([_sq_sum(grads)] if grads else []) + self._pert_sq_tensors)
                final_sq = host[0] if grads else 0.0
                pert_sq = self._pert_sq + sum(host[1:] if grads else host)
                self._pert_sq_tensors = []
                stats.final_grad_norm = math.sqrt(final_sq)
                if phase == _PERTURBED:
                    stats.perturbation_norm = math.sqrt(pert_sq)
                else:
                    stats.grad_norm = None
                if not math.isfinite(stats.final_grad_norm):
                    take_step = False
                elif max_grad_norm is not None:
                    coef = max_grad_norm / (stats.final_grad_norm + _CLIP_EPS)
                    if coef < 1.0:
                        torch._foreach_mul_(grads, coef)
            if take_step:
                self.base_optimizer.step()
            else:
                self.skipped_steps += 1
                stats.skipped = True
                stats.sam_step = False
            if scaler is not None:
                scaler.update()
        finally:
            self._pending = []
            self._pert_sq_tensors = []
            self._scaler = None
            self._phase = _IDLE
            self._step_index += 1
        if call.zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
        model: nn.Module | None = None,
    ) -> Any:
        """One SAM step with a closure that runs forward and backward and returns the loss (it zeroes nothing).

        SAM zeroes the gradients, runs the closure at ``w`` (under DDP ``no_sync``), perturbs, runs it again at
        ``w + e`` with the same RNG state and BatchNorm statistics frozen, restores ``w`` and applies the base
        optimizer. On plain steps (``every > 1``) and skipped steps the closure runs once.

        Args:
            closure: Runs forward and backward and returns the loss. With a scaler, it calls
                ``scaler.scale(loss).backward()``.
            scaler: A ``torch.amp.GradScaler``; SAM unscales, checks for inf/NaN and calls ``scaler.update()``.
            max_grad_norm: Clip the final gradient to this global norm.
            model: The model, for DDP ``no_sync`` and BatchNorm handling without global hooks (torch.compile, FSDP).

        Returns:
            The loss returned by the first call of the closure.

        Example:
            >>> import torch
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = SAM(model.parameters(), lr=0.1)
            >>> x = torch.randn(4, 3)
            >>> def closure():
            ...     loss = model(x).pow(2).mean()
            ...     loss.backward()
            ...     return loss
            >>> opt.step(closure).item() >= 0
            True
        """
        self._refuse_grad_scaler_step()
        if isinstance(closure, _SecondStepCall):
            return self._second_step(closure)
        if closure is None:
            raise ConfigError(f"SAM.step() needs a closure.\n{_USAGE}")
        _check_max_grad_norm(max_grad_norm)  # before anything moves
        if not callable(closure):
            raise ConfigError(f"SAM.step() got a closure that is not callable: {closure!r}.\n{_USAGE}")
        if self._phase != _IDLE:
            raise RememError("step(closure) was called between first_step() and second_step(); finish that step first.")
        closure = torch.enable_grad()(closure)
        self.zero_grad()
        with self.first_pass(model):
            loss = closure()
        perturbed_loss = None
        if self.first_step(zero_grad=True, scaler=scaler):
            with self.second_pass(model):
                perturbed_loss = closure()
        self._second_step(_SecondStepCall(False, None, max_grad_norm))
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            dtype = torch.promote_types(loss.dtype, torch.float32)
            losses = [loss.detach().reshape(()).to(dtype)]
            if isinstance(perturbed_loss, torch.Tensor) and perturbed_loss.numel() == 1:
                losses.append(perturbed_loss.detach().reshape(()).to(loss.device, dtype))
            values = _to_floats(losses)
            self.stats.loss = values[0]
            if len(values) == 2:
                self.stats.perturbed_loss = values[1]
                self.stats.loss_increase = values[1] - values[0]
        return loss

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (its ``state`` and the shared groups with rho, adaptive, eta) plus a
        ``"sam"`` entry with SAM's settings and counters. The saved weights of a pending step are never included.

        Returns:
            A state dict that ``load_state_dict`` restores exactly; ``base_optimizer.load_state_dict`` accepts it too.

        Example:
            >>> import torch
            >>> opt = SAM(torch.nn.Linear(2, 2).parameters(), torch.optim.AdamW, lr=1e-3)
            >>> sorted(opt.state_dict())
            ['param_groups', 'sam', 'state']
        """
        state = self.base_optimizer.state_dict()
        state["sam"] = {
            "step": self._step_index,
            "skipped_steps": self.skipped_steps,
            "every": self.every,
            "sync_perturbation": self.sync_perturbation,
            "replay_rng": self.replay_rng,
            "freeze_bn": self.freeze_bn,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from ``state_dict()`` (or a plain base-optimizer state dict: SAM defaults are kept).

        Args:
            state_dict: The checkpoint entry.

        Example:
            >>> import torch
            >>> opt = SAM(torch.nn.Linear(2, 2).parameters(), torch.optim.AdamW, lr=1e-3)
            >>> opt.load_state_dict(opt.state_dict())
        """
        if self._phase != _IDLE:
            raise RememError("load_state_dict() was called between first_step() and second_step(); finish the step.")
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
            raise ConfigError(
                f"load_state_dict() expects the dict returned by SAM.state_dict(), got {type(state_dict).__name__}"
                f"{' without param_groups' if isinstance(state_dict, dict) else ''}."
            )
        sam_state = state_dict.get("sam")
        base_state = {k: v for k, v in state_dict.items() if k != "sam"}
        self.base_optimizer.load_state_dict(base_state)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            for key, value in self._sam_defaults.items():
                group.setdefault(key, value)
        if sam_state is not None:
            self._step_index = int(sam_state.get("step", 0))
            self.skipped_steps = int(sam_state.get("skipped_steps", 0))
            self.every = _check_every(sam_state.get("every", self.every))
            self.sync_perturbation = _check_flag(
                sam_state.get("sync_perturbation", self.sync_perturbation), "sync_perturbation"
            )
            self.replay_rng = _check_flag(sam_state.get("replay_rng", self.replay_rng), "replay_rng")
            self.freeze_bn = _check_flag(sam_state.get("freeze_bn", self.freeze_bn), "freeze_bn")


# ---------------------------------------------------------------------- timm factory
def _timm_infos() -> list[Any]:
    from timm.optim import OptimInfo

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
    return getattr(opt_class, "__module__", None) == __name__ and getattr(opt_class, "__qualname__", None) == "SAM"


def _register_with_timm() -> None:
    """Register SAM in timm's optimizer factory; safe to run more than once (module reloads included)."""
    try:
        from timm.optim._optim_factory import _logger as timm_logger
        from timm.optim._optim_factory import default_registry
    except ImportError:  # pragma: no cover - timm without the registry
        return
    quiet = _DropOverwriteWarning()
    for info in _timm_infos():
        try:
            existing = default_registry.get_optimizer_info(info.name)
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


_register_with_timm()
