"""timm-remem: turn strong pretrained timm ViTs into good teachers (ReMem), then distill.

Public names are re-exported here; each lives in the module named after its concern:

- ``timm_remem.reweighting``: layer-wise MLP residual reweighting (``reweight``, ``merge``, ``unreweight``)

Example:
    >>> import timm, timm_remem
    >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
    >>> _ = timm_remem.reweight(model, alpha=0.85)
    >>> round(list(timm_remem.get_scales(model).values())[-1], 4) == round(0.85 ** len(model.blocks), 4)
    True
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    HubError,
    NotReweightedError,
    RememError,
    UnsupportedModelError,
)
from .reweighting import (  # noqa: E402
    Branch,
    ReweightConfig,
    ScaledBranch,
    find_branches,
    get_reweight_config,
    get_scales,
    is_reweighted,
    merge,
    reweight,
    unreweight,
)

__all__ = [
    "__version__",
    "RememError",
    "ConfigError",
    "UnsupportedModelError",
    "NotReweightedError",
    "HubError",
    "CheckpointError",
    "reweight",
    "merge",
    "unreweight",
    "get_scales",
    "get_reweight_config",
    "find_branches",
    "is_reweighted",
    "ReweightConfig",
    "ScaledBranch",
    "Branch",
]
