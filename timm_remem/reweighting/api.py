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
from ..errors import ConfigError, NotReweightedError, UnsupportedModelError
from ._peft import is_tuner_layer, unwrap_peft
from .branches import check_no_bypass, find_branches
from .config import SCHEDULES, ReweightConfig, check_factor, check_factor_range, check_model, schedule_factors
from .layer import ScaledBranch, unscale

__all__ = ["get_reweight_config", "get_scales", "is_reweighted", "merge", "reweight", "unreweight"]


def reweight(
    model: nn.Module,
    alpha: float = 0.85,
    *,
    schedule: str | Sequence[float] | Callable[[int, int], float] = "exponential",
    learnable: bool = False,
    top_k: int | None = None,
    example_inputs: torch.Tensor | None = None,
    allow_amplify: bool = False,
    allow_zero: bool = False,
) -> nn.Module:
    """Scale each transformer block's MLP residual branch, top blocks most (in place).

    Blocks are counted bottom-up in the order the forward pass runs them (across all stages of hierarchical
    models). With ``top_k=k`` only the top ``k`` blocks are reweighted; the ``i``-th of those from the bottom
    (``i = 0..k-1``) gets ``alpha ** (i + 1)`` under ``schedule="exponential"`` (so the top block gets
    ``alpha ** k``), ``alpha`` under ``"constant"``, ``schedule[i]`` for a sequence of ``k`` floats, or
    ``schedule(i, k)`` for a callable. Blocks outside the set are left alone (factor 1). This exponential default
    is ours: ReMem's exact per-block schedule is not public.

    ReMem scales branches down: every factor must be in ``(0, 1]`` unless ``allow_amplify=True`` (factors > 1) or
    ``allow_zero=True`` (factors of exactly 0, which switch a branch off) says otherwise.

    Calling it again on a reweighted model replaces the factors (it never stacks them). If the model has learnable
    factors, the same ``nn.Parameter`` objects are kept and set to the new values (an optimizer built earlier keeps
    training them); a call that would replace them (``learnable=False`` or another set of blocks) is refused.

    A peft model (``peft.get_peft_model(model, LoraConfig(...))`` or ``peft.inject_adapter_in_model``) works in
    either order: the branches and factors are those of the timm model inside, LoRA updates included.

    Args:
        model: A timm vision transformer (any family with a transformer MLP branch), or a peft model of one.
        alpha: The MLP weight, a finite number in (0, 1] (typically 0.8-0.9; > 1 needs ``allow_amplify``).
        schedule: ``"exponential"``, ``"constant"``, a sequence of ``k`` factors, or ``callable(i, k)``.
        learnable: Make each factor a trainable scalar ``nn.Parameter`` (else a buffer).
        top_k: Number of top blocks to reweight (default: all).
        example_inputs: Input for the structure probe (default: built from the model's image size).
        allow_amplify: Accept factors > 1 (amplifying a branch; not ReMem).
        allow_zero: Accept factors of 0 in a ``schedule`` (switching a branch off; not ReMem).

    Returns:
        The same model, with its MLP branches turned into :class:`ScaledBranch` modules (same paths and objects).

    Raises:
        ConfigError: Bad ``alpha``, ``schedule``, ``top_k`` or flags, a factor outside (0, 1] without the
            opt-in, or a call that would replace learnable factors.
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
    check_bool("learnable", learnable)
    check_bool("allow_amplify", allow_amplify)
    check_bool("allow_zero", allow_zero)
    if not custom:
        check_factor("alpha", alpha, allow_zero=False)
        check_factor_range("alpha", alpha, allow_amplify=allow_amplify, allow_zero=False)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise ConfigError(f"top_k must be a positive int or None (all blocks), got {top_k!r}.")
    if custom and not callable(schedule) and not isinstance(schedule, Sequence):
        raise ConfigError(f"schedule must be a string, a sequence of floats or a callable, got {schedule!r}.")

    # Validate against the block count before touching anything (a reweighted model keeps its factors on error).
    target = unwrap_peft(model)
    branches = find_branches(target, "mlp", example_inputs=example_inputs)
    num_blocks = branches[-1].index + 1
    k = num_blocks if top_k is None else top_k
    if not 1 <= k <= num_blocks:
        raise ConfigError(
            f"top_k={top_k} is out of range: {type(target).__name__} has {num_blocks} blocks with an MLP branch; "
            f"use 1 <= top_k <= {num_blocks}, or top_k=None for all."
        )
    factors = schedule_factors(alpha, schedule, k)
    if custom:
        for i, f in enumerate(factors):
            name = f"schedule({i}, {k})" if callable(schedule) else f"schedule[{i}]"
            check_factor_range(name, f, allow_amplify=allow_amplify, allow_zero=allow_zero)
    first = num_blocks - k
    chosen = [b for b in branches if b.index >= first]
    for b in chosen:
        if is_tuner_layer(b.module):
            raise UnsupportedModelError(
                f"the MLP branch of block {b.index} ends in the peft layer {b.path} ({type(b.module).__name__}); "
                "peft's merge_and_unload would drop a factor placed on it. Reweight before applying LoRA, or leave "
                f"{b.path.rsplit('.', 1)[-1]!r} out of target_modules."
            )
    config = ReweightConfig(
        alpha=None if custom else float(alpha),
        schedule="custom" if custom else schedule,
        top_k=top_k,
        learnable=learnable,
        factors=factors,
        num_blocks=num_blocks,
    )
    current = _unique(_wrappers(target))
    trained = [w for w in current if isinstance(w.remem_scale, nn.Parameter)]
    if trained:
        _check_keeps_parameters(target, trained, current, chosen, learnable)
        with torch.no_grad():
            for w in current:
                w.remem_scale.fill_(factors[w.remem_index - first])
        target.remem_config = config
        return model
    if current:
        unreweight(target)
        branches = find_branches(target, "mlp", example_inputs=example_inputs)
        chosen = [b for b in branches if b.index >= first]
    done: set[int] = set()
    for b in chosen:
        if id(b.module) not in done:  # CoaT registers one Mlp under several names
            done.add(id(b.module))
            ScaledBranch(b.module, factors[b.index - first], learnable, b.columns, b.fold_path, b.index)
    target.remem_config = config
    return model


def _check_keeps_parameters(model, trained, current, chosen, learnable) -> None:
    same = {id(w) for w in current} == {id(b.module) for b in chosen}
    if learnable and same:
        return
    why = "learnable=False would turn them into buffers" if not learnable else (
        f"blocks {sorted(b.index for b in chosen)} would get factors, not {sorted(w.remem_index for w in current)}")
    raise ConfigError(
        f"{type(model).__name__} already has {len(trained)} learnable factors (nn.Parameter objects an optimizer may "
        f"hold) and {why}, replacing them. Call reweight(model, ..., learnable=True) with the same top_k to set "
        "them in place, or timm_remem.unreweight(model) first and build the optimizer afterwards."
    )


def _unique(found: list[tuple[str, ScaledBranch]]) -> list[ScaledBranch]:
    return list({id(w): w for _, w in found}.values())


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
    return any(isinstance(m, ScaledBranch) for m in unwrap_peft(model).modules())


def _require_wrappers(model: nn.Module, action: str) -> list[tuple[str, ScaledBranch]]:
    check_model(model)
    model = unwrap_peft(model)
    check_no_bypass(model)
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
    """Fold the factors into the weights exactly and take every scale off (in place).

    The result is a plain timm model: its ``state_dict()`` loads with ``strict=True`` into
    ``timm.create_model(same name and kwargs)`` and reproduces the reweighted outputs. Folding is done in fp32
    (fp64 for the product) and cast back, so fp16/bf16 models merge as exactly as their dtype allows. The
    reweighting settings stay readable through :func:`get_reweight_config` (with ``merged=True``).

    On a peft model the factor goes into the LoRA layer a branch ends in (its base weights and every ``lora_B``), so
    the adapted outputs are kept; ``peft_model.merge_and_unload()`` before or after gives the plain timm model.

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
    unique = _unique(found)
    for w in unique:  # check everything before changing anything
        if w.remem_columns is None:
            w.fold_target()
        else:
            w._column_weights()
    current = {w.remem_index: float(w.remem_scale.detach()) for w in unique}  # learnable factors may have trained
    for w in unique:
        w.fold()
        unscale(w)
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
    for w in _unique(_require_wrappers(model, "unreweight")):
        unscale(w)
    unwrap_peft(model).__dict__.pop("remem_config", None)
    return model


def get_scales(model: nn.Module) -> dict[str, float]:
    """Return ``{branch path: current factor}`` for every reweighted branch, in forward order.

    Example:
        >>> import timm, timm_remem
        >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
        >>> timm_remem.get_scales(timm_remem.reweight(model, alpha=0.5, schedule="constant", top_k=2))
        {'blocks.4.mlp': 0.5, 'blocks.5.mlp': 0.5}
    """
    check_model(model)
    model = unwrap_peft(model)
    check_no_bypass(model)
    found = sorted(enumerate(_wrappers(model)), key=lambda t: (t[1][1].remem_index, t[0]))
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
    config = unwrap_peft(model).__dict__.get("remem_config")
    return config if isinstance(config, ReweightConfig) else None
