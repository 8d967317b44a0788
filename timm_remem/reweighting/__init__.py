"""Layer-wise reweighting of the MLP residual branches of timm vision transformers (ReMem, lever 2).

``reweight`` turns, in place, the module whose output is each block's MLP contribution to the residual stream into
a :class:`ScaledBranch` that multiplies it by a factor (top blocks get the smallest); attention is never touched.
``unreweight`` undoes it exactly, ``merge`` folds the factors into the weights and leaves a plain timm model. peft
models (LoRA) are seen through, in either order.

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

__all__ = ["Branch", "ReweightConfig", "ScaledBranch", "check_factors", "find_branches", "get_reweight_config",
           "get_scales", "is_reweighted", "merge", "restore_reweight_config", "reweight", "unreweight", "unscale"]
