"""LoRA teachers: peft adapters on timm vision transformers, trained with ReMem and folded back into plain timm.

The one home of peft in timm-remem. Optional: needs peft (``pip install timm-remem[lora]``), imported only by
:func:`apply_lora`; everything else recognises peft objects without importing it (``timm_remem/_peft.py``).

Example:
    >>> import timm, timm_remem
    >>> from timm_remem.lora import apply_lora, merge_lora
    >>> teacher = timm_remem.reweight(apply_lora(timm.create_model("test_vit", pretrained=False), rank=4), 0.85)
    >>> plain = merge_lora(teacher)
    >>> _ = timm.create_model("test_vit", pretrained=False).load_state_dict(plain.state_dict(), strict=True)
"""

from .adapters import PeftMissingError, apply_lora, is_lora, linear_layer_names, lora_config, trainable_parameters
from .config import LORA_TARGETS, check_lora_settings
from .merge import merge_lora, merged_copy
from .save import save_adapter

__all__ = ["LORA_TARGETS", "PeftMissingError", "apply_lora", "check_lora_settings", "is_lora", "linear_layer_names",
           "lora_config", "merge_lora", "merged_copy", "save_adapter", "trainable_parameters"]
