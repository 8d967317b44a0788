"""LoRA adapters on a timm model with peft, and the one import of peft (:class:`PeftMissingError`).

The adapters are injected in place (``peft.inject_adapter_in_model``), so the model stays the timm model it was
(same class, attributes and state-dict keys outside the adapted layers).
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .._models import model_device, model_input_size
from .._peft import is_tuner_layer
from ..errors import ConfigError, UnsupportedModelError
from ..reweighting import ScaledBranch, find_branches
from .config import LORA_TARGETS, check_lora_settings

__all__ = ["PeftMissingError", "apply_lora", "is_lora", "linear_layer_names", "lora_config", "trainable_parameters"]

ADAPTER = "default"  # peft's adapter name


class PeftMissingError(ConfigError, ImportError):
    """peft is not installed (an ``ImportError`` and a ``ConfigError``: the CLI prints one line, exit status 2)."""


def _import_peft() -> ModuleType:
    """The ``peft`` module, or :class:`PeftMissingError` naming the extra to install (the one import of peft)."""
    try:
        return importlib.import_module("peft")
    except ImportError as e:
        raise PeftMissingError("LoRA fine-tuning (lora_rank / --lora-rank) needs peft, which is not installed: "
                               "pip install timm-remem[lora]") from e


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` (a timm model, or a ``peft.PeftModel`` of one) holds peft adapter layers (peft not imported).

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", pretrained=False)
        >>> is_lora(model), is_lora(apply_lora(model, rank=2))
        (False, True)
    """
    return any(is_tuner_layer(m) for m in model.modules())


def lora_config(model: nn.Module) -> Any:
    """The peft ``LoraConfig`` that :func:`apply_lora` injected into ``model``, or None.

    Example:
        >>> import timm
        >>> model = apply_lora(timm.create_model("test_vit", pretrained=False), rank=2, alpha=4)
        >>> config = lora_config(model)
        >>> config.r, config.lora_alpha
        (2, 4.0)
    """
    configs = getattr(model, "peft_config", None)
    return configs.get(ADAPTER) if isinstance(configs, dict) and is_lora(model) else None


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements that require grad (each shared parameter counted once).

    Example:
        >>> trainable_parameters(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _classifier_modules(model: nn.Module) -> set[int]:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    return {id(m) for m in head.modules()} if isinstance(head, nn.Module) else set()


def linear_layer_names(model: nn.Module) -> list[str]:
    """Paths of the ``nn.Linear`` layers that may get adapters: every one except the classifier head.

    Example:
        >>> import timm
        >>> linear_layer_names(timm.create_model("test_vit", pretrained=False))[:2]
        ['blocks.0.attn.qkv', 'blocks.0.attn.proj']
    """
    head = _classifier_modules(model)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in head]


def _resolve_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The full paths of the Linear layers ``targets`` name (a path, or its last parts such as ``fc1``)."""
    linear = linear_layer_names(model)
    head = {n for n, m in model.named_modules() if id(m) in _classifier_modules(model) and n}
    chosen: dict[str, None] = {}
    missing = []
    for t in targets:
        found = [n for n in linear if n == t or n.endswith("." + t)]
        if not found:
            missing.append(t)
        chosen.update(dict.fromkeys(found))
    if missing:
        kind = type(model).__name__
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
        heads = [t for t in missing if any(h == t or h.endswith("." + t) for h in head)]
        if heads:
            raise ConfigError(f"lora_targets {heads} name the classifier head of {kind}, which trains fully and "
                              f"takes no adapter; drop {heads} from lora_targets")
        if not leaves:
            raise UnsupportedModelError(f"{kind} has no Linear layer outside its head: LoRA cannot adapt it")
        close = sorted({c for t in missing for c in difflib.get_close_matches(t.rsplit(".", 1)[-1], leaves, n=3)})
        hint = f"; did you mean {close}?" if close else ""
        raise ConfigError(
            f"lora_targets {missing} match no Linear layer of {kind}; its Linear layers are named {leaves} "
            f"(e.g. {linear[0]!r}){hint}. Pass some of those names (--lora-targets {','.join(LORA_TARGETS)})"
        )
    return list(chosen)


def _uncalled(model: nn.Module, names: Sequence[str], example_inputs: torch.Tensor | None) -> list[str]:
    """The layers among ``names`` whose forward the model never calls (it reads their ``weight`` directly, as EVA,
    BEiT and Swin V2 attention do with ``F.linear(x, self.qkv.weight, qkv_bias)``): an adapter there would be
    bypassed by the forward pass but folded in by the merge. One eval-mode pass at batch 1; modes are restored."""
    called: set[str] = set()
    handles = [model.get_submodule(n).register_forward_hook(lambda *_, n=n: called.add(n)) for n in names]
    modes = [(m, m.training) for m in model.modules()]
    if example_inputs is None:
        example_inputs = torch.zeros(1, *model_input_size(model), device=model_device(model))
    try:
        model.eval()
        with torch.no_grad():
            model(example_inputs)
    except Exception as e:  # noqa: BLE001 - any failure of the user's model becomes one clear error
        raise UnsupportedModelError(
            f"apply_lora could not run {type(model).__name__} on an input of shape {tuple(example_inputs.shape)} "
            f"({type(e).__name__}: {e}); pass example_inputs=torch.randn(1, C, H, W) of the size it takes"
        ) from e
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return [n for n in names if n not in called]


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    *,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: Sequence[str] | None = None,
    example_inputs: torch.Tensor | None = None,
) -> nn.Module:
    """Add peft LoRA adapters to a timm vision transformer's Linear layers (in place) and freeze its base weights.

    The adapters (``peft.LoraConfig``, ``B = 0``: the outputs are unchanged until it trains) go on every Linear layer
    whose path is, or ends with, one of ``targets``. A layer the forward reads by weight without calling it (EVA-02,
    BEiT and Swin V2 attention) would ignore its adapter, so it is never adapted. Afterwards only the adapters, the
    classifier head and learnable reweighting factors require grad. Works before or after
    :func:`timm_remem.reweight`; :func:`merge_lora` folds it all back into a plain timm model.

    Args:
        model: A timm model with transformer MLP branches (ViT, DeiT, BEiT, EVA-02, Swin, ...).
        rank: LoRA rank ``r``.
        alpha: LoRA scaling numerator (the update is scaled by ``alpha / rank``); None: equal to the rank.
        dropout: Dropout on the LoRA path, in [0, 1).
        targets: Linear-layer names (or path suffixes such as ``"mlp.fc1"``); None: :data:`LORA_TARGETS`, less
            the layers the model's forward never calls, with a warning naming them.
        example_inputs: Input of the probe passes (batch 1 is enough); default: built from the model's image size.

    Returns:
        The same model, with peft LoRA layers in place of the targeted Linear layers.

    Raises:
        ConfigError: A bad setting, a target that matches no Linear layer (the message lists the model's names),
            the classifier or a layer the forward never calls named as a target, a model that holds adapters
            already, or peft not installed (``pip install timm-remem[lora]``; also an ``ImportError``).
        UnsupportedModelError: The model has no transformer MLP branch (as for :func:`timm_remem.reweight`).

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_vit", pretrained=False, num_classes=10).eval()
        >>> x = torch.randn(1, 3, 160, 160)
        >>> y = model(x)
        >>> _ = apply_lora(model, rank=4, targets=["qkv", "fc1"])
        >>> torch.equal(model(x), y), model.head.weight.requires_grad, model.blocks[0].mlp.fc2.weight.requires_grad
        (True, True, False)
    """
    rank, alpha, dropout, targets = check_lora_settings(rank, alpha, dropout, targets)
    peft = _import_peft()
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"apply_lora needs a timm model (a torch.nn.Module), got {type(model).__name__}")
    if is_lora(model):
        raise ConfigError(f"{type(model).__name__} already holds peft adapters; train those, or fold them first with "
                          "timm_remem.lora.merge_lora(model)")
    # UnsupportedModelError, as reweight, for a model without a transformer MLP branch
    find_branches(model, "mlp", example_inputs=example_inputs)
    names = _resolve_targets(model, LORA_TARGETS if targets is None else targets)
    skipped = _uncalled(model, names, example_inputs)
    shown = f"{skipped[:3]}{' ...' if len(skipped) > 3 else ''}"
    if skipped and targets is not None:
        raise ConfigError(
            f"lora_targets {sorted({n.rsplit('.', 1)[-1] for n in skipped})} include layers that "
            f"{type(model).__name__}'s forward never calls ({shown}: it reads their weight directly), so an adapter "
            "there would do nothing in training; drop them from lora_targets"
        )
    if skipped:
        warnings.warn(f"apply_lora: {len(skipped)} {type(model).__name__} layers ({shown}) are read by weight, never "
                      "called: they get no adapter", UserWarning, stacklevel=2)
        names = [n for n in names if n not in skipped]
    factors = [m.remem_scale for m in model.modules() if isinstance(m, ScaledBranch)
               and isinstance(m.remem_scale, nn.Parameter) and m.remem_scale.requires_grad]
    config = peft.LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha), lora_dropout=dropout,
                             target_modules=names, bias="none")
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)  # freezes every non-adapter parameter
    for m in model.modules():
        if is_tuner_layer(m):
            m.train(m.get_base_layer().training)  # new adapters follow their layer's train/eval mode
    head = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
    if isinstance(head, nn.Module):
        head.requires_grad_(True)
    for p in factors:
        p.requires_grad_(True)
    return model
