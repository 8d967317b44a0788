"""SAM in timm's optimizer factory: one-pass names for timm's loops, and ``create_sam`` for the exact SAM.

A name in timm's registry must survive timm's own loop (``loss.backward(); optimizer.step()``, never a closure), so
every name registered builds a ``OnePassSAM``: ``sam`` and ``samsgd`` (SGD, Nesterov), ``sammomentum`` (SGD,
classical momentum), ``samadam`` and ``samadamw``; ``rho`` passes through the factory (``--opt-kwargs rho=0.1`` in
``train.py``). ``create_sam`` builds the exact ``SAM`` (or the one-pass one) around any timm optimizer, with timm's
parameter groups.

Example:
    >>> import torch, timm.optim
    >>> from timm_remem.sam import create_sam, register_with_timm
    >>> register_with_timm()  # already done by the import; idempotent
    >>> model = torch.nn.Linear(4, 2)
    >>> type(timm.optim.create_optimizer_v2(model, "samadamw", lr=1e-3, rho=0.1)).__name__
    'OnePassSAMAdamW'
    >>> exact = create_sam(model, "adamw", lr=1e-3, rho=0.1)
    >>> type(exact).__name__, type(exact.base_optimizer).__name__
    ('SAM', 'AdamW')
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import timm.optim
import torch
from timm.optim import OptimInfo, get_optimizer_info
from torch import nn

from ..errors import ConfigError
from .onepass import OnePassSAM
from .optimizer import SAM

try:  # timm has no public way to register an optimizer; its factory reads this registry
    from timm.optim._optim_factory import default_registry
except ImportError:  # pragma: no cover - a timm without the optimizer registry
    default_registry = None

__all__ = ["register_with_timm", "sam_optimizer_infos", "create_sam", "OnePassSAMSGD", "OnePassSAMAdam",
           "OnePassSAMAdamW"]


class OnePassSAMSGD(OnePassSAM):
    """``OnePassSAM`` around ``torch.optim.SGD``, with SGD's keywords (timm's ``sam``, ``samsgd``, ``sammomentum``).

    Example:
        >>> import torch
        >>> opt = OnePassSAMSGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9, rho=0.05)
        >>> type(opt.base_optimizer).__name__, opt.param_groups[0]["momentum"]
        ('SGD', 0.9)
    """

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.9, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, rho: float = 0.05, maximize: bool = False,
                 foreach: bool | None = None, model: nn.Module | None = None, **others: Any) -> None:
        super().__init__(params, torch.optim.SGD, rho=rho, model=model, lr=lr, momentum=momentum,
                         dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                         foreach=foreach, **others)


class OnePassSAMAdam(OnePassSAM):
    """``OnePassSAM`` around ``torch.optim.Adam``, with Adam's keywords (timm's ``samadam``).

    Example:
        >>> import torch
        >>> opt = OnePassSAMAdam(torch.nn.Linear(2, 2).parameters(), lr=1e-3, betas=(0.9, 0.99))
        >>> opt.param_groups[0]["betas"]
        (0.9, 0.99)
    """

    _base: Any = torch.optim.Adam

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, rho: float = 0.05, maximize: bool = False,
                 foreach: bool | None = None, model: nn.Module | None = None, **others: Any) -> None:
        super().__init__(params, self._base, rho=rho, model=model, lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                         **others)


class OnePassSAMAdamW(OnePassSAMAdam):
    """``OnePassSAM`` around ``torch.optim.AdamW``, with AdamW's keywords (timm's ``samadamw``).

    Example:
        >>> import torch
        >>> opt = OnePassSAMAdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
        >>> type(opt.base_optimizer).__name__, opt.param_groups[0]["weight_decay"]
        ('AdamW', 0.01)
    """

    _base = torch.optim.AdamW

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, rho: float = 0.05, maximize: bool = False,
                 foreach: bool | None = None, model: nn.Module | None = None, **others: Any) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, rho=rho,
                         maximize=maximize, foreach=foreach, model=model, **others)


def sam_optimizer_infos() -> list[OptimInfo]:
    """The ``OptimInfo`` entries that ``register_with_timm`` adds to timm's registry.

    Example:
        >>> [info.name for info in sam_optimizer_infos()]
        ['sam', 'samsgd', 'sammomentum', 'samadam', 'samadamw']
    """
    one_pass = "one-pass SAM (timm_remem, Momentum-SAM; rho= passes through) around"
    sgd = {"has_momentum": True, "has_eps": False, "has_betas": False}
    adam = {"has_momentum": False, "has_eps": True, "has_betas": True}
    return [
        OptimInfo(name="sam", opt_class=OnePassSAMSGD, description=f"{one_pass} SGD with Nesterov momentum",
                  defaults={"nesterov": True}, **sgd),
        OptimInfo(name="samsgd", opt_class=OnePassSAMSGD, description=f"{one_pass} SGD with Nesterov momentum",
                  defaults={"nesterov": True}, **sgd),
        OptimInfo(name="sammomentum", opt_class=OnePassSAMSGD, description=f"{one_pass} SGD with classical momentum",
                  defaults={"nesterov": False}, **sgd),
        OptimInfo(name="samadam", opt_class=OnePassSAMAdam, description=f"{one_pass} Adam", **adam),
        OptimInfo(name="samadamw", opt_class=OnePassSAMAdamW, description=f"{one_pass} AdamW", **adam),
    ]


def create_sam(
    model_or_params: nn.Module | Any,
    opt: str = "sgd",
    *,
    rho: float = 0.05,
    one_pass: bool = False,
    adaptive: bool = False,
    sam_kwargs: dict[str, Any] | None = None,
    **timm_kwargs: Any,
) -> SAM | OnePassSAM:
    """SAM around any timm optimizer, with the parameter groups timm's factory builds for it.

    ``timm.optim.create_optimizer_v2(model_or_params, opt, **timm_kwargs)`` builds the base optimizer exactly as
    for plain training (weight decay off norms and biases, ``layer_decay``, ...); the exact ``SAM`` (default) or
    ``OnePassSAM`` then wraps it, sharing its groups and state.

    Args:
        model_or_params: The model (recommended: the one-pass SAM then hooks it directly) or parameters.
        opt: A timm optimizer name (``sgd``, ``momentum``, ``adamw``, ``lamb``, ...), not a SAM name.
        rho: SAM's radius.
        one_pass: Build ``OnePassSAM`` (loops that call ``step()`` alone) instead of the exact ``SAM``.
        adaptive: ASAM (exact SAM only).
        sam_kwargs: More keywords of the exact ``SAM`` (``eta``, ``every``, ``sync_perturbation``, ...).
        **timm_kwargs: ``create_optimizer_v2``'s keywords (``lr``, ``weight_decay``, ``layer_decay``, ...).

    Returns:
        The optimizer; ``.base_optimizer`` is the one timm built.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
        >>> opt = create_sam(model, "adamw", lr=1e-3, weight_decay=0.05, rho=0.1)
        >>> [g["weight_decay"] for g in opt.param_groups], opt.param_groups[0]["rho"]
        ([0.0, 0.05], 0.1)
    """
    name = str(opt).lower()
    if name.split("_")[-1] in {info.name for info in sam_optimizer_infos()}:
        raise ConfigError(f"create_sam wraps a base optimizer: got opt={opt!r}, a SAM name. Use the base's name, "
                          f"e.g. create_sam(model, {name.split('_')[-1].removeprefix('sam') or 'sgd'!r}, rho=...).")
    try:
        base = timm.optim.create_optimizer_v2(model_or_params, opt, **timm_kwargs)
    except (ValueError, KeyError, AssertionError) as error:
        raise ConfigError(f"create_sam: timm cannot create optimizer {opt!r} ({error}); use a timm optimizer name "
                          "such as 'sgd', 'momentum' or 'adamw'.") from error
    model = model_or_params if isinstance(model_or_params, nn.Module) else None
    if one_pass:
        if adaptive or sam_kwargs:
            raise ConfigError("create_sam(one_pass=True) takes neither adaptive nor sam_kwargs: those are options of "
                              "the exact SAM. Drop them, or use one_pass=False.")
        return OnePassSAM(base.param_groups, lambda groups, **_: base, rho=rho, model=model)
    return SAM(base.param_groups, lambda groups, **_: base, rho=rho, adaptive=adaptive, **(sam_kwargs or {}))


def register_with_timm() -> None:
    """Register SAM in timm's optimizer factory; safe to run more than once.

    A name timm already gives to another optimizer is left to it, with a warning; one that holds a stale copy of one
    of our classes (after ``importlib.reload``) is pointed at the current class.

    Example:
        >>> import timm.optim
        >>> register_with_timm()
        >>> {"sam", "samsgd", "sammomentum", "samadam", "samadamw"} <= set(timm.optim.list_optimizers())
        True
    """
    if default_registry is None:  # pragma: no cover - a timm without the optimizer registry
        return
    timm_logger = logging.getLogger("timm.optim._optim_factory")

    def quiet(record: logging.LogRecord) -> bool:  # timm's "Optimizer ... already registered, overwriting"
        return "already registered" not in record.getMessage()

    for info in sam_optimizer_infos():
        try:
            existing = get_optimizer_info(info.name).opt_class
        except ValueError:  # a free name
            replaceable = True
        else:
            if existing is info.opt_class:
                continue
            # a name holding one of our classes, even a stale copy left by importlib.reload, gets the current one
            replaceable = (getattr(existing, "__module__", "") or "").startswith("timm_remem.sam.")
        if not replaceable:
            warnings.warn(
                f"timm already has an optimizer named {info.name!r} ({existing!r}); timm_remem leaves it in place. "
                f"Create timm_remem's directly: timm_remem.sam.{info.opt_class.__name__}(params, ...).", stacklevel=2)
            continue
        timm_logger.addFilter(quiet)
        try:
            default_registry.register(info)
        finally:
            timm_logger.removeFilter(quiet)
