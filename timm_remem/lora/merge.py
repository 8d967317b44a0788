"""Fold LoRA adapters (and then the reweighting factors) back into the weights: :func:`merge_lora`.

Each adapter is folded by peft's own layer merge: ``LoraLayer.merge(safe_merge=True)``, then the layer is replaced
by ``get_base_layer()``, the very loop that peft's ``merge_and_unload`` runs over a model's adapter layers (that
method belongs to the tuner object, which ``inject_adapter_in_model`` does not return; running the loop here also
covers a module registered at two paths). The factors are then folded by :func:`timm_remem.merge`, so the result is
a plain timm model.

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

from torch import nn

from ..errors import ConfigError, TrainingError
from ..reweighting import check_factors, is_reweighted
from ..reweighting import merge as merge_factors
from ._peft import import_peft
from .adapters import is_lora

__all__ = ["merge_lora"]


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def merge_lora(model: nn.Module, *, factors: bool = True) -> nn.Module:
    """Fold every LoRA adapter into its layer's weights with peft, then (``factors=True``) the reweighting factors.

    In place. Afterwards the model holds neither adapters nor (with ``factors=True``) reweighting wrappers: its
    ``state_dict()`` loads with ``strict=True`` into ``timm.create_model(same name and kwargs)`` and reproduces the
    adapted, reweighted outputs (up to fp32 rounding of ``W + (alpha / r) B A``). Parameters keep their
    ``requires_grad`` flags (base weights stay frozen; call ``model.requires_grad_(True)`` to train them all).

    Args:
        model: A model adapted with :func:`apply_lora` (or ``peft.inject_adapter_in_model``), reweighted or not.
        factors: Also fold the reweighting factors (:func:`timm_remem.merge`) when the model is reweighted.

    Returns:
        The same model, merged.

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
    layer_type = import_peft().tuners.tuners_utils.BaseTunerLayer
    found = [(p, m) for p, m in model.named_modules(remove_duplicate=False) if isinstance(m, layer_type)]
    unique = list({id(m): m for _, m in found}.values())
    broken = [p for p, m in found if not all(t.isfinite().all() for t in m.parameters())]
    if broken:
        raise TrainingError(f"merge_lora: the adapters of {sorted(set(broken))} hold NaN or infinite weights; "
                            "nothing was merged. Resume from an earlier checkpoint")
    if factors and is_reweighted(model):
        check_factors(model)  # before peft folds anything: a non-finite factor leaves the model as it was
    for m in unique:
        m.merge(safe_merge=True)
    for path, m in found:
        _set_submodule(model, path, m.get_base_layer())
    if "peft_config" in model.__dict__ or hasattr(model, "peft_config"):
        del model.peft_config
    if factors and is_reweighted(model):
        merge_factors(model)
    return model
