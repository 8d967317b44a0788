"""One-pass SAM (Momentum-SAM, Becker et al., 2024): sharpness-aware training in any loop that calls ``step()``.

Each step's gradient is taken at ``w - rho v / ||v||``, where ``v`` is the base optimizer's first moment (the last
gradient when it keeps none), and the base optimizer applies it at ``w``. The perturbation is a storage swap made
just before each training forward and undone as each gradient completes, so nothing else ever sees it (docs/sam.md;
the hooks are in ``_attach.py``).

Example:
    >>> import torch
    >>> from timm_remem.sam import OnePassSAM
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = OnePassSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, model=model)
    >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
    >>> for _ in range(3):
    ...     torch.nn.functional.mse_loss(model(x), y).backward()
    ...     opt.step()
    ...     opt.zero_grad()
    >>> opt.stats.perturbed, round(opt.stats.perturbation_norm, 6)
    (True, 0.05)
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import increment_version
from torch.optim import Optimizer

from ..errors import ConfigError
from . import _checks, _tensors
from ._attach import Attachment

__all__ = ["OnePassSAM", "OnePassStats", "MOMENTUM_KEYS"]

# Where base optimizers keep their first moment: torch's SGD, Adam/AdamW/NAdam/RAdam and most of timm's optimizers.
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")
_DIRECTION_EPS = 1e-12
# Keywords of the exact SAM that mean nothing here; refused with the fix instead of passed to the base optimizer.
_EXACT_ONLY = ("adaptive", "eta", "every", "sync_perturbation", "replay_rng", "freeze_bn")
# Which OnePassSAM perturbs each parameter: the newest one built over it (one set of weights, one perturbation).
# Keyed by id (a tensor compares by value, so it cannot key a WeakKeyDictionary); an entry goes with its parameter.
_CLAIMS: dict[int, weakref.ReferenceType] = {}


def _claim(param: torch.Tensor, owner: weakref.ReferenceType) -> None:
    key = id(param)
    if key not in _CLAIMS:
        weakref.finalize(param, _CLAIMS.pop, key, None)
    _CLAIMS[key] = owner


def _claimed_by_another(param: torch.Tensor, me: weakref.ReferenceType) -> bool:
    """Whether a live, attached OnePassSAM other than ``me`` claimed ``param`` more recently (built or stepped)."""
    ref = _CLAIMS.get(id(param))
    other = ref() if ref is not None and ref is not me else None
    return other is not None and not getattr(other, "_detached", False)


@dataclass
class OnePassStats:
    """Diagnostics of the latest step of a ``OnePassSAM`` (plain Python numbers).

    Attributes:
        step: Index of the latest ``step()`` (0 for the first).
        perturbed: Whether the training forward(s) of that step ran at perturbed weights.
        direction_norm: ``||v||``, the global norm of the direction (None before the first perturbation).
        perturbation_norm: ``||e||`` over all groups (equals rho for one group; None when not perturbed).
    """

    step: int = 0
    perturbed: bool = False
    direction_norm: float | None = None
    perturbation_norm: float | None = None


class OnePassSAM(Optimizer):
    """Momentum-SAM around any base optimizer: one forward/backward per step, weights clean outside it.

    For loops that call ``optimizer.step()`` without a closure (timm's ``train.py``, HF's Trainer); in your own
    loop the exact ``SAM`` is the faithful algorithm. With ``model=`` it hooks that model; given parameters only (as
    timm's factory does), a process-wide forward pre-hook finds the outermost module whose training forward uses
    them and goes away at the end of the first ``step()`` after that.

    A training-mode forward with gradients enabled runs at ``w + e``; the weights are ``w`` whenever anything else
    can see them (each parameter goes back as its gradient completes, and in ``step()``, an eval / no_grad forward,
    ``state_dict()``, a forward that raises; ``restore()`` or ``eval()`` at any time). Not supported: anything that
    needs a parameter's storage fixed (CUDA graphs, FSDP's flat parameters, views kept across steps). See docs/sam.md.

    Args:
        params: Parameters or parameter groups (a group may set its own ``rho``).
        base_optimizer: Optimizer class (or factory) applying the update, e.g. ``torch.optim.AdamW``.
        rho: Radius of the perturbation (a group field); Momentum-SAM's paper uses larger radii than SAM (0.3 for
            SGD on CIFAR, up to 3 for AdamW on ImageNet); 0 trains as the base.
        model: The model (or its DDP wrapper) whose forward uses ``params``; None to find it.
        **base_kwargs: Passed to the base optimizer (``lr``, ``momentum``, ``weight_decay``, ...).

    Attributes:
        base_optimizer: The base optimizer (it shares ``param_groups`` and ``state`` with this one).
        stats: ``OnePassStats`` of the latest step.

    Example:
        >>> import timm, timm.optim, torch, timm_remem
        >>> model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=10)
        >>> opt = timm.optim.create_optimizer_v2(model, "samadamw", lr=1e-3, rho=0.05)
        >>> type(opt).__name__, type(opt.base_optimizer).__name__
        ('OnePassSAMAdamW', 'AdamW')
        >>> x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        >>> for _ in range(2):
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
        ...     opt.step()
        ...     opt.zero_grad()
        >>> opt.stats.perturbed  # the second step's forward ran at w - rho v / ||v||
        True
    """

    # Per-step buffers and hooks: never pickled or deep-copied; a copy finds its model again by itself.
    _TRANSIENT = ("_attachment", "_spare", "_live", "_scales", "_grad_seen", "_n_perturbed", "_current", "_visiting",
                  "_versions", "_driven", "_foreign", "_aside", "_swapped", "_self_ref")

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Callable[..., Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        *,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        _checks.check_base_optimizer_class(base_optimizer)
        exact_only = sorted(set(base_kwargs) & set(_EXACT_ONLY))
        if exact_only:
            raise ConfigError(
                f"OnePassSAM does not take {', '.join(exact_only)} (keywords of the exact, two-pass SAM). For ASAM "
                "or the other options use timm_remem.SAM in your own loop, or timm_remem.sam.create_sam(model, "
                "'sgd', rho=..., adaptive=True) to build it with timm's parameter groups."
            )
        if model is not None and not isinstance(model, nn.Module):
            raise ConfigError(f"model must be the torch.nn.Module that uses the parameters, got "
                              f"{type(model).__name__}.")
        rho = _checks.check_rho(rho, "OnePassSAM")
        self.base_optimizer: Optimizer | None = None
        super().__init__(_checks.check_params_given(params), {"rho": rho})
        _checks.share_base_optimizer(self, base_optimizer, base_kwargs, {"rho": rho})
        self._model = model
        self._direction: dict[torch.Tensor, torch.Tensor] = {}  # the last gradient, for params with no momentum
        self._step_index = 0
        self.stats = OnePassStats()
        self._reset_transient()

    def _reset_transient(self) -> None:
        self._spare: dict[torch.Tensor, torch.Tensor] = {}  # per parameter: the buffer w + e is written into
        self._live: dict[torch.Tensor, torch.Tensor] = {}  # parameters at w + e right now -> their w, untouched
        self._scales: list[float] | None = None  # per group, for the current step; None: not computed yet
        self._grad_seen = False  # a gradient was completed since the latest perturbation
        self._n_perturbed = 0
        self._current = OnePassStats(step=self._step_index)  # the step under way; ``stats`` is the latest one
        self._visiting: dict[torch.Tensor, torch.Tensor] = {}  # a no_grad forward runs at w: param -> its w + e
        self._versions: dict[torch.Tensor, int] = {}  # autograd versions as this optimizer last left them
        self._driven = True  # the loop called step() or zero_grad() since the latest training forward
        self._foreign = 0  # training forwards in a row that found the weights updated elsewhere, undriven
        self._aside = False  # another optimizer updates these weights: no perturbation until step() runs again
        self._swapped = False  # a swap since autocast's cache was last cleared
        self._self_ref = weakref.ref(self)
        for p in self._trainable():
            _claim(p, self._self_ref)
        self._attachment = Attachment(self, self._all_params(), self._model)
        if getattr(self, "_detached", False):  # a copy of a detached optimizer stays detached
            self._attachment.remove()
            self._aside = True

    def __getstate__(self) -> dict[str, Any]:
        self.restore()
        return {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset_transient()

    def _trainable(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _all_params(self) -> list[torch.Tensor]:  # frozen ones too: they may be unfrozen later
        return [p for group in self.param_groups for p in group["params"]]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to this optimizer and to the base optimizer (they share it); it may set ``rho``.

        Example:
            >>> import torch
            >>> opt = OnePassSAM(torch.nn.Linear(2, 2).parameters(), lr=0.1, rho=0.1)
            >>> opt.add_param_group({"params": torch.nn.Linear(2, 2).parameters(), "lr": 0.01})
            >>> opt.param_groups[1]["rho"], opt.param_groups[1]["lr"]
            (0.1, 0.01)
        """
        if not isinstance(param_group, dict):
            raise ConfigError(f"param_group must be a dict with a 'params' key, got {type(param_group).__name__}.")
        if "rho" in param_group:
            param_group["rho"] = _checks.check_rho(param_group["rho"], "param group")
        if self.base_optimizer is None:  # during Optimizer.__init__
            super().add_param_group(param_group)
            return
        self.restore()
        param_group.setdefault("rho", self.defaults["rho"])
        self.base_optimizer.add_param_group(param_group)
        added = list(param_group["params"])
        for p in added:
            _claim(p, self._self_ref)
        self._attachment.add_params(added)

    # ------------------------------------------------------------------ perturbation
    def _directions(self) -> list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]]:
        """``(group, params, v)`` per group: each trainable parameter's first moment (or last gradient)."""
        out = []
        for group in self.param_groups:
            params, dirs = [], []
            for p in group["params"]:
                if not p.requires_grad or _claimed_by_another(p, self._self_ref):
                    continue
                state = self.state.get(p)
                v = None
                if state:
                    v = next((state[k] for k in MOMENTUM_KEYS if isinstance(state.get(k), torch.Tensor)), None)
                if v is None:
                    v = self._direction.get(p)
                if v is not None and v.shape == p.shape:
                    params.append(p)
                    dirs.append(v)
            if params:
                out.append((group, params, dirs))
        return out

    @torch.no_grad()
    def _on_training_forward(self) -> None:
        """A training forward starts: perturb (once; again after a partial restore)."""
        if self._live and len(self._live) == self._n_perturbed:
            return
        self.restore()
        if self._aside or self._updated_elsewhere():
            return
        self._driven = False
        directions = self._directions()
        if not directions:
            return
        self._attachment.add_params(p for _, params, _ in directions for p in params)  # trainable since built
        if self._scales is None:  # once per step: every micro-batch of an accumulated step gets the same e
            group_sq = _tensors.to_floats([_tensors.sq_sum(dirs) for _, _, dirs in directions])
            norm = math.sqrt(sum(group_sq))
            self._current.direction_norm = norm
            if not math.isfinite(norm) or norm == 0.0:
                self._scales = [0.0] * len(directions)
            else:
                self._scales = [-float(group["rho"]) / (norm + _DIRECTION_EPS) for group, _, _ in directions]
            self._current.perturbation_norm = math.sqrt(sum(s * s * sq for s, sq in zip(self._scales, group_sq,
                                                                                         strict=True)))
        if len(self._scales) != len(directions):  # a direction appeared mid-step (a new group): wait for step()
            return
        n = 0
        for (_, params, dirs), scale in zip(directions, self._scales, strict=True):
            if scale == 0.0:
                continue
            for p, v in zip(params, dirs, strict=True):
                perturbed = self._spare.pop(p, None)
                if perturbed is None or (perturbed.shape, perturbed.dtype, perturbed.device) != (p.shape, p.dtype,
                                                                                                   p.device):
                    perturbed = torch.empty_like(p)
                torch.add(p, v, alpha=scale, out=perturbed)  # w + e, one pass
                self._live[p] = p.data  # w itself, untouched until the restore points p back at it
                p.data = perturbed
                increment_version(p)
                self._versions[p] = p._version
            n += len(params)
        self._n_perturbed = n
        self._grad_seen = False
        self._clear_autocast_cache()
        if n:
            self._current.perturbed = True

    def _updated_elsewhere(self) -> bool:
        """Whether another optimizer trains these weights: stand aside (with a warning) until ``step()`` runs again.

        Changes while the loop drives this optimizer (``step()`` or ``zero_grad()`` between training forwards) are
        the loop's own (a load, clipping, an EMA swap); changes at two training forwards in a row without them are not.
        """
        changed = any(p._version != v for p, v in self._versions.items())
        if changed:
            self._record_versions()
        self._foreign = self._foreign + 1 if changed and not self._driven else 0
        if self._foreign >= 2:
            self._aside = True
            warnings.warn(
                "OnePassSAM: these weights were updated by something other than this optimizer's step() (another "
                "optimizer?) and step() was not called since, so the latest step's gradient was taken at weights this "
                "optimizer perturbed. It stops perturbing them until its own step() runs again. If the model now "
                "trains with another optimizer, drop this one (del opt) or call opt.detach() first.",
                UserWarning, stacklevel=2)
            return True
        return False

    def _record_versions(self) -> None:
        self._versions = {p: p._version for p in self._trainable()}

    def _clear_autocast_cache(self) -> None:
        # autocast caches each parameter's low-precision copy by tensor, not by storage: a swap must drop it
        torch.clear_autocast_cache()
        self._swapped = False

    @torch.no_grad()
    def _on_grad_ready(self, param: torch.Tensor) -> None:
        """Backward completed ``param``'s gradient: autograd no longer needs its value, so put ``w`` back."""
        self._grad_seen = True
        if param in self._live:
            self._swap_back(param, self._live.pop(param))

    def _swap_back(self, param: torch.Tensor, w: torch.Tensor) -> None:
        self._spare[param] = param.data  # w + e, the next step's buffer
        param.data = w
        increment_version(param)
        self._versions[param] = param._version
        self._swapped = True

    @torch.no_grad()
    def restore(self) -> None:
        """Put the weights back at ``w`` now (they are already, except between a training forward and its backward)."""
        self._end_visit()
        while self._live:
            param, w = self._live.popitem()
            self._swap_back(param, w)
        if self._swapped:
            self._clear_autocast_cache()

    def _on_other_forward(self) -> None:
        """An eval / no_grad forward of the model: it runs at ``w``.

        Between a training forward and its backward, a no_grad forward visits ``w`` and the weights go back to
        ``w + e`` after it (no graph can hold the visited values); an eval forward with gradients restores for good.
        """
        if self._live and not self._grad_seen and not torch.is_grad_enabled() and not self._visiting:
            for param, w in self._live.items():
                self._visiting[param] = param.data
                param.data = w  # no version bump: the pending graph's saved values are back before its backward
            self._clear_autocast_cache()
        else:
            self.restore()

    def _end_visit(self) -> None:
        """Back to ``w + e`` after a no_grad forward inside a training step."""
        if self._visiting:
            for param, perturbed in self._visiting.items():
                param.data = perturbed
            self._visiting.clear()
            self._clear_autocast_cache()

    def _on_load(self) -> None:
        """A module's ``load_state_dict`` wrote the weights: the new versions are the loop's, not a foreign step's."""
        self._record_versions()

    def detach(self) -> None:
        """Stop watching the model for good: no more perturbations (``step()`` then applies the base optimizer only)."""
        self.restore()
        self._attachment.remove()
        self._aside = True
        self._detached = True
        for p in self._all_params():  # what it claimed goes back to any other optimizer over these weights
            if _CLAIMS.get(id(p)) is self._self_ref:
                del _CLAIMS[id(p)]

    def eval(self) -> OnePassSAM:
        """``restore()``; HF's Trainer calls ``optimizer.eval()`` before evaluating, when the optimizer has one."""
        self.restore()
        return self

    def train(self) -> OnePassSAM:
        """Nothing to do: the next training forward perturbs by itself (HF's Trainer calls this before each one)."""
        return self

    @property
    def is_perturbed(self) -> bool:
        """Whether any parameter is at ``w + e`` right now."""
        return bool(self._live)

    @property
    def buffer_nbytes(self) -> int:
        """Bytes of this optimizer's own buffers: the buffer ``w + e`` is written into, per perturbed parameter, and
        the last gradient where the base keeps no moment.

        Example:
            >>> import torch
            >>> model = torch.nn.Linear(4, 4)
            >>> opt = OnePassSAM(model.parameters(), lr=0.1, momentum=0.9, model=model)
            >>> for _ in range(2):
            ...     model(torch.ones(1, 4)).sum().backward(); opt.step(); opt.zero_grad()
            >>> opt.buffer_nbytes == sum(p.numel() * 4 for p in model.parameters())  # one buffer per parameter
            True
        """
        held = (self._spare, self._direction)
        return sum(b.numel() * b.element_size() for cache in held for b in cache.values()) + sum(
            p.numel() * p.element_size() for p in self._live)  # a perturbed parameter's w + e is its buffer

    # ------------------------------------------------------------------ step
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients; after a backward, also put back any weight its backward did not reach (between a
        training forward and its backward, the perturbation stays for that backward)."""
        if self._live and self._grad_seen:
            self.restore()
        self._driven = True
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Put ``w`` back, apply the base optimizer and set the direction of the next step's perturbation.

        A step with no gradients changes nothing.

        Args:
            closure: Optional; runs forward and backward at the perturbed weights and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        if closure is not None and not callable(closure):
            raise ConfigError(f"OnePassSAM.step() got a closure that is not callable: {closure!r}.")
        self.restore()
        loss = None
        if closure is not None:
            self._on_training_forward()
            try:
                with torch.enable_grad():
                    loss = closure()
            finally:
                self.restore()
        if any(p.grad is not None for p in self._all_params()):
            if closure is None and self._scales is None and not self._aside:
                self._warn_if_bypassed()
            if any(p.grad is not None and p.grad.is_sparse for p in self._all_params()):
                raise ConfigError("OnePassSAM does not support sparse gradients; use dense embeddings (sparse=False).")
            self.base_optimizer.step()
            self._keep_last_gradients()
            self._record_versions()
            self._aside = getattr(self, "_detached", False)
            if not self._aside:
                for p in self._trainable():  # stepping these weights: this optimizer perturbs them
                    if _CLAIMS.get(id(p)) is not self._self_ref:
                        _claim(p, self._self_ref)
        self._driven = True
        self.stats = self._current
        self._step_index += 1
        self._current = OnePassStats(step=self._step_index)
        self._scales = None  # the next step's direction is the state this step left
        self._attachment.end_discovery()
        return loss

    def _warn_if_bypassed(self) -> None:
        """A step with gradients and a direction, but no training forward of the watched model: say so, once."""
        if (getattr(self, "_bypass_warned", False) or not self._attachment.roots or not self._directions()
                or not any(float(group["rho"]) > 0 for group in self.param_groups)):
            return
        self._bypass_warned = True
        warnings.warn(
            "OnePassSAM: step() got gradients, but no training forward (train mode, gradients enabled) of the model "
            "it watches ran since the last step, so this step was not sharpness-aware. If the model trains in eval "
            "mode, call model.train(); if the loop calls a method such as forward_features directly, call the model "
            "itself or build the optimizer with model= the module whose forward the loop calls.",
            UserWarning, stacklevel=3)

    @torch.no_grad()
    def _keep_last_gradients(self) -> None:
        """For parameters whose base optimizer keeps no first moment (SGD without momentum), keep the gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or not p.requires_grad:
                    continue
                state = self.state.get(p)
                if state and any(isinstance(state.get(k), torch.Tensor) for k in MOMENTUM_KEYS):
                    self._direction.pop(p, None)
                    continue
                buf = self._direction.get(p)
                if buf is None or buf.shape != p.shape or buf.dtype != p.grad.dtype or buf.device != p.device:
                    self._direction[p] = p.grad.detach().clone()
                else:
                    buf.copy_(p.grad)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus a ``"sam"`` entry (the step count and kept gradients, by index).

        Example:
            >>> import torch
            >>> opt = OnePassSAM(torch.nn.Linear(2, 2).parameters(), torch.optim.AdamW, lr=1e-3)
            >>> opt.load_state_dict(opt.state_dict())
            >>> opt.state_dict()["sam"]["one_pass"]
            True
        """
        state = self.base_optimizer.state_dict()
        index = {p: i for i, p in enumerate(self._all_params())}
        state["sam"] = {"base": type(self.base_optimizer).__name__, "one_pass": True, "step": self._step_index,
                        "last_gradient": {index[p]: v for p, v in self._direction.items() if p in index}}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from ``state_dict()`` (or a plain base-optimizer state dict)."""
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
            raise ConfigError(
                "load_state_dict() expects the dict returned by OnePassSAM.state_dict() (or the base optimizer's), "
                f"got {type(state_dict).__name__}{' without param_groups' if isinstance(state_dict, dict) else ''}."
            )
        _checks.check_base_state_dict(self.base_optimizer, state_dict, "OnePassSAM")
        self.restore()
        sam_state = state_dict.get("sam") or {}
        self.base_optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "sam"})
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            group.setdefault("rho", self.defaults["rho"])
        params = self._all_params()
        self._direction = {}
        for i, v in dict(sam_state.get("last_gradient", {})).items():
            p = params[int(i)]
            self._direction[p] = v.detach().to(device=p.device, dtype=p.dtype).clone()
        self._step_index = int(sam_state.get("step", self._step_index))
        self._scales = None

    # ------------------------------------------------------------------ the exact SAM's API, refused
    def first_step(self, *args: Any, **kwargs: Any) -> None:
        """Not available: the two-step API belongs to the exact ``SAM``."""
        raise ConfigError(_TWO_STEP)

    def second_step(self, *args: Any, **kwargs: Any) -> None:
        """Not available: the two-step API belongs to the exact ``SAM``."""
        raise ConfigError(_TWO_STEP)


_TWO_STEP = (
    "first_step()/second_step() belong to the exact, two-pass SAM; this is the one-pass OnePassSAM (what timm's "
    "'sam*' names build), which needs only loss.backward(); optimizer.step(). For exact SAM in your own loop use "
    "timm_remem.SAM(...), or timm_remem.sam.create_sam(model, 'sgd', rho=...) to build it with timm's parameter "
    "groups."
)
