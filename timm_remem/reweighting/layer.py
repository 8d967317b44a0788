"""The wrapper that scales one residual branch (:class:`ScaledBranch`), folding its factor into the weights, and the
state-dict hooks that keep the wrapped module's keys at their original names.

Example:
    >>> import torch
    >>> from timm_remem.reweighting.layer import ScaledBranch
    >>> branch = ScaledBranch(torch.nn.Linear(4, 4), 0.5)
    >>> sorted(branch.state_dict())
    ['bias', 'remem_scale', 'weight']
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .._models import model_device
from ..errors import UnsupportedModelError

__all__ = ["ScaledBranch", "is_foldable", "is_norm"]

_NORM_NAME = re.compile(r"Norm(\d?d|1)?$")
_BASE = "base_layer."
_SCALE = "remem_scale"


class ScaledBranch(nn.Module):
    """Multiplies a residual branch by a scalar factor ``remem_scale``.

    It replaces the module whose output is the branch's contribution to the residual add (``base_layer``) and
    calls it with whatever arguments the block passes. For a fused projection shared by attention and MLP
    (``ParallelScalingBlock(fuse_out_proj=True)``) it scales the MLP's input columns ``[start, end)`` instead.

    The wrapper is invisible in ``state_dict()``: ``base_layer``'s keys keep their original names and the factor
    adds one key, ``<path>.remem_scale``. A checkpoint without that key (a plain timm checkpoint) loads too and
    keeps the current factor. Both are done by torch state-dict hooks (see :func:`_save_hook`, :func:`_load_hook`).

    Args:
        base_layer: The wrapped module.
        scale: Initial factor.
        learnable: Make the factor an ``nn.Parameter`` (otherwise a buffer).
        columns: ``(start, end)`` input columns to scale instead of the output, or ``None``.
        fold_path: Path, relative to ``base_layer``, of the affine layer ``merge`` folds the factor into
            (``""``: ``base_layer`` itself).
        index: Block index, bottom-up in forward order.

    Example:
        >>> import torch
        >>> branch = ScaledBranch(torch.nn.Linear(3, 2), 0.5)
        >>> x = torch.randn(1, 3)
        >>> torch.allclose(branch(x), branch.base_layer(x) * 0.5)
        True
    """

    def __init__(
        self,
        base_layer: nn.Module,
        scale: float,
        learnable: bool = False,
        columns: tuple[int, int] | None = None,
        fold_path: str = "",
        index: int = 0,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        value = torch.tensor(float(scale), dtype=torch.float32, device=model_device(base_layer))
        if learnable:
            self.remem_scale = nn.Parameter(value)
        else:
            self.register_buffer(_SCALE, value)
        self.columns = columns
        self.fold_path = fold_path
        self.index = index
        self.register_state_dict_post_hook(_save_hook)
        self.register_load_state_dict_pre_hook(_load_hook)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.columns is None:
            out = self.base_layer(*args, **kwargs)
            if not torch.is_grad_enabled() and isinstance(out, torch.Tensor) and _fresh(out, args):
                return out.mul_(self.remem_scale)  # inference: no autograd graph, save an activation-sized copy
            return out * self.remem_scale
        x, *rest = args
        start, end = self.columns
        ones = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
        mult = torch.cat([ones[:start], (ones[start:end] * self.remem_scale).to(x.dtype), ones[end:]])
        return self.base_layer(x * mult, *rest, **kwargs)

    def extra_repr(self) -> str:
        where = "output" if self.columns is None else f"input columns [{self.columns[0]}:{self.columns[1]}]"
        learnable = isinstance(self.remem_scale, nn.Parameter)
        return f"scale={float(self.remem_scale.detach()):.6g}, on={where}, learnable={learnable}"

    @torch.no_grad()
    def fold(self) -> None:
        """Multiply the wrapped weights by the factor (in fp32, then cast back), exactly as the forward would.

        Example:
            >>> import torch
            >>> branch = ScaledBranch(torch.nn.Linear(3, 2), 0.5)
            >>> x = torch.randn(1, 3)
            >>> y = branch(x)
            >>> branch.fold()
            >>> torch.allclose(branch.base_layer(x), y)
            True
        """
        c = self.remem_scale.detach().double()
        if self.columns is not None:
            start, end = self.columns
            w = self.base_layer.weight
            w[:, start:end] = (w[:, start:end].double() * c).to(w.dtype)
            return
        target = self.fold_target()
        for name in ("weight", "bias"):
            t = getattr(target, name, None)
            if isinstance(t, torch.Tensor):
                t.copy_((t.double() * c).to(t.dtype))

    def fold_target(self) -> nn.Module:
        """The affine layer :meth:`fold` multiplies (``base_layer`` at ``fold_path``).

        Raises:
            UnsupportedModelError: That layer has no affine weight, so the factor cannot be folded.

        Example:
            >>> import torch
            >>> ScaledBranch(torch.nn.Linear(3, 2), 0.5).fold_target()
            Linear(in_features=3, out_features=2, bias=True)
        """
        target = self.base_layer.get_submodule(self.fold_path) if self.fold_path else self.base_layer
        if not is_foldable(target):
            raise UnsupportedModelError(
                f"cannot fold the factor of {type(self.base_layer).__name__} into its last layer "
                f"{type(target).__name__} ({self.fold_path or 'itself'}): it has no affine weight. "
                "Keep the model unmerged (it still runs and saves), or call timm_remem.unreweight(model)."
            )
        return target


def _save_hook(module: ScaledBranch, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]) -> None:
    """State-dict post-hook: ``<prefix>base_layer.<key>`` becomes ``<prefix><key>``, followed by ``remem_scale``.

    The wrapper's entries are the last ones in ``state_dict`` when the hook runs; they are re-inserted in place, so
    the key order (and the per-module version metadata) is what the unwrapped model would give plus the factor.
    """
    base, own = prefix + _BASE, prefix + _SCALE
    moved = [k for k in state_dict if k.startswith(base) or k == own]
    values = {k: state_dict.pop(k) for k in moved}
    for key in moved:
        if key != own:
            state_dict[prefix + key[len(base):]] = values[key]
    if own in values:
        state_dict[own] = values[own]
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for key in [k for k in metadata if k == base[:-1] or k.startswith(base)]:
            metadata[(prefix + key[len(base):]) if key != base[:-1] else prefix[:-1]] = metadata.pop(key)


def _load_hook(
    module: ScaledBranch, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
    missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
) -> None:
    """Load-state-dict pre-hook: original key names go back under ``base_layer.``; a missing factor keeps its value."""
    own, base = prefix + _SCALE, prefix + _BASE
    for key in [k for k in state_dict if k.startswith(prefix) and k != own and not k.startswith(base)]:
        state_dict[base + key[len(prefix):]] = state_dict.pop(key)
    if own not in state_dict:  # a plain timm checkpoint: keep the current factor
        state_dict[own] = module.remem_scale.detach().clone()


def _fresh(out: torch.Tensor, args: tuple) -> bool:
    """Whether ``out`` owns its memory (no view, shares nothing with an input), so it may be scaled in place."""
    if out._base is not None or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    ptr = out.untyped_storage().data_ptr()
    return not any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == ptr for a in args)


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` (or the module a :class:`ScaledBranch` wraps) is a normalisation layer.

    torch's LayerNorm, GroupNorm, BatchNorm/InstanceNorm and RMSNorm count, and so does any class whose name ends in
    ``Norm``, ``Norm1d``/``Norm2d``/``Norm3d``, ``Norm2d``-style or ``Norm1`` (timm's ``LayerNorm2d``, ``GroupNorm1``).

    Example:
        >>> import torch
        >>> is_norm(torch.nn.LayerNorm(4)), is_norm(torch.nn.Linear(4, 4))
        (True, False)
    """
    if isinstance(module, ScaledBranch):
        module = module.base_layer
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)
    return isinstance(module, norms) or _NORM_NAME.search(type(module).__name__) is not None


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
