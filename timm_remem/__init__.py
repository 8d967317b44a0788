"""timm-remem: turn strong pretrained timm ViTs into good teachers (ReMem), then distill.

The names users need are re-exported here; each lives in the room named after its concern (``docs/architecture.md``
draws the rooms and what each may import):

- ``timm_remem.reweighting``: layer-wise MLP residual reweighting (``reweight``, ``merge``, ``unreweight``)
- ``timm_remem.sam``: the SAM optimizer, registered in timm's optimizer factory (``create_optimizer_v2(m, "samsgd")``)
- ``timm_remem.distill``: distillation losses, the teacher wrapper, the distillation task
- ``timm_remem.hub``: ``save_pretrained``, ``push_to_hub``, ``load_teacher``
- ``timm_remem.train``: ``finetune_teacher``, ``distill_student``, ``select_teacher``, ``run_demo`` and their configs
- ``timm_remem.teachers``: what may be named as a teacher (a module, a checkpoint folder, ``hf-hub:``, a timm name)
- ``timm_remem.data`` / ``timm_remem.checkpoint`` / ``timm_remem.distributed``: offline digits data and timm data
  wrappers, crash-safe checkpoints, torchrun support
- ``timm_remem.analysis``: mutual information, information plane, expertness, pruning, layer dynamics

Example:
    >>> import timm, timm_remem
    >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
    >>> _ = timm_remem.reweight(model, alpha=0.85)
    >>> round(list(timm_remem.get_scales(model).values())[-1], 4) == round(0.85 ** len(model.blocks), 4)
    True
"""

import importlib as _importlib
import warnings as _warnings

from . import analysis
from ._version import __version__
from .analysis import (
    MutualInformation,
    estimate_mi,
    information_plane,
    layer_dynamics,
    mlp_expertness,
    pruning_diagnostic,
    rank_checkpoints,
    teacher_information,
)
from .checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from .distill import (
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
    task_loss,
)
from .errors import (
    CheckpointError,
    ConfigError,
    HubError,
    NotReweightedError,
    RememError,
    TrainingError,
    UnsupportedModelError,
)
from .hub import TeacherMetadata, load_teacher, push_to_hub, save_pretrained
from .reweighting import (
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
from .sam import SAM, SAMStats
from .train import (
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

__all__ = [  # grouped by room, a line each
    "__version__", "analysis",
    "RememError", "ConfigError", "UnsupportedModelError", "NotReweightedError", "HubError", "CheckpointError",
    "TrainingError",
    "reweight", "merge", "unreweight", "get_scales", "get_reweight_config", "find_branches", "is_reweighted",
    "ReweightConfig", "ScaledBranch", "Branch",
    "SAM", "SAMStats",
    "kd_loss", "dist_loss", "spectral_loss", "task_loss", "DistillationLoss", "FeatureDistillation",
    "DistillationStudent", "Teacher", "TeacherLogitCache", "precompute_teacher_logits", "RememDistillationTask",
    "save_pretrained", "push_to_hub", "load_teacher", "TeacherMetadata",
    "finetune_teacher", "distill_student", "select_teacher", "run_demo", "FinetuneConfig", "DistillConfig",
    "TrainResult", "SelectResult", "DemoResult", "save_checkpoint", "load_checkpoint", "CheckpointInfo",
    "estimate_mi", "MutualInformation", "teacher_information", "information_plane", "rank_checkpoints",
    "mlp_expertness", "pruning_diagnostic", "layer_dynamics",
]

# Names that left the top level, still importable from here with a DeprecationWarning. ``create_dataset`` and
# ``create_loader`` shadowed timm's own functions of the same names (with other signatures).
_MOVED = {
    "create_dataset": "timm_remem.data",
    "create_loader": "timm_remem.data",
}


def __getattr__(name: str):
    if name in _MOVED:
        where = _MOVED[name]
        _warnings.warn(
            f"timm_remem.{name} is deprecated at the top level (it shadowed timm's own {name}); "
            f"use {where}.{name}", DeprecationWarning, stacklevel=2,
        )
        return getattr(_importlib.import_module(where), name)
    raise AttributeError(f"module 'timm_remem' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MOVED))
