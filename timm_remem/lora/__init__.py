"""LoRA teachers: peft adapters on timm vision transformers, trained with ReMem and folded back into plain timm.

Optional: needs peft (``pip install timm-remem[lora]``), imported when a LoRA call is made.

- ``adapters.py``: :func:`apply_lora` (peft's ``LoraConfig`` injected with ``inject_adapter_in_model``; the base
  weights frozen, the head trained fully), :func:`is_lora`, :func:`lora_config`, :func:`linear_layer_names`,
  :func:`trainable_parameters`, :func:`check_lora_settings`, :data:`LORA_TARGETS`.
- ``merge.py``: :func:`merge_lora` (peft's layer merge, then the reweighting factors: a plain timm model).
- ``_peft.py``: the lazy peft import and :class:`PeftMissingError`.

Example:
    >>> import timm, timm_remem
    >>> from timm_remem.lora import apply_lora, merge_lora
    >>> teacher = timm_remem.reweight(apply_lora(timm.create_model("test_vit", pretrained=False), rank=4), 0.85)
    >>> plain = merge_lora(teacher)
    >>> _ = timm.create_model("test_vit", pretrained=False).load_state_dict(plain.state_dict(), strict=True)
"""

from ._peft import PeftMissingError
from .adapters import (
    LORA_TARGETS,
    apply_lora,
    check_lora_settings,
    is_lora,
    linear_layer_names,
    lora_config,
    trainable_parameters,
)
from .merge import merge_lora

__all__ = [
    "LORA_TARGETS",
    "PeftMissingError",
    "apply_lora",
    "check_lora_settings",
    "is_lora",
    "linear_layer_names",
    "lora_config",
    "merge_lora",
    "trainable_parameters",
]
