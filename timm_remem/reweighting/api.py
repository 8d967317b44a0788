"""The public reweighting API: ``reweight``, ``merge``, ``unreweight``, ``get_scales``, ``get_reweight_config`` and
``is_reweighted``.

Example:
    >>> import timm, timm_remem
    >>> model = timm_remem.reweight(timm.create_model("test_vit", pretrained=False, img_size=32), alpha=0.5, top_k=1)
    >>> timm_remem.get_scales(model)
    {'blocks.5.mlp': 0.5}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .._validation import check_bool
from ..errors import ConfigError, NotReweightedError
from .branches import find_branches
from .config import SCHEDULES, ReweightConfig, check_factor, check_model, schedule_factors
from .layer import ScaledBranch

__all__ = ["get_reweight_config", "get_scales", "is_reweighted", "merge", "reweight", "unreweight"]


def reweight(
    model: nn.Module,
    alpha: float = 0.85,
    *,
    schedule: str | Sequence[float] | Callable[[int, int], float] = "exponential",
    learnable: bool = False,
    top_k: int | None = None,
    example_inputs: torch.Tensor | None = None,
) -> nn.Module:
    """Scale each transformer block's MLP residual branch, top blocks most (in place).

    Blocks are counted bottom-up in the order the forward pass runs them (across all stages of hierarchical
    models). With ``top_k=k`` only the top ``k`` blocks are reweighted; the ``i``-th of those from the bottom
    (``i = 0..k-1``) gets ``alpha ** (i + 1)`` under ``schedule="exponential"`` (so the top block gets
    ``alpha ** k``), ``alpha`` under ``"constant"``, ``schedule[i]`` for a sequence of ``k`` floats, or
    ``schedule(i, k)`` for a callable. Blocks outside the set are left alone (factor 1). This exponential default
    is ours: ReMem's exact per-block schedule is not public.

    Calling it again on a reweighted model replaces the factors (it never stacks them).

    Args:
        model: A timm vision transformer (any family with a transformer MLP branch).
        alpha: The MLP weight, a finite number > 0 (typically 0.8-0.9).
        schedule: ``"exponential"``, ``"constant"``, a sequence of ``k`` factors, or ``callable(i, k)``.
        learnable: Make each factor a trainable scalar ``nn.Parameter`` (else a buffer).
        top_k: Number of top blocks to reweight (default: all).
        example_inputs: Input for the structure probe (default: built from the model's image size).

    Returns:
        The same model, with its MLP branches wrapped in :class:`ScaledBranch`.

    Raises:
        ConfigError: Bad ``alpha``, ``schedule``, ``top_k`` or ``learnable``.
        UnsupportedModelError: The model has no transformer MLP branch.

    Example:
        >>> import timm, timm_remem
        >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
        >>> _ = timm_remem.reweight(model, alpha=0.5, top_k=2)
        >>> timm_remem.get_scales(model)
        {'blocks.4.mlp': 0.5, 'blocks.5.mlp': 0.25}
    """
    check_model(model)
    custom = not isinstance(schedule, str)
    if not custom and schedule not in SCHEDULES:
        raise ConfigError(
            f"unknown schedule {schedule!r}: use 'exponential', 'constant', a sequence of factors (one per "
            "reweighted block, bottom-up) or a callable (i, k) -> factor."
        )
    if not custom:
        check_factor("alpha", alpha, allow_zero=False)
    check_bool("learnable", learnable)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise ConfigError(f"top_k must be a positive int or None (all blocks), got {top_k!r}.")
    if custom and not callable(schedule) and not isinstance(schedule, Sequence):
        raise ConfigError(f"schedule must be a string, a sequence of floats or a callable, got {schedule!r}.")

    # Validate against the block count before touching anything (a reweighted model keeps its factors on error).
    branches = find_branches(model, "mlp", example_inputs=example_inputs)
    num_blocks = branches[-1].index + 1
    k = num_blocks if top_k is None else top_k
    if not 1 <= k <= num_blocks:
        raise ConfigError(
            f"top_k={top_k} is out of range: {type(model).__name__} has {num_blocks} blocks with an MLP branch; "
            f"use 1 <= top_k <= {num_blocks}, or top_k=None for all."
        )
    factors = schedule_factors(alpha, schedule, k)
    if is_reweighted(model):
        unreweight(model)
        branches = find_branches(model, "mlp", example_inputs=example_inputs)
    first = num_blocks - k
    for b in branches:
        if b.index < first:
            continue
        wrapper = ScaledBranch(b.module, factors[b.index - first], learnable, b.columns, b.fold_path, b.index)
        for alias in b.aliases:
            _set_submodule(model, alias, wrapper)
    model.remem_config = ReweightConfig(
        alpha=None if custom else float(alpha),
        schedule="custom" if custom else schedule,
        top_k=top_k,
        learnable=learnable,
        factors=factors,
        num_blocks=num_blocks,
    )
    return model


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _wrappers(model: nn.Module) -> list[tuple[str, ScaledBranch]]:
    return [(p, m) for p, m in model.named_modules(remove_duplicate=False) if isinstance(m, ScaledBranch)]


def is_reweighted(model: nn.Module) -> bool:
    """Whether ``model`` holds any :class:`ScaledBranch` wrapper.

    Example:
        >>> import timm, timm_remem
        >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
        >>> timm_remem.is_reweighted(model), timm_remem.is_reweighted(timm_remem.reweight(model))
        (False, True)
    """
    return any(isinstance(m, ScaledBranch) for m in model.modules())


def _require_wrappers(model: nn.Module, action: str) -> list[tuple[str, ScaledBranch]]:
    check_model(model)
    found = _wrappers(model)
    if found:
        return found
    config = get_reweight_config(model)
    hint = (
        " It was already merged: its factors are in the weights."
        if config is not None and config.merged
        else " Call timm_remem.reweight(model, alpha=...) first."
    )
    raise NotReweightedError(f"cannot {action} {type(model).__name__}: it is not reweighted.{hint}")


def merge(model: nn.Module) -> nn.Module:
    """Fold the factors into the weights exactly and remove every wrapper (in place).

    The result is a plain timm model: its ``state_dict()`` loads with ``strict=True`` into
    ``timm.create_model(same name and kwargs)`` and reproduces the reweighted outputs. Folding is done in fp32
    (fp64 for the product) and cast back, so fp16/bf16 models merge as exactly as their dtype allows. The
    reweighting settings stay readable through :func:`get_reweight_config` (with ``merged=True``).

    Raises:
        NotReweightedError: The model holds no wrapper (never reweighted, or merged already).
        UnsupportedModelError: A branch ends in a layer without an affine weight; nothing was changed.

    Example:
        >>> import timm, timm_remem, torch
        >>> model = timm_remem.reweight(timm.create_model("test_vit", pretrained=False, img_size=32), alpha=0.8)
        >>> x = torch.randn(1, 3, 32, 32)
        >>> y = model.eval()(x)
        >>> plain = timm_remem.merge(model)
        >>> torch.allclose(plain(x), y, atol=1e-5)
        True
    """
    found = _require_wrappers(model, "merge")
    unique = list({id(w): w for _, w in found}.values())
    for w in unique:  # check everything before changing anything
        if w.columns is None:
            w.fold_target()
    current = {w.index: float(w.remem_scale.detach()) for w in unique}  # learnable factors may have trained
    for w in unique:
        w.fold()
    for path, w in found:
        _set_submodule(model, path, w.base_layer)
    config = get_reweight_config(model)
    if config is not None:
        config.merged = True
        config.factors = [current[i] for i in sorted(current)]
    return model


def unreweight(model: nn.Module) -> nn.Module:
    """Remove every wrapper without folding: the original model back, bit for bit (in place).

    Raises:
        NotReweightedError: The model holds no wrapper.

    Example:
        >>> import timm, timm_remem
        >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
        >>> timm_remem.unreweight(timm_remem.reweight(model)) is model
        True
    """
    found = _require_wrappers(model, "unreweight")
    for path, w in found:
        _set_submodule(model, path, w.base_layer)
    if "remem_config" in model.__dict__:
        del model.__dict__["remem_config"]
    return model


def get_scales(model: nn.Module) -> dict[str, float]:
    """Return ``{branch path: current factor}`` for every reweighted branch, in forward order.

    Example:
        >>> import timm, timm_remem
        >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
        >>> timm_remem.get_scales(timm_remem.reweight(model, alpha=0.5, schedule="constant", top_k=2))
        {'blocks.4.mlp': 0.5, 'blocks.5.mlp': 0.5}
    """
    found = sorted(enumerate(_wrappers(model)), key=lambda t: (t[1][1].index, t[0]))
    return {path: float(w.remem_scale.detach()) for _, (path, w) in found}


def get_reweight_config(model: nn.Module) -> ReweightConfig | None:
    """Return the :class:`ReweightConfig` that ``reweight`` stored on ``model``, or ``None``.

    Example:
        >>> import timm, timm_remem
        >>> model = timm_remem.reweight(timm.create_model("test_vit", pretrained=False, img_size=32), top_k=2)
        >>> config = timm_remem.get_reweight_config(model)
        >>> config.num_blocks, config.top_k, config.merged
        (6, 2, False)
    """
    config = model.__dict__.get("remem_config")
    return config if isinstance(config, ReweightConfig) else None
