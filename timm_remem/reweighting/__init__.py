"""Layer-wise reweighting of the MLP residual branches of timm vision transformers (ReMem, lever 2).

``reweight`` turns, in place, the module whose output is each block's MLP contribution to the residual stream into
a :class:`ScaledBranch` that multiplies it by a factor (same object, same path, same keys plus ``remem_scale``); top
blocks get the smallest factors. Attention is never touched. The change is exactly reversible: ``unreweight`` gives
the modules their own classes back, ``merge`` folds the factors into the weights and leaves a plain timm model.
peft models (LoRA) are seen through, in either order.

Where the branch ends is found by a probe: one eval-mode forward pass at batch 1 with hooks on every block's
children, following the tensor the MLP returns through the modules that consume it before the residual add. A
normalisation layer on that path (post-norm and sandwich-norm blocks: Swin V2, ``vit_*_rpn``, EVA post-norm,
Gemma4, FocalNet post-norm) would undo a scale placed on the MLP output, so the scale goes after it instead.
Blocks whose "mlp" is the whole residual branch (ConvNeXt-style: a convolutional token mixer and the MLP in
series) are recognised by a second probe (zeroing the MLP turns the block into the identity) and are not
transformer MLP branches.

The files of this package:

- ``config.py``: :class:`ReweightConfig`, the factor schedules and the input checks.
- ``layer.py``: :class:`ScaledBranch` (the in-place scale, folding) and ``unscale``.
- ``branches.py``: :class:`Branch` and :func:`find_branches` (candidates by name); ``_probe.py``: the probe passes.
- peft wrappers and LoRA layers are seen through by duck typing, with the shared leaf ``timm_remem/_peft.py``
  (peft is never imported).
- ``api.py``: :func:`reweight`, :func:`merge`, :func:`unreweight`, :func:`get_scales`, :func:`get_reweight_config`,
  :func:`is_reweighted`, :func:`check_factors` (the non-finite check every merge and export runs first) and
  :func:`restore_reweight_config` (a record read from a file, checked against the loaded model).

One source of truth: the factors of a reweighted model live in its wrappers only, and every report is read from them
when asked for; once merged, the model keeps a record of what was folded, and ``reweight`` refuses to stack new factors
on it unless ``compose=True`` (see :func:`reweight`).

Example:
    >>> import timm
    >>> from timm_remem.reweighting import get_scales, merge, reweight
    >>> model = reweight(timm.create_model("test_vit", pretrained=False, img_size=32), alpha=0.5, top_k=2)
    >>> get_scales(model)
    {'blocks.4.mlp': 0.5, 'blocks.5.mlp': 0.25}
    >>> get_scales(merge(model))
    {}
"""

from .api import (
    check_factors,
    get_reweight_config,
    get_scales,
    is_reweighted,
    merge,
    restore_reweight_config,
    reweight,
    unreweight,
)
from .branches import Branch, find_branches
from .config import ReweightConfig
from .layer import ScaledBranch, unscale

__all__ = [
    "Branch",
    "ReweightConfig",
    "ScaledBranch",
    "check_factors",
    "find_branches",
    "get_reweight_config",
    "get_scales",
    "is_reweighted",
    "merge",
    "restore_reweight_config",
    "reweight",
    "unreweight",
    "unscale",
]
