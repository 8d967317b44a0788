"""timm-remem: turn strong pretrained timm ViTs into good teachers (ReMem), then distill.

Public names are re-exported here; each lives in the module named after its concern:

- ``timm_remem.reweighting``: layer-wise MLP residual reweighting (``reweight``, ``merge``, ``unreweight``)
- ``timm_remem.sam``: the SAM optimizer, registered in timm's optimizer factory
- ``timm_remem.distill``: distillation losses, the teacher wrapper, the distillation task
- ``timm_remem.hub``: ``save_pretrained``, ``push_to_hub``, ``load_teacher``
- ``timm_remem.pipeline``: ``finetune_teacher``, ``distill_student``, ``select_teacher``, ``run_demo``
- ``timm_remem.data`` / ``timm_remem.checkpoint``: offline digits data, timm data wrappers, crash-safe checkpoints
- ``timm_remem.analysis``: mutual information, information plane, expertness, pruning, layer dynamics

Example:
    >>> import timm, timm_remem
    >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
    >>> _ = timm_remem.reweight(model, alpha=0.85)
    >>> round(list(timm_remem.get_scales(model).values())[-1], 4) == round(0.85 ** len(model.blocks), 4)
    True
"""

__version__ = "0.1.0"

from . import analysis  # noqa: E402
from .analysis import (  # noqa: E402
    MutualInformation,
    estimate_mi,
    information_plane,
    layer_dynamics,
    mlp_expertness,
    pruning_diagnostic,
    rank_checkpoints,
    teacher_information,
)
from .checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint  # noqa: E402
from .data import create_dataset, create_loader  # noqa: E402
from .distill import (  # noqa: E402
    DistillationLoss,
    DistillationStudent,
    FeatureDistillation,
    RememDistillationTask,
    Teacher,
    TeacherLogitCache,
    dist_loss,
    kd_loss,
    precompute_teacher_logits,
    spectral_loss,
)
from .errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    HubError,
    NotReweightedError,
    RememError,
    TrainingError,
    UnsupportedModelError,
)
from .hub import TeacherMetadata, load_teacher, push_to_hub, save_pretrained  # noqa: E402
from .pipeline import (  # noqa: E402
    DemoResult,
    DistillConfig,
    FinetuneConfig,
    SelectResult,
    TrainResult,
    distill_student,
    finetune_teacher,
    run_demo,
    select_teacher,
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
from .sam import SAM, SAMStats  # noqa: E402

__all__ = [
    "__version__",
    "RememError",
    "ConfigError",
    "UnsupportedModelError",
    "NotReweightedError",
    "HubError",
    "CheckpointError",
    "TrainingError",
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
    "kd_loss",
    "dist_loss",
    "spectral_loss",
    "DistillationLoss",
    "FeatureDistillation",
    "DistillationStudent",
    "Teacher",
    "TeacherLogitCache",
    "precompute_teacher_logits",
    "RememDistillationTask",
    "save_pretrained",
    "push_to_hub",
    "load_teacher",
    "TeacherMetadata",
    "SAM",
    "SAMStats",
    "analysis",
    "estimate_mi",
    "MutualInformation",
    "teacher_information",
    "information_plane",
    "rank_checkpoints",
    "mlp_expertness",
    "pruning_diagnostic",
    "layer_dynamics",
    "finetune_teacher",
    "distill_student",
    "select_teacher",
    "run_demo",
    "FinetuneConfig",
    "DistillConfig",
    "TrainResult",
    "SelectResult",
    "DemoResult",
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointInfo",
    "create_dataset",
    "create_loader",
]
