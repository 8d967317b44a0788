"""The branch scale (:class:`ScaledBranch`), folding it into the weights, and taking it off again.

A branch is scaled *in place* (``Mlp`` becomes ``ScaledMlp``, a subclass of both), so every state-dict key stays a
real attribute path, hooks on the module see the scaled output, and peft can adapt the layers inside.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
from torch import nn

from .._models import model_device
from .._peft import is_tuner_layer, lora_parts
from ..errors import ConfigError, UnsupportedModelError

__all__ = ["ScaledBranch", "fold_tensors", "is_foldable", "is_norm", "unscale"]

_NORM_NAME = re.compile(r"Norm(\d?d|1)?$")
_SCALE = "remem_scale"
_ATTRS = ("remem_columns", "remem_fold_path", "remem_index")


class _Alias:
    """Read-only alias of a ``remem_*`` attribute (non-data, so a module's own attribute of that name wins)."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __get__(self, obj: Any, owner: type) -> Any:
        return self if obj is None else obj.__dict__[self.attr]


class ScaledBranch(nn.Module):
    """A module whose output (or some input columns) is multiplied by a scalar factor ``remem_scale``.

    ``ScaledBranch(module, scale)`` turns ``module`` itself into a scaled branch and returns it (same object, paths,
    hooks and mode). The factor is one more state-dict entry, ``<path>.remem_scale``; a plain timm checkpoint without
    it loads too and keeps the current factor. :func:`unscale` gives the module its own class back.

    Args:
        module: The module to scale (changed in place and returned).
        scale: Initial factor (a 0-dim fp32 tensor ``remem_scale``).
        learnable: Make the factor an ``nn.Parameter`` (otherwise a buffer).
        columns: ``(start, end)`` input columns to scale instead of the output (a projection that attention and MLP
            share: ``ParallelScalingBlock(fuse_out_proj=True)``), or ``None``.
        fold_path: Path, relative to ``module``, of the affine (or peft LoRA) layer ``merge`` folds the factor into.
        index: Block index, bottom-up in forward order.

    Raises:
        ConfigError: ``module`` is not an ``nn.Module`` or is scaled already.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(3, 2)
        >>> x = torch.randn(1, 3)
        >>> y = layer(x)
        >>> branch = ScaledBranch(layer, 0.5)
        >>> branch is layer, type(branch).__name__, sorted(branch.state_dict()), branch.index
        (True, 'ScaledLinear', ['bias', 'remem_scale', 'weight'], 0)
        >>> torch.allclose(branch(x), y * 0.5)
        True
    """

    _remem_base_class: type = nn.Module
    index = _Alias("remem_index")
    columns = _Alias("remem_columns")
    fold_path = _Alias("remem_fold_path")

    def __new__(
        cls,
        module: nn.Module | None = None,
        scale: float = 1.0,
        learnable: bool = False,
        columns: tuple[int, int] | None = None,
        fold_path: str = "",
        index: int = 0,
    ) -> ScaledBranch:
        if not isinstance(module, nn.Module):
            raise ConfigError(f"ScaledBranch scales an nn.Module, got {type(module).__name__} {module!r:.60}.")
        if isinstance(module, ScaledBranch):
            raise ConfigError(f"{type(module).__name__} is scaled already: call unscale(module) first.")
        value = torch.tensor(float(scale), dtype=torch.float32, device=model_device(module))
        module.__class__ = _scaled_class(type(module))
        if learnable:
            module.register_parameter(_SCALE, nn.Parameter(value))
        else:
            module.register_buffer(_SCALE, value)
        module.__dict__.update(remem_columns=columns, remem_fold_path=fold_path, remem_index=index)
        return module

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: D107 - everything happens in __new__
        pass

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.remem_columns is None:
            return super().forward(*args, **kwargs) * self.remem_scale
        x, *rest = args
        start, end = self.remem_columns
        ones = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
        mult = torch.cat([ones[:start], (ones[start:end] * self.remem_scale).to(x.dtype), ones[end:]])
        return super().forward(x * mult, *rest, **kwargs)

    def extra_repr(self) -> str:
        cols = self.remem_columns
        where = "output" if cols is None else f"input columns [{cols[0]}:{cols[1]}]"
        learnable = isinstance(self.remem_scale, nn.Parameter)
        own = super().extra_repr()
        mine = f"remem_scale={float(self.remem_scale.detach()):.6g}, on={where}, learnable={learnable}"
        return f"{own}, {mine}" if own else mine

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        key = prefix + _SCALE
        if key not in state_dict and not self.remem_scale.is_meta:  # a plain timm checkpoint: keep the factor
            state_dict[key] = self.remem_scale.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # The class is made at run time: pickle (torch.save, deepcopy, spawn) rebuilds it from the original class.
        return _restore, (self._remem_base_class,), self.__getstate__()

    def __prepare_scriptable__(self) -> nn.Module:
        raise UnsupportedModelError(
            f"torch.jit.script cannot compile the reweighted branch {type(self).__name__} (block {self.remem_index}): "
            "its forward passes on whatever arguments the block gives. Fold the factors first "
            "(timm_remem.merge(model) gives a plain timm model with the same outputs, which scripts like any "
            "timm model), or use torch.jit.trace(model, example) or torch.compile(model)."
        )

    @torch.no_grad()
    def fold(self) -> None:
        """Multiply the wrapped weights by the factor (in fp64, then cast back); :func:`unscale` takes it off after.

        Raises:
            UnsupportedModelError: The layer to fold into has no affine weight, or is a peft layer other than plain
                LoRA; nothing was changed.

        Example:
            >>> import torch
            >>> branch = ScaledBranch(torch.nn.Linear(3, 2), 0.5)
            >>> x = torch.randn(1, 3)
            >>> y = branch(x)
            >>> branch.fold()
            >>> torch.allclose(unscale(branch)(x), y)
            True
        """
        c = self.remem_scale.detach().double()
        for t in self._fold_tensors():
            part = t if self.remem_columns is None else t[:, slice(*self.remem_columns)]  # a view: changed in place
            part.copy_((part.double() * c).to(part.dtype))

    def fold_target(self) -> nn.Module:
        """The affine layer :meth:`fold` multiplies (at ``fold_path``; a peft layer is seen through).

        Raises:
            UnsupportedModelError: That layer has no affine weight.

        Example:
            >>> import torch
            >>> ScaledBranch(torch.nn.Linear(3, 2), 0.5).fold_target()
            ScaledLinear(in_features=3, out_features=2, bias=True, remem_scale=0.5, on=output, learnable=False)
        """
        return _fold_layer(self, self.remem_fold_path, self._what(), type(self).__name__)

    def _what(self) -> str:
        return f"{type(self).__name__} (block {self.remem_index})"

    def _fold_tensors(self) -> list[torch.Tensor]:
        return fold_tensors(self, self.remem_columns, self.remem_fold_path, self._what())


def _fold_layer(module: nn.Module, fold_path: str, what: str, label: str = "") -> nn.Module:
    """The layer at ``fold_path`` in ``module`` that a factor on its output folds into (checked to be affine)."""
    target = module.get_submodule(fold_path) if fold_path else module
    base = lora_parts(target, what)[0] if is_tuner_layer(target) else target
    if not is_foldable(base):
        raise UnsupportedModelError(
            f"cannot fold the factor of {label or what} into its last layer {type(base).__name__} "
            f"({fold_path or 'itself'}): it has no affine weight. Keep the model unmerged (it still runs and saves), "
            "or call timm_remem.unreweight(model)."
        )
    return target


def fold_tensors(module: nn.Module, columns: tuple[int, int] | None, fold_path: str, what: str) -> list[torch.Tensor]:
    """The tensors ``merge`` multiplies to fold a factor on a branch ending in ``module`` (scaled or not yet).

    On the output: weight and bias at ``fold_path`` (LoRA: base and every ``lora_B``); on input ``columns``: the
    weight of ``module`` (and every ``lora_A``).

    Raises:
        UnsupportedModelError: No affine weight, or a peft layer other than plain LoRA (``what`` names the branch).
    """
    if columns is not None:
        if is_tuner_layer(module):
            base, lora_a, _ = lora_parts(module, what)
            return [base.weight, *(a.weight for a in lora_a)]
        return [module.weight]
    target = _fold_layer(module, fold_path, what)
    layers = [target]
    if is_tuner_layer(target):
        base, _, lora_b = lora_parts(target, what)
        layers = [base, *lora_b]
    return [t for m in layers for t in (m.weight, getattr(m, "bias", None)) if isinstance(t, torch.Tensor)]


@functools.cache
def _scaled_class(cls: type) -> type:
    return type(f"Scaled{cls.__name__}", (ScaledBranch, cls), {"__module__": __name__, "_remem_base_class": cls})


def _restore(cls: type) -> ScaledBranch:
    """Unpickling: an empty instance of the scaled class of ``cls`` (pickle then sets its state)."""
    return object.__new__(_scaled_class(cls))


def unscale(module: nn.Module) -> nn.Module:
    """Take the scale off a :class:`ScaledBranch` without folding it: the module's own class back (in place).

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2, 2)
        >>> unscale(ScaledBranch(layer, 0.5)) is layer, type(layer).__name__, sorted(layer.state_dict())
        (True, 'Linear', ['bias', 'weight'])
    """
    if not isinstance(module, ScaledBranch):
        return module
    module._parameters.pop(_SCALE, None)
    module._buffers.pop(_SCALE, None)
    for attr in _ATTRS:
        module.__dict__.pop(attr, None)
    module.__class__ = module._remem_base_class
    return module


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer: torch's norms, or a class named ``*Norm``, ``*Norm2d``, ``*Norm1``.

    Example:
        >>> import torch
        >>> is_norm(torch.nn.LayerNorm(4)), is_norm(torch.nn.Linear(4, 4))
        (True, False)
    """
    cls = module._remem_base_class if isinstance(module, ScaledBranch) else type(module)
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)
    return issubclass(cls, norms) or _NORM_NAME.search(cls.__name__) is not None


def is_foldable(module: nn.Module) -> bool:
    """Whether ``module``'s output is linear in (weight, bias) jointly, so scaling both scales the output.

    Example:
        >>> import torch
        >>> is_foldable(torch.nn.Conv2d(3, 4, 1)), is_foldable(torch.nn.GELU())
        (True, False)
    """
    linear = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and (isinstance(module, linear) or is_norm(module))
