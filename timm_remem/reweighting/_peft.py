"""Seeing through peft adapters (private to the room), by duck typing: peft is never imported.

A peft wrapper (``PeftModel`` from ``peft.get_peft_model``, or a tuner such as ``LoraModel``) is unwrapped to the
timm model it adapts, so branch paths, factors and the stored config are those of the timm model whichever order
reweighting and LoRA were applied in. A LoRA layer (``peft.tuners.lora.Linear`` and friends: a ``base_layer`` plus
``lora_A`` / ``lora_B``) computes ``base_layer(x) + sum_a scaling_a * lora_B[a](lora_A[a](x))``, which is linear in
(base weight, base bias, every ``lora_B`` weight and bias) jointly: scaling all of them scales the output, so a factor
folds into an adapted layer exactly. Variants whose output is not linear in those (DoRA) are refused.

Example:
    >>> import torch
    >>> from timm_remem.reweighting._peft import is_tuner_layer, unwrap_peft
    >>> layer = torch.nn.Linear(2, 2)
    >>> unwrap_peft(layer) is layer, is_tuner_layer(layer)
    (True, False)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UnsupportedModelError

__all__ = ["is_tuner_layer", "lora_parts", "unwrap_peft"]


def _peft_classes(obj: Any) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__ if c.__module__.split(".")[0] == "peft"}


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The timm model inside a peft wrapper (``PeftModel.base_model.model``, ``LoraModel.model``); else ``model``."""
    for _ in range(8):
        names = _peft_classes(model)
        inner = None
        if "PeftModel" in names:
            inner = model._modules.get("base_model")
        elif "BaseTuner" in names:
            inner = model._modules.get("model")
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def is_tuner_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a peft adapter layer (it wraps a ``base_layer``, like ``peft.tuners.lora.Linear``)."""
    return bool(_peft_classes(module)) and isinstance(module._modules.get("base_layer"), nn.Module)


def base_of(module: nn.Module) -> nn.Module:
    """The innermost ``base_layer`` of a (possibly nested) adapter layer; ``module`` itself otherwise."""
    while is_tuner_layer(module):
        module = module._modules["base_layer"]
    return module


def lora_parts(layer: nn.Module, what: str) -> tuple[nn.Module, list[nn.Module], list[nn.Module]]:
    """``(base layer, lora_A layers, lora_B layers)`` of a plain LoRA layer, to fold a factor into.

    Raises:
        UnsupportedModelError: ``layer`` is another adapter type or a LoRA variant (DoRA) whose output is not linear
            in its weights; ``what`` names the branch.
    """
    lora_a, lora_b = layer._modules.get("lora_A"), layer._modules.get("lora_B")
    magnitude = layer._modules.get("lora_magnitude_vector")
    variants = getattr(layer, "lora_variant", None)
    dora = getattr(layer, "use_dora", None)
    plain = (
        isinstance(lora_a, nn.ModuleDict) and isinstance(lora_b, nn.ModuleDict)
        and not (isinstance(magnitude, nn.ModuleDict) and len(magnitude))
        and not (isinstance(variants, dict) and variants)
        and not (isinstance(dora, dict) and any(dora.values()))
        and not is_tuner_layer(layer._modules["base_layer"])
    )
    if not plain:
        raise UnsupportedModelError(
            f"cannot fold the factor of {what} into its peft layer {type(layer).__name__}: only plain LoRA layers "
            "(no DoRA, no other adapter type) are folded in place. Merge the adapter first "
            "(model = peft_model.merge_and_unload()), then call timm_remem.merge(model)."
        )
    return layer._modules["base_layer"], list(lora_a.values()), list(lora_b.values())
