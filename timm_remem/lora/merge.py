"""Fold LoRA adapters (and then the reweighting factors) back into the weights: :func:`merge_lora`, the one merge
path (training's exports and the hub's ``save_pretrained``, through :func:`merged_copy`, both use it).

A ``peft.PeftModel`` (or a bare tuner such as ``LoraModel``) is merged by its own ``merge_and_unload(safe_merge=True)``,
which also unwraps ``modules_to_save`` copies. Adapters injected into a timm model (``inject_adapter_in_model``, as
:func:`~timm_remem.lora.apply_lora` does) have no tuner object to call it on, so each one is folded by peft's own
layer merge, ``merge(safe_merge=True)``, and replaced by ``get_base_layer()``: the loop ``merge_and_unload`` runs
(here it also covers a module registered at two paths). The factors are then folded by :func:`timm_remem.merge`, so
the result is a plain timm model.

Example:
    >>> import timm, torch
    >>> from timm_remem.lora import apply_lora, merge_lora
    >>> model = apply_lora(timm.create_model("test_vit", pretrained=False, img_size=32), rank=4).eval()
    >>> with torch.no_grad():
    ...     _ = model.blocks[0].mlp.fc1.lora_B.default.weight.fill_(0.01)
    >>> x = torch.randn(1, 3, 32, 32)
    >>> y = model(x)
    >>> plain = merge_lora(model)
    >>> type(plain.blocks[0].mlp.fc1).__name__, torch.allclose(plain(x), y, atol=1e-5)
    ('Linear', True)
"""

from __future__ import annotations

import copy

from torch import nn

from .._peft import is_tuner_layer, unwrap_peft
from ..errors import ConfigError, TrainingError
from ..reweighting import check_factors, is_reweighted
from ..reweighting import merge as merge_factors
from .adapters import is_lora

__all__ = ["merge_lora", "merged_copy"]


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def merge_lora(model: nn.Module, *, factors: bool = True) -> nn.Module:
    """Fold every LoRA adapter into its layer's weights with peft, then (``factors=True``) the reweighting factors.

    In place (a ``peft.PeftModel`` gives back the timm model it wraps, as its ``merge_and_unload`` does). Afterwards
    the model holds neither adapters nor (with ``factors=True``) reweighting wrappers: its ``state_dict()`` loads
    with ``strict=True`` into ``timm.create_model(same name and kwargs)`` and reproduces the adapted, reweighted
    outputs (up to fp32 rounding of ``W + (alpha / r) B A``). Parameters keep their ``requires_grad`` flags (base
    weights stay frozen; call ``model.requires_grad_(True)`` to train them all).

    Args:
        model: A model adapted with :func:`apply_lora` (or ``peft.inject_adapter_in_model``, or a
            ``peft.PeftModel``), reweighted or not.
        factors: Also fold the reweighting factors (:func:`timm_remem.merge`) when the model is reweighted.

    Returns:
        The same model, merged (for a peft wrapper: the timm model inside it).

    Raises:
        ConfigError: The model holds no peft adapter.
        TrainingError: An adapter, a reweighting factor or a scaled branch's weight is NaN or infinite (nothing is
            folded then; see :func:`timm_remem.reweighting.check_factors`).
        UnsupportedModelError: A reweighting factor cannot be folded (see :func:`timm_remem.merge`).

    Example:
        >>> import timm, timm_remem
        >>> from timm_remem.lora import apply_lora
        >>> model = apply_lora(timm_remem.reweight(timm.create_model("test_vit", pretrained=False), 0.8), rank=2)
        >>> plain = merge_lora(model)
        >>> timm_remem.is_reweighted(plain), timm_remem.get_reweight_config(plain).merged
        (False, True)
    """
    if not isinstance(model, nn.Module) or not is_lora(model):
        raise ConfigError(f"merge_lora: {type(model).__name__} holds no peft LoRA adapter; nothing to merge (apply "
                          "them with timm_remem.lora.apply_lora)")
    found = [(p, m) for p, m in model.named_modules(remove_duplicate=False) if is_tuner_layer(m)]
    broken = [p for p, m in found if not all(t.isfinite().all() for t in m.parameters())]
    if broken:
        raise TrainingError(f"merge_lora: the adapters of {sorted(set(broken))} hold NaN or infinite weights; "
                            "nothing was merged. Resume from an earlier checkpoint")
    if factors and is_reweighted(model):
        check_factors(model)  # before peft folds anything: a non-finite factor leaves the model as it was
    if unwrap_peft(model) is not model:  # a PeftModel or a tuner: peft's own merge
        model = model.merge_and_unload(safe_merge=True)
    else:
        for m in {id(m): m for _, m in found}.values():
            m.merge(safe_merge=True)
        for path, m in found:
            _set_submodule(model, path, m.get_base_layer())
        if hasattr(model, "peft_config"):
            del model.peft_config
    if factors and is_reweighted(model):
        merge_factors(model)
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its adapters folded by :func:`merge_lora` (factors left in place); ``model`` is
    unchanged. What the hub's ``save_pretrained`` writes for a LoRA teacher (it folds the factors itself).

    Example:
        >>> import timm
        >>> from timm_remem.lora import apply_lora, is_lora
        >>> model = apply_lora(timm.create_model("test_vit", pretrained=False), rank=2)
        >>> is_lora(merged_copy(model)), is_lora(model)
        (False, True)
    """
    return merge_lora(copy.deepcopy(model), factors=False)
