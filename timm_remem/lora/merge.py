"""Fold LoRA adapters (and then the reweighting factors) back into the weights: :func:`merge_lora`, the one merge.

Injected adapters (:func:`~timm_remem.lora.apply_lora`) have no peft tuner to call ``merge_and_unload`` on, so each
layer is merged by peft (``merge(safe_merge=True)``) and replaced by its ``get_base_layer()``, as that loop does.
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


def merge_lora(model: nn.Module, *, factors: bool = True) -> nn.Module:
    """Fold every LoRA adapter into its layer's weights with peft, then (``factors=True``) the reweighting factors.

    In place. The result's ``state_dict()`` loads with ``strict=True`` into ``timm.create_model(same name and
    kwargs)`` and reproduces the adapted outputs; parameters keep their ``requires_grad`` flags.

    Args:
        model: A model adapted with :func:`apply_lora` (or peft), reweighted or not.
        factors: Also fold the reweighting factors (:func:`timm_remem.merge`) when the model is reweighted.

    Returns:
        The same model, merged (for a ``peft.PeftModel``: the timm model inside it).

    Raises:
        ConfigError: The model holds no peft adapter.
        TrainingError: An adapter, a reweighting factor or a scaled branch's weight is NaN or infinite (nothing is
            folded then).
        UnsupportedModelError: A reweighting factor cannot be folded (see :func:`timm_remem.merge`).

    Example:
        >>> import timm, timm_remem, torch
        >>> from timm_remem.lora import apply_lora
        >>> vit = timm_remem.reweight(timm.create_model("test_vit", pretrained=False, img_size=32), 0.8)
        >>> model = apply_lora(vit, rank=2).eval()
        >>> with torch.no_grad():
        ...     _ = model.blocks[0].mlp.fc1.lora_B.default.weight.fill_(0.01)
        >>> x = torch.randn(1, 3, 32, 32)
        >>> y = model(x)
        >>> plain = merge_lora(model)
        >>> timm_remem.is_reweighted(plain), timm_remem.get_reweight_config(plain).merged
        (False, True)
        >>> type(plain.blocks[0].mlp.fc1).__name__, torch.allclose(plain(x), y, atol=1e-5)
        ('Linear', True)
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
            if path:
                model.set_submodule(path, m.get_base_layer())
        if is_tuner_layer(model):  # a bare LoRA layer was given: its base layer is the merged model
            model = model.get_base_layer()
        if hasattr(model, "peft_config"):
            del model.peft_config
    if factors and is_reweighted(model):
        merge_factors(model)
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its adapters folded by :func:`merge_lora` (factors left in place).

    Example:
        >>> import timm
        >>> from timm_remem.lora import apply_lora, is_lora
        >>> model = apply_lora(timm.create_model("test_vit", pretrained=False), rank=2)
        >>> is_lora(merged_copy(model)), is_lora(model)
        (False, True)
    """
    return merge_lora(copy.deepcopy(model), factors=False)
