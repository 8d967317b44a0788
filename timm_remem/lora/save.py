"""A LoRA teacher's adapter alone, in peft's format: :func:`save_adapter` (the hub's ``adapter_only=True``)."""

from __future__ import annotations

import os

from torch import nn

from .._peft import is_peft_model
from ..errors import ConfigError
from .adapters import is_lora

__all__ = ["save_adapter"]


def save_adapter(model: nn.Module, folder: str | os.PathLike) -> None:
    """Write the adapter alone in peft's format (``adapter_config.json``, ``adapter_model.safetensors``).

    Raises:
        ConfigError: ``model`` is not a ``peft.PeftModel`` with adapters (e.g. injected by
            :func:`~timm_remem.lora.apply_lora`), or trained parameters lie outside the adapter (a head trained
            fully but not in ``LoraConfig(modules_to_save=[...])``).

    Example:
        >>> import tempfile, timm
        >>> try:
        ...     save_adapter(timm.create_model("test_vit", pretrained=False), tempfile.mkdtemp())
        ... except ValueError as e:
        ...     print(str(e)[:43])
        adapter_only=True needs a peft.PeftModel (a
    """
    adapted = is_lora(model)
    if not adapted or not is_peft_model(model):
        how = (" whose adapters were injected without a PeftModel (e.g. by timm_remem.lora.apply_lora)" if adapted
               else " without adapters")
        raise ConfigError(
            "adapter_only=True needs a peft.PeftModel (a timm model wrapped by peft.get_peft_model), got "
            f"{type(model).__name__}{how}: publish the merged checkpoint (adapter_only=False, the default) instead."
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
