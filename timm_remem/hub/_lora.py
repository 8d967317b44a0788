"""LoRA teachers (timm models adapted with peft): fold the adapters into plain weights, or save the adapter alone.

peft is optional (``pip install timm-remem[lora]``): it is imported only when a model carries peft layers, or when
the adapter alone is asked for.

Example:
    >>> import timm
    >>> from timm_remem.hub._lora import has_adapters
    >>> has_adapters(timm.create_model("test_vit", pretrained=False))
    False
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from types import ModuleType

from torch import nn

from ..errors import ConfigError

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "LORA_INSTALL", "has_adapters", "timm_model_of",
           "merged_copy", "save_adapter"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
LORA_INSTALL = "pip install timm-remem[lora]"


def _peft() -> ModuleType:
    try:
        return importlib.import_module("peft")
    except ImportError:
        raise ImportError(f"LoRA teachers need peft: {LORA_INSTALL}") from None


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` is a peft model or holds peft adapter layers (checked without importing peft)."""
    return any(type(m).__module__.split(".")[0] == "peft" for m in model.modules())


def _is_peft_model(model: nn.Module) -> bool:
    return has_adapters(model) and isinstance(model, _peft().PeftModel)


def timm_model_of(model: nn.Module) -> nn.Module:
    """The timm model inside a ``peft.PeftModel`` (the model itself otherwise)."""
    return model.get_base_model() if _is_peft_model(model) else model


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of the timm model with every adapter folded into its weights by peft (``model`` is unchanged).

    A ``PeftModel`` goes through peft's ``merge_and_unload``; adapters injected into a timm model
    (``peft.inject_adapter_in_model``) are merged layer by layer and replaced by their base layers.
    """
    peft = _peft()
    if isinstance(model, peft.PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    plain = copy.deepcopy(model)
    layer_class = importlib.import_module("peft.tuners.tuners_utils").BaseTunerLayer
    names = [name for name, module in plain.named_modules() if isinstance(module, layer_class)]
    for name in names:
        layer = plain.get_submodule(name)
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent) if parent else plain, child, layer.get_base_layer())
    return plain


def save_adapter(model: nn.Module, folder: Path) -> None:
    """Write the adapter alone in peft's format (``adapter_config.json``, ``adapter_model.safetensors``).

    Refused when the adapter would not hold everything that was trained: a model whose adapters were injected
    without a ``PeftModel`` (``timm_remem.lora.apply_lora``, ``peft.inject_adapter_in_model``), or trained
    parameters outside the adapter (a head trained fully but not in ``LoraConfig(modules_to_save=[...])``).
    """
    if not has_adapters(model) or not _is_peft_model(model):
        raise ConfigError(
            "adapter_only=True needs a peft.PeftModel (a timm model wrapped by peft.get_peft_model), got "
            f"{type(model).__name__}" + (" whose adapters were injected without a PeftModel (e.g. by "
                                         "timm_remem.lora.apply_lora)" if has_adapters(model)
                                         else " without adapters") + ": publish the merged checkpoint "
            "(adapter_only=False, the default) instead."
        )
    outside = [name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name
               and "modules_to_save" not in name and not name.endswith("remem_scale")]
    if outside:
        shown = ", ".join(outside[:4]) + (", ..." if len(outside) > 4 else "")
        raise ConfigError(
            f"adapter_only=True would leave out {len(outside)} trained parameters that are not part of the adapter "
            f"({shown}): peft saves only the adapter and LoraConfig(modules_to_save=[...]). Add those modules to "
            "modules_to_save, or publish the merged checkpoint (adapter_only=False, the default)."
        )
    model.save_pretrained(str(folder), safe_serialization=True)
