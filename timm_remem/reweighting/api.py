"""The public reweighting API: ``reweight``, ``merge``, ``unreweight`` and the reports on a reweighted model.

The factors live in the :class:`ScaledBranch` modules only and every report is read from them; the model keeps a
record of the settings, which is all that is left once ``merge`` folded them (docs/guarantees.md, section 4).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .._peft import is_tuner_layer, unwrap_peft
from .._validation import check_bool
from ..errors import ConfigError, NotReweightedError, TrainingError, UnsupportedModelError
from .branches import Branch, check_no_bypass, check_not_shared, find_branches
from .config import SCHEDULES, ReweightConfig, check_factor, check_factor_range, check_model, schedule_factors
from .layer import ScaledBranch, unscale

__all__ = ["check_factors", "get_reweight_config", "get_scales", "is_reweighted", "merge", "restore_reweight_config",
           "reweight", "unreweight"]

# The attribute of the (unwrapped) timm model that holds its reweighting record.
_RECORD = "remem_config"
# torch wrappers that synchronise or shard a model's parameters as they were when the wrapper was built (the
# composable replicate() API names its class DDP; fully_shard and replicate_with_fsdp mix in FSDPModule).
_DISTRIBUTED = frozenset({"DistributedDataParallel", "FullyShardedDataParallel", "FSDPModule", "DDP"})
_SHARDED = frozenset({"FullyShardedDataParallel", "FSDPModule"})
_WRAPPER_NAMES = {"DistributedDataParallel": "DistributedDataParallel", "FullyShardedDataParallel": "FSDP",
                  "FSDPModule": "fully_shard", "DDP": "replicate"}


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
    compose: bool = False,
) -> nn.Module:
    """Scale each transformer block's MLP residual branch, top blocks most (in place).

    Blocks are counted bottom-up in forward order (across all stages). With ``top_k=k`` only the top ``k`` are
    reweighted; the ``i``-th of those from the bottom gets ``alpha ** (i + 1)`` under ``"exponential"`` (our
    default: ReMem's exact schedule is not public), ``alpha`` under ``"constant"``, ``schedule[i]`` for a sequence,
    or ``schedule(i, k)`` for a callable. Other blocks keep factor 1.

    Calling it again replaces the factors (never stacks them); learnable factors are set in place, so an optimizer
    built earlier keeps training them. A merged model's weights hold its factors: reweighting it again is refused
    unless ``compose=True`` (the new factors then multiply them; see :meth:`ReweightConfig.total_factors`). peft
    models work in either order, ``torch.compile`` is seen through, and a model wrapped in DDP / FSDP is refused.

    Args:
        model: A timm vision transformer (any family with a transformer MLP branch), or a peft model of one.
        alpha: The MLP weight, a finite number in (0, 1] (typically 0.8-0.9; > 1 needs ``allow_amplify``).
        schedule: ``"exponential"``, ``"constant"``, a sequence of ``k`` factors, or ``callable(i, k)``.
        learnable: Make each factor a trainable scalar ``nn.Parameter`` (else a buffer).
        top_k: Number of top blocks to reweight (default: all).
        example_inputs: Input for the structure probe (default: built from the model's image size).
        allow_amplify: Accept factors > 1 (amplifying a branch; not ReMem).
        allow_zero: Accept factors of 0 in a ``schedule`` (switching a branch off; not ReMem).
        compose: Accept a model whose weights already hold merged factors: the new factors multiply them.

    Returns:
        The same model, with its MLP branches turned into :class:`ScaledBranch` modules (same paths and objects).

    Raises:
        ConfigError: Bad ``alpha``, ``schedule``, ``top_k`` or flags, a factor outside (0, 1] without the opt-in,
            a call that would replace learnable factors, a merged model without ``compose=True``, a branch module or
            folded weight shared by two blocks, or a model wrapped in DDP / FSDP.
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
    for flag, value in (("learnable", learnable), ("allow_amplify", allow_amplify), ("allow_zero", allow_zero),
                        ("compose", compose)):
        check_bool(flag, value)
    if not custom:
        check_factor("alpha", alpha, allow_zero=False)
        check_factor_range("alpha", alpha, allow_amplify=allow_amplify, allow_zero=False)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise ConfigError(f"top_k must be a positive int or None (all blocks), got {top_k!r}.")
    if custom and not callable(schedule) and not isinstance(schedule, Sequence):
        raise ConfigError(f"schedule must be a string, a sequence of floats or a callable, got {schedule!r}.")
    _check_not_distributed(model, "reweight", _DISTRIBUTED)

    # Validate against the block count before touching anything (a reweighted model keeps its factors on error).
    target = _unwrap(model)
    current = [w for _, w in _unique(_wrappers(target))]
    folded = _folded_before(target, bool(current), compose)
    branches = find_branches(target, "mlp", example_inputs=example_inputs)
    num_blocks = branches[-1].index + 1
    k = num_blocks if top_k is None else top_k
    if not 1 <= k <= num_blocks:
        raise ConfigError(
            f"top_k={top_k} is out of range: {type(target).__name__} has {num_blocks} blocks with an MLP branch; "
            f"use 1 <= top_k <= {num_blocks}, or top_k=None for all."
        )
    if folded and len(folded) != num_blocks:
        raise ConfigError(
            f"cannot compose on {type(target).__name__}: its record of merged factors has {len(folded)} blocks, "
            f"but the model has {num_blocks}; the record belongs to another architecture. Reweight the original "
            "model instead."
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
    check_not_shared(target, branches, chosen)
    # settings only: the factors live in the modules
    record = ReweightConfig(alpha=None if custom else float(alpha), schedule="custom" if custom else schedule,
                            top_k=top_k, learnable=learnable, num_blocks=num_blocks, folded=folded)
    trained = [w for w in current if isinstance(w.remem_scale, nn.Parameter)]
    if trained:
        _check_keeps_parameters(target, trained, current, chosen, learnable)
        with torch.no_grad():
            for w in current:
                w.remem_scale.fill_(factors[w.remem_index - first])
        setattr(target, _RECORD, record)
        return model
    if current:
        for w in current:
            unscale(w)
        branches = find_branches(target, "mlp", example_inputs=example_inputs)
        chosen = [b for b in branches if b.index >= first]
    done: set[int] = set()
    for b in chosen:
        if id(b.module) not in done:  # CoaT registers one Mlp under several names
            done.add(id(b.module))
            ScaledBranch(b.module, factors[b.index - first], learnable, b.columns, b.fold_path, b.index)
    setattr(target, _RECORD, record)
    return model


def _folded_before(target: nn.Module, wrapped: bool, compose: bool) -> list[float]:
    """The factors earlier merges left in the weights, per block (``[]``: none); refused without ``compose``."""
    record = _record(target)
    if record is None:
        return []
    if wrapped:
        earlier = record.folded  # a reweighting composed before: its folded part stays in the weights
    elif record.merged:
        earlier = record.total_factors()
    else:
        earlier = []
    if not any(f != 1.0 for f in earlier):
        return []
    if not compose:
        raise ConfigError(
            f"{type(target).__name__} was reweighted and merged before: its weights already hold the factors "
            f"{_floats(earlier)} (one per block, bottom-up), so reweighting it again would multiply the new factors "
            "with them. Pass compose=True to reweight to do that on purpose (get_reweight_config(model) then reports "
            "both, and total_factors() their product), or keep the original weights: timm_remem.unreweight(model) "
            "before merging gives them back."
        )
    return list(earlier)


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


def _unique(found: list[tuple[str, ScaledBranch]]) -> list[tuple[str, ScaledBranch]]:
    """Each wrapper in ``found`` once, with its first path (CoaT registers one Mlp under several names)."""
    first: dict[int, tuple[str, ScaledBranch]] = {}
    for path, w in found:
        first.setdefault(id(w), (path, w))
    return list(first.values())


def _wrappers(model: nn.Module) -> list[tuple[str, ScaledBranch]]:
    return [(p, m) for p, m in model.named_modules(remove_duplicate=False) if isinstance(m, ScaledBranch)]


def _record(target: nn.Module) -> ReweightConfig | None:
    record = target.__dict__.get(_RECORD)
    return record if isinstance(record, ReweightConfig) else None


def _torch_classes(module: nn.Module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__ if c.__module__.split(".")[0] == "torch"}


def _unwrap(model: nn.Module) -> nn.Module:
    """The timm model inside peft, ``torch.compile``, ``DataParallel`` / ``DistributedDataParallel`` and FSDP
    wrappers (nested in any order)."""
    for _ in range(16):
        model = unwrap_peft(model)
        names = _torch_classes(model)
        inner = None
        if "OptimizedModule" in names:
            inner = model._modules.get("_orig_mod")
        elif names & {"DataParallel", "DistributedDataParallel"}:
            inner = model._modules.get("module")
        elif "FullyShardedDataParallel" in names:
            inner = model._modules.get("_fsdp_wrapped_module")
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def _check_not_distributed(model: nn.Module, action: str, kinds: frozenset[str]) -> None:
    """Refuse a model that is, or holds anywhere, a wrapper of ``kinds`` (DDP, FSDP, fully_shard, replicate)."""
    for path, m in model.named_modules():
        hit = sorted(_torch_classes(m) & kinds)
        if not hit:
            continue
        where = "it is" if not path else f"its submodule {path!r} is"
        wrapped = f"{where} wrapped for distributed training ({_WRAPPER_NAMES[hit[0]]})"
        if action == "reweight":
            raise ConfigError(
                f"cannot reweight {type(model).__name__}: {wrapped}, and the wrapper fixed the parameters it "
                "synchronises or shards when it was built, so factors added now would not be kept in step across "
                "processes (learnable ones would drift apart between replicas without an error). Reweight before "
                "wrapping: timm_remem.reweight(model, ...), then DistributedDataParallel(model) or fully_shard(model)."
            )
        raise ConfigError(
            f"cannot {action} {type(model).__name__}: {wrapped}, whose parameters are sharded or flattened, so "
            "the factors cannot be folded into them in place. Gather the full state dict "
            "(torch.distributed.checkpoint.state_dict.get_model_state_dict with full_state_dict=True), load it into "
            f"an unwrapped, reweighted copy of the model, and {action} that."
        )


def is_reweighted(model: nn.Module) -> bool:
    """Whether ``model`` holds any :class:`ScaledBranch` wrapper.

    Example:
        >>> import timm, timm_remem
        >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
        >>> timm_remem.is_reweighted(model), timm_remem.is_reweighted(timm_remem.reweight(model))
        (False, True)
    """
    return any(isinstance(m, ScaledBranch) for m in _unwrap(model).modules())


def _require_wrappers(model: nn.Module, action: str) -> list[tuple[str, ScaledBranch]]:
    check_model(model)
    _check_not_distributed(model, action, _SHARDED)
    model = _unwrap(model)
    check_no_bypass(model)
    found = _wrappers(model)
    if found:
        return found
    record = _record(model)
    if record is not None and record.merged:
        hint = " It was already merged: its factors are in the weights."
    else:
        hint = " Call timm_remem.reweight(model, alpha=...) first."
    raise NotReweightedError(f"cannot {action} {type(model).__name__}: it is not reweighted.{hint}")


def check_factors(model: nn.Module) -> None:
    """Refuse a reweighted model whose factors, or the weights of its scaled branches, are NaN or infinite.

    Every merge and export runs it first (:func:`merge`, :func:`get_reweight_config`, hence ``save_pretrained``). A
    model without wrappers passes.

    Raises:
        TrainingError: Naming the branch (and the tensor) that is not finite; nothing was changed.

    Example:
        >>> import timm, timm_remem, torch
        >>> model = timm_remem.reweight(timm.create_model("test_vit", pretrained=False, img_size=32), top_k=1)
        >>> check_factors(model)
        >>> with torch.no_grad():
        ...     _ = model.blocks[5].mlp.remem_scale.fill_(float("nan"))
        >>> check_factors(model)
        Traceback (most recent call last):
        ...
        timm_remem.errors.TrainingError: the factor of the MLP branch blocks.5.mlp (block 5) is nan: non-finite \
factors are never merged, exported or reported, and nothing was changed. ...
    """
    check_model(model)
    for path, w in _unique(_wrappers(_unwrap(model))):
        scale = w.remem_scale.detach()
        if not scale.is_meta and not torch.isfinite(scale).all():
            raise TrainingError(
                f"the factor of the MLP branch {path} (block {w.remem_index}) is {float(scale):g}: non-finite factors "
                "are never merged, exported or reported, and nothing was changed. A training run that diverged "
                "leaves them: resume from an earlier checkpoint, or set the factors again with "
                "timm_remem.reweight(model, ...)."
            )
        for name, t in itertools.chain(w.named_parameters(), w.named_buffers()):
            if t.is_floating_point() and not t.is_meta and not torch.isfinite(t.detach()).all():
                raise TrainingError(
                    f"the MLP branch {path} (block {w.remem_index}) holds NaN or infinite weights ({path}.{name}): "
                    "its factor is never merged or exported with them, and nothing was changed. A training run that "
                    "diverged leaves them: resume from an earlier checkpoint."
                )


def merge(model: nn.Module) -> nn.Module:
    """Fold the factors into the weights exactly and take every scale off (in place).

    The result is a plain timm model whose ``state_dict()`` loads with ``strict=True`` into a fresh
    ``timm.create_model`` and reproduces the reweighted outputs (the product is taken in fp64 and cast back). The
    settings stay readable through :func:`get_reweight_config` (``merged=True``). On a peft model the factor goes
    into the LoRA layer a branch ends in (base weights and every ``lora_B``). Everything is checked first: on any
    error below, nothing was changed.

    Raises:
        NotReweightedError: The model holds no wrapper (never reweighted, or merged already).
        UnsupportedModelError: A branch ends in a layer without an affine weight.
        TrainingError: A factor or a branch weight is NaN or infinite.
        ConfigError: A tensor a factor folds into is shared with another layer, the branches of one block hold
            different factors, or the model is sharded by FSDP.

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
    target = _unwrap(model)
    unique = [w for _, w in _unique(found)]
    check_factors(target)
    for w in unique:  # check everything before changing anything
        if w.remem_columns is None:
            w.fold_target()
        else:
            w._fold_tensors()
    check_not_shared(target, _branches_of(found))
    config = _report(target, found)  # the factors as folded (learnable ones may have trained)
    for w in unique:
        w.fold()
        unscale(w)
    if config is not None:
        setattr(target, _RECORD, dataclasses.replace(config, merged=True))
    return model


def _branches_of(found: list[tuple[str, ScaledBranch]]) -> list[Branch]:
    paths: dict[int, list[str]] = {}
    for path, w in found:
        paths.setdefault(id(w), []).append(path)
    return [Branch(w.remem_index, paths[id(w)][0], w, "", tuple(paths[id(w)]), w.remem_columns, w.remem_fold_path)
            for _, w in _unique(found)]


def unreweight(model: nn.Module) -> nn.Module:
    """Remove every wrapper without folding: the original model back, bit for bit (in place).

    After ``reweight(..., compose=True)`` on a merged model, that is the merged model again (``merged=True``).

    Raises:
        NotReweightedError: The model holds no wrapper.

    Example:
        >>> import timm, timm_remem
        >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
        >>> timm_remem.unreweight(timm_remem.reweight(model)) is model
        True
    """
    found = _require_wrappers(model, "unreweight")
    target = _unwrap(model)
    record = _record(target)
    for _, w in _unique(found):
        unscale(w)
    if record is not None and any(f != 1.0 for f in record.folded):
        setattr(target, _RECORD, ReweightConfig(alpha=None, schedule="custom", learnable=record.learnable,
                                                factors=record.folded, num_blocks=record.num_blocks, merged=True,
                                                version=record.version))
    else:
        target.__dict__.pop(_RECORD, None)
    return model


def get_scales(model: nn.Module) -> dict[str, float]:
    """Return ``{branch path: current factor}`` for every reweighted branch, in forward order.

    Read from the :class:`ScaledBranch` modules now (learnable factors as trained); paths are those of the timm
    model inside any peft, ``torch.compile`` or DDP wrapper. Factors folded by an earlier merge are not included.

    Example:
        >>> import timm, timm_remem
        >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
        >>> timm_remem.get_scales(timm_remem.reweight(model, alpha=0.5, schedule="constant", top_k=2))
        {'blocks.4.mlp': 0.5, 'blocks.5.mlp': 0.5}
    """
    check_model(model)
    model = _unwrap(model)
    check_no_bypass(model)
    found = sorted(_wrappers(model), key=lambda item: item[1].remem_index)  # stable: paths in module order
    return {path: float(w.remem_scale.detach()) for path, w in found}


def get_reweight_config(model: nn.Module) -> ReweightConfig | None:
    """Return what the model's reweighting is now, as a new :class:`ReweightConfig`, or ``None`` if it has none.

    The factors are read from the :class:`ScaledBranch` modules, the settings from the record ``reweight`` left
    (checked against the modules); on a merged model, the record of what ``merge`` folded (``merged=True``).

    Raises:
        TrainingError: A factor or a branch weight is NaN or infinite (see :func:`check_factors`).
        ConfigError: The wrapped blocks are not the ones the record names (a wrapper added or removed by hand), or
            the parallel branches of one block hold different factors (one factor per block cannot report them).

    Example:
        >>> import timm, timm_remem
        >>> model = timm_remem.reweight(timm.create_model("test_vit", pretrained=False, img_size=32), top_k=2)
        >>> config = timm_remem.get_reweight_config(model)
        >>> config.num_blocks, config.top_k, config.merged
        (6, 2, False)
    """
    check_model(model)
    target = _unwrap(model)
    found = _wrappers(target)
    if found:
        check_factors(target)
    return _report(target, found)


def _report(target: nn.Module, found: list[tuple[str, ScaledBranch]]) -> ReweightConfig | None:
    """The config of ``target`` now: settings from its record, factors from its wrappers ``found``."""
    record = _record(target)
    if record is None:
        return None  # no record: never reweighted (or ScaledBranch applied by hand)
    name = type(target).__name__
    if not found:
        if not record.merged:
            raise ConfigError(
                f"the reweighting record of {name} says it is reweighted, but it holds no ScaledBranch: the wrappers "
                "were removed by hand (unscale). Call timm_remem.reweight(model, ...) again, or "
                "timm_remem.unreweight(model) next time (it removes the record too)."
            )
        return dataclasses.replace(record)
    by_block: dict[int, dict[str, float]] = {}  # block -> {path of each wrapper: its factor}
    for path, w in _unique(found):
        by_block.setdefault(w.remem_index, {})[path] = float(w.remem_scale.detach())
    for index, values in sorted(by_block.items()):
        if len(set(values.values())) > 1:
            shown = ", ".join(f"{p}={f:g}" for p, f in values.items())
            raise ConfigError(
                f"the parallel MLP branches of block {index} of {name} hold different factors ({shown}), and a "
                "reweighting record has one factor per block, so it cannot report them (nor merge record them). "
                "Set one factor per block in place with timm_remem.reweight(model, schedule=[...], "
                "learnable=True) (same top_k), or read each branch's factor with timm_remem.get_scales(model)."
            )
    n = record.num_blocks
    wrapped = sorted(by_block)
    expected = list(range(n - (record.top_k or n), n))
    if n and wrapped != expected:
        raise ConfigError(
            f"the reweighting record of {name} says blocks {expected} are reweighted (top_k={record.top_k}, "
            f"{n} blocks), but its wrappers are on blocks {wrapped}: a wrapper was added or removed by hand. Call "
            "timm_remem.reweight(model, ...) again to set them all, or timm_remem.unreweight(model)."
        )
    learnable = all(isinstance(w.remem_scale, nn.Parameter) for _, w in found)
    factors = [next(iter(by_block[i].values())) for i in wrapped]
    return dataclasses.replace(record, learnable=learnable, factors=factors, merged=False, folded=list(record.folded))


def restore_reweight_config(model: nn.Module, config: ReweightConfig) -> ReweightConfig:
    """Give a loaded model the reweighting record its files kept, checked against the model; return the report.

    For loaders: ``config`` is the ``remem`` block of a ``config.json`` read back, a record, never an instruction.
    On a reweighted model its ``factors``, ``learnable``, ``top_k`` and ``num_blocks`` are compared with the loaded
    model; a ``UserWarning`` names each difference and the model wins (``alpha``, ``schedule`` and ``folded`` are
    kept as recorded). On a model without wrappers the record must say ``merged=True`` and is kept as it is.

    Raises:
        ConfigError: ``config`` is not a :class:`ReweightConfig`, or it says the factors were kept separate while
            the model holds no wrapper (the loader forgot to reweight before loading the weights).
        TrainingError: A loaded factor or branch weight is NaN or infinite (see :func:`check_factors`).

    Example:
        >>> import timm, timm_remem, warnings
        >>> from timm_remem.reweighting import ReweightConfig, restore_reweight_config
        >>> model = timm_remem.reweight(timm.create_model("test_vit", pretrained=False, img_size=32), 0.5, top_k=1)
        >>> edited = ReweightConfig(alpha=0.5, top_k=1, factors=[0.9], num_blocks=6)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     restore_reweight_config(model, edited).factors
        [0.5]
        >>> "factors [0.9] in the record, [0.5] in the model" in str(caught[0].message)
        True
    """
    check_model(model)
    if not isinstance(config, ReweightConfig):
        raise ConfigError(f"restore_reweight_config needs a ReweightConfig, got {type(config).__name__}.")
    target = _unwrap(model)
    name = type(target).__name__
    found = _wrappers(target)
    if not found:
        if not config.merged:
            raise ConfigError(
                f"the reweighting record says the factors of {name} are kept separate (merged=False), but it holds "
                "no ScaledBranch: reweight it as recorded (timm_remem.reweight(model, schedule=record.factors, "
                "top_k=...)) before loading its weights, then restore the record."
            )
        setattr(target, _RECORD, dataclasses.replace(config))
        return dataclasses.replace(config)
    check_factors(target)
    num_blocks = find_branches(target, "mlp")[-1].index + 1  # established by the probe, not by any record
    by_block: dict[int, float] = {}
    for _, w in found:
        by_block.setdefault(w.remem_index, float(w.remem_scale.detach()))
    wrapped = sorted(by_block)
    top_k = None if len(wrapped) == num_blocks else len(wrapped)
    live = [by_block[i] for i in wrapped]
    learnable = all(isinstance(w.remem_scale, nn.Parameter) for _, w in found)
    problems = []
    if config.num_blocks != num_blocks:
        problems.append(f"num_blocks {config.num_blocks} in the record, {num_blocks} in the model")
    if (config.top_k or config.num_blocks) != (top_k or num_blocks):
        problems.append(f"top_k {config.top_k} in the record, {top_k} in the model (blocks {wrapped})")
    same = len(config.factors) == len(live) and all(
        math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) for a, b in zip(config.factors, live, strict=False))
    if not same:
        problems.append(f"factors {_floats(config.factors)} in the record, {_floats(live)} in the model")
    if config.learnable != learnable:
        problems.append(f"learnable={config.learnable} in the record, {learnable} in the model")
    if config.merged:
        problems.append("merged=True in the record, but the model holds its factors in ScaledBranch wrappers")
    if problems:
        warnings.warn(
            f"the reweighting record read for {name} disagrees with the model: {'; '.join(problems)}. The record "
            "(the remem block of config.json) is what was saved, not an instruction: the model's own factors (its "
            "remem_scale tensors) are what it computes and what is reported. To change the factors, load the model, "
            "call timm_remem.reweight(model, ...) and save it again.",
            UserWarning, stacklevel=2,
        )
    folded = config.folded if len(config.folded) in (0, num_blocks) else []
    setattr(target, _RECORD, ReweightConfig(alpha=config.alpha, schedule=config.schedule, top_k=top_k,
                                            learnable=learnable, num_blocks=num_blocks, folded=folded,
                                            version=config.version))
    return _report(target, found)


def _floats(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"
