"""The exact SAM / ASAM optimizer: perturb to ``w + e``, restore ``w`` in place, base step, state dict."""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.optim import Optimizer

from .._validation import check_bool
from ..errors import ConfigError, RememError
from . import _checks, _tensors
from .passes import RNGState, capture_rng, frozen_running_stats, no_sync, restore_rng
from .stats import SAMStats

__all__ = ["SAM"]

# Added to the gradient norm before dividing (as in the SAM and ASAM reference code).
_PERTURB_EPS = 1e-12

# Where a step stands: between steps; perturbed at w + e; a plain base step (every > 1); a step to skip (inf/NaN).
_IDLE, _PERTURBED, _PLAIN, _SKIP = "idle", "perturbed", "plain", "skip"


class _Pending:
    """The weights of the step in progress and their saved copies, flat, so that one fused copy restores ``w``.

    A run of parameters is added right after its copy was taken: from then on, an error anywhere puts it back.
    """

    __slots__ = ("params", "saved")

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.saved: list[torch.Tensor] = []

    def add(self, params: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
        self.params.extend(params)
        self.saved.extend(saved)

    @torch.no_grad()
    def restore(self) -> None:
        """Every pending weight back to its saved value, exactly and in place; nothing pending afterwards."""
        if self.params:
            torch._foreach_copy_(self.params, self.saved)
        self.params, self.saved = [], []


def _adaptive_direction_(
    params: list[torch.Tensor], saved: list[torch.Tensor], grads: list[torch.Tensor], eta: float, pending: _Pending
) -> tuple[torch.Tensor, torch.Tensor]:
    """Save ``w`` into ``saved``, overwrite the weights with ASAM's direction ``T^2 g`` (``T = |w| + eta``) and
    return ``||T g||^2 = <T^2 g, g>`` and ``||T^2 g||^2``; each run joins ``pending`` as soon as it is saved."""
    dots: list[torch.Tensor] = []
    norms: list[torch.Tensor] = []
    dtype = torch.promote_types(params[0].dtype, torch.float32)
    for run in _tensors.runs(params):
        p, g = params[run], grads[run]
        torch._foreach_copy_(saved[run], p)
        pending.add(p, saved[run])
        if eta:
            torch._foreach_abs_(p)
            torch._foreach_add_(p, eta)  # T = |w| + eta
        torch._foreach_mul_(p, p)  # T^2 (w * w when eta = 0: the same numbers, two passes fewer)
        torch._foreach_mul_(p, g)  # T^2 g, the direction of e
        dots.extend(_tensors.dots(p, g))
        norms.extend(torch._foreach_norm(p, 2, dtype=dtype))
    device = params[0].device
    return torch.stack([d.to(device) for d in dots]).sum(), torch.stack([n.to(device) for n in norms]).square().sum()


class _SecondStepCall(NamedTuple):
    """Internal request routed through ``SAM.step`` so LR schedulers and step hooks see exactly one step."""

    zero_grad: bool
    scaler: Any
    max_grad_norm: float | None


class SAM(Optimizer):
    """Sharpness-Aware Minimization around any base optimizer, with AMP, DDP, BatchNorm and dropout handled.

    The base optimizer is built on SAM's own ``param_groups`` (the very same dicts), so an LR scheduler attached
    to SAM drives it. An exception in either pass leaves the weights exactly at ``w`` and SAM ready for the next
    step, then propagates. See docs/sam.md.

    Args:
        params: Parameters or parameter groups; a group may set its own ``rho``, ``adaptive`` and ``eta``. Frozen
            parameters may be included: they are never perturbed, stepped or buffered.
        base_optimizer: Optimizer class (or factory) applying the update, e.g. ``torch.optim.AdamW``.
        rho: Radius of the neighbourhood (a group field, so ``RhoScheduler`` can drive it).
        adaptive: ASAM: perturb by ``rho * T^2 g / ||T g||`` with ``T = |w| + eta`` (needs a larger rho).
        **base_kwargs: Passed to the base optimizer (``lr``, ``momentum``, ...), except SAM's own: ``eta`` (0.01:
            ASAM's offset, a group field), ``every`` (1: SAM on every k-th step, plain base steps in between),
            ``sync_perturbation`` (False: under DDP, all-reduce the first-pass gradient), ``replay_rng`` (True:
            the perturbed pass draws the same dropout masks), ``freeze_bn`` (True: BatchNorm statistics are
            updated by the first pass only).

    Attributes:
        base_optimizer: The base optimizer instance.
        stats: ``SAMStats`` of the latest step.
        skipped_steps: Number of steps skipped because a gradient was not finite.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3, weight_decay=0.05)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        >>> with opt.first_pass(model):  # optional: RNG replay, DDP no_sync
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
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

    # Per-step buffers and handles: never pickled or deep-copied, rebuilt empty by __setstate__.
    _TRANSIENT = ("_saved", "_scratch", "_bn_saved", "_pending", "_rng_state", "_scaler")

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        **base_kwargs: Any,
    ) -> None:
        _checks.check_base_optimizer_class(base_optimizer)
        eta = _checks.check_eta(base_kwargs.pop("eta", 0.01), "SAM")
        self.every = _checks.check_every(base_kwargs.pop("every", 1))
        self.sync_perturbation = check_bool("sync_perturbation", base_kwargs.pop("sync_perturbation", False))
        self.replay_rng = check_bool("replay_rng", base_kwargs.pop("replay_rng", True))
        self.freeze_bn = check_bool("freeze_bn", base_kwargs.pop("freeze_bn", True))
        rho, adaptive = _checks.check_rho(rho, "SAM"), check_bool("adaptive", adaptive)
        self._sam_defaults = {"rho": rho, "adaptive": adaptive, "eta": eta}
        self.base_optimizer: Optimizer | None = None
        super().__init__(_checks.check_params_given(params), dict(self._sam_defaults))
        _checks.share_base_optimizer(self, base_optimizer, base_kwargs, self._sam_defaults)

        self.stats = SAMStats()
        self.skipped_steps = 0
        self._step_index = 0
        self._phase = _IDLE
        self._pert_sq = 0.0
        self._reset_transient()

    def _reset_transient(self) -> None:
        self._scaler: torch.amp.GradScaler | None = None
        self._pending = _Pending()
        self._saved: dict[torch.Tensor, torch.Tensor] = {}  # the saved w, SAM's only per-parameter buffer
        self._scratch: dict[torch.Tensor, torch.Tensor] = {}  # ASAM's former buffer: always empty, still read
        self._bn_saved: weakref.WeakKeyDictionary[nn.Module, list[torch.Tensor]] = weakref.WeakKeyDictionary()
        self._rng_state: RNGState | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Unlike Optimizer.__getstate__, keep SAM's attributes (base optimizer, settings, counters) so that
        # copy.deepcopy and pickling give a working optimizer; drop the per-step buffers.
        state = {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}
        state["_phase"] = _IDLE
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset_transient()

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to SAM and to the base optimizer (they share it); it may set rho, adaptive, eta.

        Example:
            >>> import torch
            >>> opt = SAM(torch.nn.Linear(2, 2).parameters(), rho=0.1, lr=0.1)
            >>> opt.add_param_group({"params": torch.nn.Linear(2, 2).parameters(), "adaptive": True})
            >>> opt.param_groups[1]["rho"], opt.param_groups[1]["adaptive"]
            (0.1, True)
        """
        _checks.check_param_group(param_group)
        if self.base_optimizer is None:  # during Optimizer.__init__
            super().add_param_group(param_group)
            return
        for key, value in self._sam_defaults.items():
            param_group.setdefault(key, value)
        self.base_optimizer.add_param_group(param_group)

    @property
    def buffer_nbytes(self) -> int:
        """Bytes held by SAM's own buffers: the saved ``w`` of the parameters that train (ASAM needs nothing more).

        Example:
            >>> import torch
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
            >>> _ = model[0].requires_grad_(False)  # frozen: never buffered
            >>> opt = SAM(model.parameters(), lr=0.1)
            >>> opt.step(lambda: model(torch.ones(1, 4)).sum().backward())
            >>> opt.buffer_nbytes == sum(p.numel() * 4 for p in model[1].parameters())
            True
        """
        return sum(b.numel() * b.element_size() for b in self._saved.values())

    @property
    def is_sam_step(self) -> bool:
        """Whether the coming step perturbs the weights (False on the plain steps in between when ``every > 1``)."""
        return self._step_index % self.every == 0

    # ------------------------------------------------------------------ passes
    @contextlib.contextmanager
    def first_pass(self, model: nn.Module | None = None) -> Iterator[None]:
        """Context for the first forward/backward of a step (optional in the two-step usage).

        Records the RNG state for ``second_pass`` and, on SAM steps under DDP, skips the gradient all-reduce
        (``no_sync``) so each replica perturbs by its own gradient, unless ``sync_perturbation=True``.

        Args:
            model: The (DDP-wrapped) model; None finds DDP modules through a temporary global forward pre-hook
                (pass it with ``torch.compile`` or FSDP).
        """
        self._rng_state = capture_rng() if self.replay_rng else None
        try:
            with no_sync(model) if self.is_sam_step and not self.sync_perturbation else contextlib.nullcontext():
                yield
        except BaseException:
            self._rng_state = None  # a failed first pass leaves nothing for the next step to replay
            raise

    @contextlib.contextmanager
    def second_pass(self, model: nn.Module | None = None) -> Iterator[None]:
        """Context for the perturbed forward/backward: replays the RNG and keeps BatchNorm statistics unchanged.

        The running statistics of every BatchNorm-like module in training mode are restored exactly on exit, so
        they advance once per SAM step; the RNG state recorded by ``first_pass`` is restored on entry. When an
        exception leaves the context, the weights go back to ``w`` and the step is abandoned (with a scaler,
        ``scaler.update()`` closes its iteration).

        Args:
            model: The model; None finds BatchNorm modules through a temporary global forward pre-hook (pass it
                with ``torch.compile``).

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
            restore_rng(self._rng_state)
            self._rng_state = None
        try:
            with frozen_running_stats(model, self._bn_saved) if self.freeze_bn else contextlib.nullcontext():
                yield
        except BaseException:
            self._abandon_step()
            raise

    # ------------------------------------------------------------------ steps
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, scaler: torch.amp.GradScaler | None = None) -> bool:
        """Move the weights to ``w + e`` using the gradients of the first pass (saved into buffers allocated once).

        Args:
            zero_grad: Zero the gradients (``set_to_none``) after perturbing, ready for the second pass.
            scaler: The ``torch.amp.GradScaler`` that scaled the first-pass loss (SAM unscales the gradients with
                it first); give the same to ``second_step``.

        Returns:
            True when the weights were perturbed and a second pass is needed; False on a plain step (``every > 1``)
            or when a non-finite gradient norm will skip the step (the weights stay at ``w``): call
            ``second_step`` right away then.
        """
        if self._phase != _IDLE:
            raise RememError(
                "first_step() was called twice without second_step() in between; call second_step() after the "
                "second backward pass to restore the weights and apply the update."
            )
        scaler = _checks.resolve_scaler(scaler)
        for group in self.param_groups:  # a scheduler may have written these
            _checks.check_rho(group["rho"], "param group")
        _tensors.drop_frozen(self.param_groups, self._saved)
        groups = _tensors.grads_by_group(self.param_groups)
        if not groups:
            raise _checks.no_gradients_error(self.param_groups)
        if scaler is not None:
            scaler.unscale_(self)
        self._scaler = scaler
        try:
            self.stats = SAMStats(step=self._step_index)
            if not self.is_sam_step:
                self._phase = _PLAIN
                return False
            perturbed = self._perturb(groups)
        except BaseException:
            self._abandon_step()
            raise
        if perturbed and zero_grad:
            self.zero_grad()
        return perturbed

    def _perturb(self, groups: list[_tensors.GroupGrads]) -> bool:
        """``w -> w + e`` with ``e = rho g / ||g||`` (``rho T^2 g / ||T g||`` in adaptive groups), norms global,
        the saved ``w`` the only buffer, one host synchronisation."""
        pending = self._pending = _Pending()
        self._pert_sq = 0.0
        sq_terms: list[torch.Tensor] = []
        dir_terms: list[torch.Tensor] = []
        saved_per_group: list[list[torch.Tensor]] = []
        for group, params, grads in groups:
            saved = _tensors.reused_buffers(self._saved, params)
            saved_per_group.append(saved)
            if group["adaptive"]:
                grad_sq, dir_sq = _adaptive_direction_(params, saved, grads, float(group["eta"]), pending)
                sq_terms.append(grad_sq)
                dir_terms.append(dir_sq)
            else:
                sq_terms.append(_tensors.sq_sum(grads))
        host = _tensors.to_floats(sq_terms + dir_terms)  # the one host synchronisation of this call
        group_sq, dir_sq = host[: len(sq_terms)], iter(host[len(sq_terms) :])
        total = math.sqrt(sum(group_sq))
        self.stats.grad_norm = total
        if not math.isfinite(total):
            pending.restore()  # adaptive groups hold their direction: back to w exactly
            self._phase = _SKIP
            return False

        for (group, params, grads), saved, gsq in zip(groups, saved_per_group, group_sq, strict=True):
            scale = group["rho"] / (total + _PERTURB_EPS)
            if group["adaptive"]:
                _tensors.scale_and_add_(params, saved, scale)  # w + e, e = rho T^2 g / ||T g||
                self._pert_sq += scale * scale * next(dir_sq)
            else:
                for run in _tensors.runs(params):
                    torch._foreach_copy_(saved[run], params[run])
                    pending.add(params[run], saved[run])  # from here on, an error restores this run too
                    torch._foreach_add_(params[run], grads[run], alpha=scale)  # w + rho g / ||g||
                self._pert_sq += scale * scale * gsq
        self.stats.sam_step = True
        self._phase = _PERTURBED
        return True

    def second_step(
        self,
        zero_grad: bool = False,
        *,
        scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        """Restore ``w`` in place and let the base optimizer apply the gradient of the perturbed pass.

        Routed through ``step`` so LR schedulers and step hooks see one step per SAM step. With a ``scaler``, the
        gradients are unscaled, the step is skipped when any pass had inf/NaN, and ``scaler.update()`` is called
        exactly once (do not call it yourself).

        Args:
            zero_grad: Zero the gradients (``set_to_none``) after the update.
            scaler: The scaler given to ``first_step`` (defaults to it).
            max_grad_norm: Clip the final gradient to this global norm before the base step.
        """
        self.step(_SecondStepCall(zero_grad, scaler, max_grad_norm))

    @torch.no_grad()
    def _abandon_step(self) -> None:
        """Back to ``w`` exactly, no base step, the scaler's iteration closed: ready for the next step."""
        self._pending.restore()
        self._rng_state = None
        self._phase = _IDLE
        scaler, self._scaler = self._scaler, None
        if scaler is not None:  # it unscaled this step's gradients: without update() its next unscale_ would fail
            scaler.update()

    def _second_step(self, call: _SecondStepCall) -> None:
        if self._phase == _IDLE:
            raise RememError(
                "second_step() was called without first_step(): call loss.backward(), then first_step(), then the "
                "second backward pass, then second_step() (or use step(closure))."
            )
        try:
            max_grad_norm = _checks.check_max_grad_norm(call.max_grad_norm)
        except ConfigError:
            self._abandon_step()  # back to w exactly, so nothing is left perturbed
            raise
        # A wrong scaler changes nothing: the step stays pending, so second_step with the right one can finish it.
        scaler = _checks.resolve_scaler(call.scaler)
        if scaler is None:
            scaler = self._scaler
        elif self._scaler is not scaler:
            raise ConfigError(
                "second_step() got a different GradScaler than first_step(): pass the same scaler to both "
                "(or to first_step only)."
            )
        phase, stats, pending = self._phase, self.stats, self._pending
        to_update = scaler  # the scaler whose update() is still due
        try:
            if phase == _PERTURBED:
                # Exact and in place: the saved w is copied back (it stays there until the base step is done).
                torch._foreach_copy_(pending.params, pending.saved)
                if scaler is not None:
                    # A second optimizer object over the same parameters: GradScaler records this pass's inf
                    # check separately and update() backs off if either pass overflowed.
                    scaler.unscale_(self.base_optimizer)
            take_step = phase != _SKIP
            if take_step:
                grads = [g for _, _, gs in _tensors.grads_by_group(self.param_groups) for g in gs]
                final_norm = _tensors.global_norm(grads)
                stats.final_grad_norm = final_norm
                if phase == _PERTURBED:
                    stats.perturbation_norm = math.sqrt(self._pert_sq)
                else:
                    stats.grad_norm = None
                if not math.isfinite(final_norm):
                    take_step = False
                elif max_grad_norm is not None:
                    _tensors.clip_grads_(grads, final_norm, max_grad_norm)
            if take_step:
                self.base_optimizer.step()
            else:
                self.skipped_steps += 1
                stats.skipped = True
                stats.sam_step = False
            if scaler is not None:
                to_update = None
                scaler.update()
        except BaseException:
            pending.restore()  # the base step may have moved part of the weights: back to w exactly
            if to_update is not None:
                to_update.update()
            raise
        finally:
            self._pending = _Pending()
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

        The closure runs at ``w`` (under DDP ``no_sync``), then at ``w + e`` with the same RNG state and BatchNorm
        statistics frozen; then ``w`` is restored and the base optimizer steps. On plain and skipped steps it runs
        once. When it raises, the weights are back at ``w`` and SAM is ready for the next step.

        Args:
            closure: Runs forward and backward and returns the loss; with a scaler, it calls
                ``scaler.scale(loss).backward()``.
            scaler: A ``torch.amp.GradScaler``; SAM unscales, checks for inf/NaN and calls ``scaler.update()``.
            max_grad_norm: Clip the final gradient to this global norm.
            model: The model, for DDP ``no_sync`` and BatchNorm handling without global hooks (torch.compile, FSDP).

        Returns:
            The loss returned by the first call of the closure.
        """
        _checks.refuse_grad_scaler_step(self)
        if isinstance(closure, _SecondStepCall):
            return self._second_step(closure)
        _checks.check_step_arguments(closure, max_grad_norm)  # before anything moves
        _checks.check_trainable(self.param_groups)
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
        loss_value, perturbed_value = _tensors.losses_to_floats(loss, perturbed_loss)
        if loss_value is not None:
            self.stats.loss = loss_value
            if perturbed_value is not None:
                self.stats.perturbed_loss = perturbed_value
                self.stats.loss_increase = perturbed_value - loss_value
        return loss

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (with the shared groups) plus a ``"sam"`` entry: SAM's settings, counters.

        Example:
            >>> import torch
            >>> opt = SAM(torch.nn.Linear(2, 2).parameters(), torch.optim.AdamW, lr=1e-3)
            >>> opt.load_state_dict(opt.state_dict())
            >>> opt.state_dict()["sam"]["base"]
            'AdamW'
        """
        state = self.base_optimizer.state_dict()
        state["sam"] = {"base": type(self.base_optimizer).__name__, "step": self._step_index,
                        "skipped_steps": self.skipped_steps, "every": self.every,
                        "sync_perturbation": self.sync_perturbation, "replay_rng": self.replay_rng,
                        "freeze_bn": self.freeze_bn}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from ``state_dict()`` (or a plain base-optimizer state dict: SAM defaults are kept)."""
        if self._phase != _IDLE:
            raise RememError("load_state_dict() was called between first_step() and second_step(); finish the step.")
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
            raise ConfigError(
                f"load_state_dict() expects the dict returned by SAM.state_dict(), got {type(state_dict).__name__}"
                f"{' without param_groups' if isinstance(state_dict, dict) else ''}."
            )
        _checks.check_base_state_dict(self.base_optimizer, state_dict, "SAM")
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
            self.every = _checks.check_every(sam_state.get("every", self.every))
            self.sync_perturbation = check_bool("sync_perturbation", sam_state.get("sync_perturbation",
                                                                                   self.sync_perturbation))
            self.replay_rng = check_bool("replay_rng", sam_state.get("replay_rng", self.replay_rng))
            self.freeze_bn = check_bool("freeze_bn", sam_state.get("freeze_bn", self.freeze_bn))
