"""Private argument checks of the SAM optimizer, with messages that say what was expected and how to fix it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from .._validation import check_bool, check_float, check_int
from ..errors import ConfigError, RememError

# Keywords of SAM itself that arrive through ``**base_kwargs`` and are never passed to the base optimizer.
SAM_KEYWORDS = ("eta", "every", "sync_perturbation", "replay_rng", "freeze_bn")

USAGE = """SAM needs two forward/backward passes per step. Use it in one of two ways:

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

_GRAD_SCALER_STEP = (
    "GradScaler.step(sam, ...) cannot drive SAM: the closure's gradients would reach the base optimizer "
    "still multiplied by the loss scale. Give the scaler to SAM instead and do not call "
    "scaler.step() or scaler.update() yourself:\n"
    "  loss = opt.step(closure, scaler=scaler)   # closure calls scaler.scale(loss).backward()\n"
    "or\n"
    "  scaler.scale(loss).backward(); opt.first_step(zero_grad=True, scaler=scaler)\n"
    "  scaler.scale(loss2).backward(); opt.second_step(zero_grad=True, scaler=scaler)"
)


def check_rho(value: Any, where: str) -> float:
    """rho >= 0 and finite; ``where`` ("SAM", "param group") starts the message."""
    try:
        return check_float(f"{where} rho", value, low=0)
    except ConfigError:  # the documented message (docs/bad-input.md) gives the typical range before the value
        raise ConfigError(f"{where} rho must be a finite number >= 0 (typical: 0.05 to 0.5), got {value!r}.") from None


def check_eta(value: Any, where: str) -> float:
    """ASAM's offset eta >= 0 and finite."""
    return check_float(f"{where} eta", value, low=0, hint="ASAM uses 0.01")


def check_every(value: Any) -> int:
    """``every``: an integer >= 1."""
    try:
        return check_int("every", value, low=1)
    except ConfigError:
        raise ConfigError(f"every must be an integer >= 1 (1 = SAM on every step), got {value!r}.") from None


def check_max_grad_norm(value: Any) -> float | None:
    """A finite clipping norm > 0, or None (no clipping)."""
    return check_float("max_grad_norm", value, low=0, low_open=True, allow_none=True)


def check_step_arguments(closure: Any, max_grad_norm: Any) -> None:
    """``SAM.step(closure, max_grad_norm=...)``: a callable closure (the usages in the message) and a valid norm."""
    if closure is None:
        raise ConfigError(f"SAM.step() needs a closure.\n{USAGE}")
    check_max_grad_norm(max_grad_norm)
    if not callable(closure):
        raise ConfigError(f"SAM.step() got a closure that is not callable: {closure!r}.\n{USAGE}")


def check_param_group(param_group: Any) -> None:
    """Check (and normalise in place) the SAM fields a parameter group may set: rho, eta, adaptive."""
    if not isinstance(param_group, dict):
        raise ConfigError(f"param_group must be a dict with a 'params' key, got {type(param_group).__name__}.")
    where = "param group"
    if "rho" in param_group:
        param_group["rho"] = check_rho(param_group["rho"], where)
    if "eta" in param_group:
        param_group["eta"] = check_eta(param_group["eta"], where)
    if "adaptive" in param_group:
        check_bool("param group adaptive", param_group["adaptive"])


def check_params_given(params: Any) -> Any:
    """The ``params`` argument as a list, refused when empty (e.g. a requires_grad filter over a frozen model)."""
    if isinstance(params, torch.Tensor):
        raise ConfigError("SAM expects an iterable of parameters or param groups (model.parameters()), got a tensor.")
    if isinstance(params, (set, frozenset)):  # torch refuses sets too: their order (and the state dict's) varies
        raise ConfigError("SAM got the parameters as a set, whose order varies between runs: pass a list or "
                          "model.parameters().")
    params = list(params)
    if not params:
        raise ConfigError(
            "SAM got no parameters (an empty list): pass model.parameters(); if they were filtered by "
            "requires_grad, nothing in the model is trainable: unfreeze what should train (p.requires_grad_(True))."
        )
    return params


def check_trainable(param_groups: list[dict[str, Any]]) -> None:
    """At least one parameter given to SAM requires grad (else there is nothing to perturb or train)."""
    if any(p.requires_grad for group in param_groups for p in group["params"]):
        return
    n = sum(len(group["params"]) for group in param_groups)
    raise ConfigError(
        f"SAM has nothing to train: none of the {n} parameters given to it requires grad (all frozen). Unfreeze "
        "the ones to train (p.requires_grad_(True)) before the step."
    )


def no_gradients_error(param_groups: list[dict[str, Any]]) -> Exception:
    """The error of a ``first_step`` that found no gradient: everything frozen, or no backward pass before it."""
    check_trainable(param_groups)
    return RememError(
        "first_step() found no gradients: run loss.backward() before first_step(), and do not zero the "
        "gradients in between."
    )


def check_base_optimizer_class(base_optimizer: Any) -> None:
    """The base optimizer must be a class (or factory), not an instance."""
    if isinstance(base_optimizer, Optimizer):
        raise ConfigError(
            f"base_optimizer must be an optimizer class such as torch.optim.AdamW, got an instance of "
            f"{type(base_optimizer).__name__}. Pass the class and its arguments: "
            f"SAM(params, torch.optim.AdamW, rho=0.05, lr=1e-3)."
        )
    if not callable(base_optimizer):
        raise ConfigError(f"base_optimizer must be an optimizer class, got {base_optimizer!r}.")


def share_base_optimizer(
    opt: Optimizer, base_optimizer: Callable[..., Optimizer], base_kwargs: dict[str, Any], defaults: dict[str, Any]
) -> None:
    """Build the base optimizer on ``opt``'s groups and share its group dicts (LR schedulers, rho schedules), state
    and defaults with ``opt``; a misspelt keyword becomes a ConfigError listing SAM's own."""
    try:
        base = base_optimizer(opt.param_groups, **base_kwargs)
    except TypeError as error:
        if "unexpected keyword" not in str(error):
            raise
        raise ConfigError(
            f"SAM: {getattr(base_optimizer, '__name__', base_optimizer)} rejected a keyword ({error}). SAM's own "
            f"keywords are rho, adaptive, {', '.join(SAM_KEYWORDS)}; every other "
            "keyword goes to the base optimizer: check its spelling against the base optimizer's arguments."
        ) from None
    if not isinstance(base, Optimizer):
        raise ConfigError(
            f"base_optimizer must build a torch.optim.Optimizer, {base_optimizer!r} returned {type(base).__name__}."
        )
    opt.base_optimizer = base
    opt.param_groups = base.param_groups
    opt.state = base.state
    opt.defaults = {**base.defaults, **defaults}


def resolve_scaler(scaler: Any) -> torch.amp.GradScaler | None:
    """The scaler if it is an enabled ``torch.amp.GradScaler``, None for None or a disabled scaler."""
    if scaler is None:
        return None
    if not isinstance(scaler, torch.amp.GradScaler):
        raise ConfigError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}.")
    return scaler if scaler.is_enabled() else None


def refuse_grad_scaler_step(optimizer: Optimizer) -> None:
    """Refuse ``scaler.step(sam, ...)``, recognised by the attributes GradScaler.step sets before calling step."""
    if "found_inf" in optimizer.__dict__ or "grad_scale" in optimizer.__dict__:
        optimizer.__dict__.pop("found_inf", None)
        optimizer.__dict__.pop("grad_scale", None)
        raise ConfigError(_GRAD_SCALER_STEP)


# Group keys every base optimizer may lack in a state dict written by another torch version (not hyper-parameters
# that change what the base computes).
_OPTIONAL_GROUP_KEYS = {"foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay",
                        "initial_lr", "lr_scale", "weight_decay_scale", "rho", "adaptive", "eta"}


def check_base_state_dict(base: Optimizer, state_dict: dict[str, Any], where: str) -> None:
    """Refuse, before anything is loaded, a state dict written by another base optimizer (SGD's into an AdamW).

    Ours name their base (``state_dict["sam"]["base"]``); in others, every group must hold the base's hyper-parameters.
    """
    name = type(base).__name__
    recorded = (state_dict.get("sam") or {}).get("base")
    missing: list[str] = []
    if recorded is None:
        groups = state_dict.get("param_groups") or [{}]
        wanted = set(base.defaults) - _OPTIONAL_GROUP_KEYS
        missing = sorted(k for k in wanted if any(k not in g for g in groups if isinstance(g, dict)))
    if (recorded is not None and recorded != name) or missing:
        what = f"a {recorded} optimizer" if recorded else f"an optimizer without {', '.join(missing)}"
        raise ConfigError(
            f"{where}.load_state_dict(): the state dict was written by {what}, and this one's base optimizer is "
            f"{name}: their states do not mix (nothing was loaded). Build the optimizer around the base that wrote "
            f"it, or start the optimizer afresh (load only the model's weights)."
        )

