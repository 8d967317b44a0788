"""``RhoScheduler``: SAM's radius on one of timm's schedule shapes (cosine, step, warm-up, ...), beside the LR.

Every stock timm scheduler writes ``"lr"``: ``RhoScheduler`` runs one on private copies of the groups (their ``lr``
set to the base rho) and writes what it computes into each SAM group's ``"rho"``, so the shapes are timm's own code.
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace
from typing import Any

import timm.scheduler
from timm.scheduler.scheduler import Scheduler

from .._validation import check_float, check_int
from ..errors import CheckpointError, ConfigError

__all__ = ["RhoScheduler", "RHO_SCHEDULES"]

# Schedule names (as in timm's ``create_scheduler_v2``) -> the stock timm class; read with getattr so a timm without
# one of them (``WSDLRScheduler`` is recent) simply lacks that name.
_CLASSES = {
    "cosine": "CosineLRScheduler",
    "tanh": "TanhLRScheduler",
    "step": "StepLRScheduler",
    "multistep": "MultiStepLRScheduler",
    "poly": "PolyLRScheduler",
    "wsd": "WSDLRScheduler",
    "constant": "StepLRScheduler",  # timm's 'constant': a step schedule that never decays (warm-up still applies)
}
RHO_SCHEDULES = tuple(name for name, cls in _CLASSES.items() if hasattr(timm.scheduler, cls))

# Keywords written with "rho" where timm says "lr" (the floor, the warm-up start), and their timm names.
_RHO_ALIASES = {"rho_min": "lr_min", "warmup_rho_init": "warmup_lr_init"}
# Keywords RhoScheduler sets itself.
_OWN = ("optimizer", "param_group_field", "initialize")
# Checked here, so a bad value gets a message instead of timm's bare assert.
_INT_CHECKS = {"t_initial": 1, "warmup_t": 0, "cycle_limit": 1}
_FLOAT_CHECKS = {"lr_min": 0.0, "warmup_lr_init": 0.0, "decay_rate": 0.0, "cycle_decay": 0.0}


class RhoScheduler:
    """Schedule SAM's ``rho`` with the shape of a stock timm scheduler, next to timm's LR scheduler.

    Called like a timm scheduler (``step(epoch)`` at the end of an epoch, ``step_update(num_updates)`` after an
    update). Each group follows the shape from its own base rho (``group["initial_rho"]``, set from ``group["rho"]``
    when built, as timm does with ``initial_lr``); ``lr_scale`` never scales rho. Building it writes the value at
    t = 0 (the warm-up start) into the groups.

    Args:
        optimizer: The SAM optimizer (``timm_remem.SAM`` or ``create_optimizer_v2(model, "samadamw", ...)``).
        sched: A shape name, one of ``RHO_SCHEDULES``, or a subclass of ``timm.scheduler.scheduler.Scheduler``.
        **sched_kwargs: The timm scheduler's own keywords (``t_initial``, ``warmup_t``, ``decay_t``,
            ``t_in_epochs``, ...); its ``lr_min`` / ``warmup_lr_init`` (or ``rho_min`` / ``warmup_rho_init``) are
            the rho floor and the warm-up start.

    Attributes:
        optimizer: The SAM optimizer whose groups' ``rho`` are written.
        scheduler: The stock timm scheduler computing the values (e.g. for ``scheduler.get_cycle_length()``).

    Example:
        >>> import torch, timm.scheduler
        >>> from timm_remem.sam import SAM, RhoScheduler
        >>> opt = SAM(torch.nn.Linear(4, 2).parameters(), torch.optim.SGD, rho=0.2, lr=0.1)
        >>> lr_sched = timm.scheduler.CosineLRScheduler(opt, t_initial=10, t_in_epochs=False)
        >>> rho_sched = RhoScheduler(opt, "cosine", t_initial=10, warmup_t=2, t_in_epochs=False)
        >>> opt.param_groups[0]["rho"]  # warm-up starts at warmup_lr_init = 0
        0.0
        >>> for n in (1, 5):
        ...     lr_sched.step_update(n)
        ...     rho_sched.step_update(n)
        >>> round(opt.param_groups[0]["rho"], 6), round(opt.param_groups[0]["lr"], 6)
        (0.1, 0.05)
    """

    def __init__(self, optimizer: Any, sched: str | type[Scheduler] = "cosine", **sched_kwargs: Any) -> None:
        groups = getattr(optimizer, "param_groups", None)
        if not isinstance(groups, list) or not groups:
            raise ConfigError(
                f"RhoScheduler needs a SAM optimizer with param groups, got {type(optimizer).__name__}: pass "
                "timm_remem.SAM(...) or timm.optim.create_optimizer_v2(model, 'samadamw', ...)."
            )
        for i, group in enumerate(groups):
            if "rho" not in group:
                raise ConfigError(
                    f"RhoScheduler drives SAM's radius, but param group {i} of {type(optimizer).__name__} has no "
                    "'rho': pass the SAM optimizer (timm_remem.SAM(...) or "
                    "timm.optim.create_optimizer_v2(model, 'samadamw', ...)), not its base optimizer."
                )
        cls, kwargs = _resolve(sched, sched_kwargs)
        self.optimizer = optimizer
        base = []
        for i, group in enumerate(groups):
            group.setdefault("initial_rho", group["rho"])
            base.append(check_float(f"param group {i} initial_rho", group["initial_rho"], low=0))
        self._groups = SimpleNamespace(param_groups=[{"lr": rho, "rho": rho} for rho in base])
        try:
            self.scheduler = cls(self._groups, **kwargs)
        except (AssertionError, TypeError, ValueError, ZeroDivisionError, KeyError) as error:
            given = ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items())) or "no arguments"
            raise ConfigError(
                f"RhoScheduler: timm's {cls.__name__} refused {given} "
                f"({type(error).__name__}{': ' + str(error) if str(error) else ''}); check these values against "
                f"{cls.__name__}'s arguments."
            ) from None
        self._field = self.scheduler.param_group_field
        self._write("construction")

    # ------------------------------------------------------------------ stepping (timm's calling convention)
    def step(self, epoch: int, metric: float | None = None) -> None:
        """Set rho for ``epoch`` (at the end of each epoch, with the next epoch's index, as timm does); does nothing
        when the scheduler runs on updates (``t_in_epochs=False``).

        Example:
            >>> import torch
            >>> from timm_remem.sam import SAM, RhoScheduler
            >>> opt = SAM(torch.nn.Linear(2, 2).parameters(), rho=0.4, lr=0.1)
            >>> RhoScheduler(opt, "step", decay_t=2, decay_rate=0.5).step(4)
            >>> opt.param_groups[0]["rho"]
            0.1
        """
        check_float("RhoScheduler.step epoch", epoch, low=0)
        self._check_groups()
        self.scheduler.step(epoch, metric)
        self._write(f"epoch {epoch}")

    def step_update(self, num_updates: int, metric: float | None = None) -> None:
        """Set rho after ``num_updates`` optimizer updates (when built with ``t_in_epochs=False``).

        Example:
            >>> import torch
            >>> from timm_remem.sam import SAM, RhoScheduler
            >>> opt = SAM(torch.nn.Linear(2, 2).parameters(), rho=0.4, lr=0.1)
            >>> RhoScheduler(opt, "cosine", t_initial=4, t_in_epochs=False).step_update(2)
            >>> round(opt.param_groups[0]["rho"], 6)
            0.2
        """
        check_float("RhoScheduler.step_update num_updates", num_updates, low=0)
        self._check_groups()
        self.scheduler.step_update(num_updates, metric)
        self._write(f"update {num_updates}")

    def _check_groups(self) -> None:
        n, expected = len(self.optimizer.param_groups), len(self._groups.param_groups)
        if n != expected:
            raise ConfigError(
                f"the optimizer now has {n} param groups, but this RhoScheduler was built for {expected}: build the "
                "RhoScheduler after the last add_param_group()."
            )

    def _write(self, when: str) -> None:
        for i, (group, shadow) in enumerate(zip(self.optimizer.param_groups, self._groups.param_groups,
                                                strict=True)):
            value = shadow[self._field]
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(
                    f"RhoScheduler ({type(self.scheduler).__name__}) computed rho={value!r} for param group {i} at "
                    f"{when}; rho must be a finite number >= 0: check the schedule's arguments."
                )
            group["rho"] = float(value)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The timm scheduler's state and the shape's class name, for ``load_state_dict``.

        Example:
            >>> import torch
            >>> from timm_remem.sam import SAM, RhoScheduler
            >>> sched = RhoScheduler(SAM(torch.nn.Linear(2, 2).parameters(), lr=0.1), "cosine", t_initial=5)
            >>> sched.load_state_dict(sched.state_dict())
        """
        return {"sched": type(self.scheduler).__name__, "state": self.scheduler.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict()`` of a RhoScheduler of the same shape over as many param groups (the groups'
        current rho come back with the SAM optimizer's own state dict)."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"sched", "state"}:
            got = f"keys {sorted(state_dict)}" if isinstance(state_dict, dict) else type(state_dict).__name__
            raise CheckpointError(
                "RhoScheduler.load_state_dict expects the dict returned by RhoScheduler.state_dict() (keys 'sched', "
                f"'state'), got {got}."
            )
        name = type(self.scheduler).__name__
        if state_dict["sched"] != name:
            raise CheckpointError(
                f"this rho schedule was saved from a {state_dict['sched']} but this RhoScheduler follows {name}: "
                f"build the RhoScheduler with the same shape as the run that saved it."
            )
        state = state_dict["state"]
        saved = len(state.get("base_values", [])) if isinstance(state, dict) else -1
        if saved != len(self._groups.param_groups):
            raise CheckpointError(
                f"this rho schedule was saved for {saved} param groups but the optimizer has "
                f"{len(self._groups.param_groups)}: resume with the same parameter groups."
            )
        self.scheduler.load_state_dict(dict(state))


def _resolve(sched: Any, sched_kwargs: dict[str, Any]) -> tuple[type[Scheduler], dict[str, Any]]:
    """The timm class and its keywords (aliases mapped, values checked); every refusal is a ConfigError."""
    if isinstance(sched, str):
        if sched == "plateau":
            raise ConfigError(
                "sched='plateau' cannot drive rho: it follows a validation metric through torch's "
                f"ReduceLROnPlateau, which only writes 'lr'. Use one of {', '.join(RHO_SCHEDULES)}."
            )
        if sched not in RHO_SCHEDULES:
            raise ConfigError(f"unknown rho schedule {sched!r}: use one of {', '.join(RHO_SCHEDULES)} or a "
                              "timm.scheduler.scheduler.Scheduler subclass.")
        cls = getattr(timm.scheduler, _CLASSES[sched])
    elif isinstance(sched, type) and issubclass(sched, Scheduler):
        if issubclass(sched, timm.scheduler.PlateauLRScheduler):
            return _resolve("plateau", sched_kwargs)
        cls = sched
    else:
        raise ConfigError(f"sched must be a schedule name ({', '.join(RHO_SCHEDULES)}) or a timm Scheduler "
                          f"subclass, got {sched!r}.")
    kwargs = dict(sched_kwargs)
    given_as = {}  # timm's name -> the name the caller used (for the messages)
    for alias, name in _RHO_ALIASES.items():
        if alias in kwargs:
            if name in kwargs:
                raise ConfigError(f"RhoScheduler got both {alias} and {name} (the same setting): give one.")
            kwargs[name] = kwargs.pop(alias)
            given_as[name] = alias
    for name in _OWN:
        if name in kwargs:
            raise ConfigError(f"RhoScheduler sets {name} itself (it writes each group's 'rho'): drop {name}=.")
    if sched == "constant":
        for name in ("decay_t", "decay_rate"):
            if name in kwargs:
                raise ConfigError(f"the 'constant' rho schedule does not decay: drop {name}= or use sched='step'.")
        kwargs.update(decay_t=1, decay_rate=1.0)
    signature = inspect.signature(cls.__init__).parameters
    variadic = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    accepted = [n for n in signature if n not in ("self", *_OWN) and signature[n].kind not in variadic]
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values()):
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ConfigError(
                f"RhoScheduler: {cls.__name__} has no argument {', '.join(unknown)}; it takes "
                f"{', '.join(accepted)} (rho_min / warmup_rho_init for lr_min / warmup_lr_init)."
            )
    missing = [n for n in accepted if signature[n].default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise ConfigError(
            f"RhoScheduler: {cls.__name__} needs {', '.join(missing)} (e.g. t_initial = the schedule's length in "
            "epochs, or in updates with t_in_epochs=False)."
        )
    for name, low in _INT_CHECKS.items():
        if name in kwargs:
            check_int(name, kwargs[name], low=low)
    for name, low in _FLOAT_CHECKS.items():
        if name in kwargs:
            check_float(given_as.get(name, name), kwargs[name], low=low)
    return cls, kwargs
