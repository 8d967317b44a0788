"""peft objects recognised without importing peft (optional): by duck typing, a class defined in the ``peft``
package plus the attribute that makes it what it is. Only :func:`timm_remem.lora.apply_lora` imports peft.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import UnsupportedModelError

__all__ = ["base_of", "is_peft_model", "is_tuner_layer", "lora_parts", "unwrap_peft"]


def _peft_classes(obj: Any) -> set[str]:
    """Names of the classes in ``type(obj)``'s MRO that peft defines (empty for anything else)."""
    return {c.__name__ for c in type(obj).__mro__ if c.__module__.split(".")[0] == "peft"}


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (what ``peft.get_peft_model`` returns), of any task subclass."""
    return "PeftModel" in _peft_classes(model)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The timm model inside peft wrappers (``PeftModel.base_model.model``, ``LoraModel.model``); else ``model``."""
    for _ in range(8):  # a PeftModel holds a tuner, which holds the model: two levels; a bound against odd nesting
        classes = _peft_classes(model)
        child = "base_model" if "PeftModel" in classes else "model" if "BaseTuner" in classes else None
        inner = model._modules.get(child) if child else None
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def is_tuner_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a peft adapter layer: a peft class holding a ``base_layer`` (peft.tuners.lora.Linear)."""
    return bool(_peft_classes(module)) and isinstance(module._modules.get("base_layer"), nn.Module)


def base_of(module: nn.Module) -> nn.Module:
    """The innermost ``base_layer`` of a (possibly nested) adapter layer; ``module`` itself otherwise."""
    while is_tuner_layer(module):
        module = module._modules["base_layer"]
    return module


def lora_parts(layer: nn.Module, what: str) -> tuple[nn.Module, list[nn.Module], list[nn.Module]]:
    """``(base layer, lora_A layers, lora_B layers)`` of a plain LoRA layer, for a reweighting factor to fold into.

    Its output is linear in the base weight and bias and every ``lora_B`` together, so the factor folds in exactly.

    Raises:
        UnsupportedModelError: ``layer`` is another adapter type, or a LoRA variant (DoRA) whose output is not linear
            in its weights; ``what`` names the branch in the message.
    """
    parts = layer._modules
    lora_a, lora_b = parts.get("lora_A"), parts.get("lora_B")
    magnitude = parts.get("lora_magnitude_vector")
    variants = getattr(layer, "lora_variant", None)
    dora = getattr(layer, "use_dora", None)
    has_variant = (
        (isinstance(magnitude, nn.ModuleDict) and len(magnitude) > 0)
        or (isinstance(variants, dict) and bool(variants))
        or (isinstance(dora, dict) and any(dora.values()))
    )
    if (not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict) or has_variant
            or is_tuner_layer(parts["base_layer"])):
        raise UnsupportedModelError(
            f"cannot fold the factor of {what} into its peft layer {type(layer).__name__}: only plain LoRA layers "
            "(no DoRA, no other adapter type) are folded in place. Merge the adapter first "
            "(model = peft_model.merge_and_unload()), then call timm_remem.merge(model)."
        )
    return parts["base_layer"], list(lora_a.values()), list(lora_b.values())
