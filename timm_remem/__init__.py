"""timm-remem: turn strong pretrained timm ViTs into good teachers (ReMem), then distill.

A timm plugin. The top level holds what the README's first snippet uses; everything else lives in its room
(``reweighting``, ``sam``, ``distill``, ``hub``, ``train``, ``study``, ``analysis``, ``lora``, ``data``,
``checkpoint``, ``distributed``, ``teachers``: see ``docs/architecture.md``).

Importing the package does one thing outside itself: it registers the one-pass SAM in timm's optimizer factory
(``sam``, ``samsgd``, ``sammomentum``, ``samadam``, ``samadamw``). Names that left the top level still work from
here for one more release, with a ``DeprecationWarning`` that names their room.

Example:
    >>> import timm, timm_remem
    >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
    >>> _ = timm_remem.reweight(model, alpha=0.85)
    >>> round(list(timm_remem.get_scales(model).values())[-1], 4) == round(0.85 ** len(model.blocks), 4)
    True
    >>> timm.optim.create_optimizer_v2(model, "samsgd", lr=0.1).__class__.__name__
    'OnePassSAMSGD'
"""

from __future__ import annotations

import importlib as _importlib
import warnings as _warnings

from ._version import __version__
from .distill import DistillationLoss, Teacher, kd_loss
from .errors import (
    CheckpointError,
    ConfigError,
    HubError,
    NotReweightedError,
    RememError,
    TrainingError,
    UnsupportedModelError,
)
from .hub import load_teacher, push_to_hub, save_pretrained
from .reweighting import (
    ReweightConfig,
    get_reweight_config,
    get_scales,
    is_reweighted,
    merge,
    reweight,
    unreweight,
)
from .sam import SAM, OnePassSAM, create_sam, register_with_timm

register_with_timm()  # the one documented effect outside the package

__all__ = [
    "__version__",
    "reweight", "merge", "unreweight", "get_scales", "get_reweight_config", "is_reweighted", "ReweightConfig",
    "SAM", "OnePassSAM", "create_sam",
    "kd_loss", "DistillationLoss", "Teacher",
    "save_pretrained", "push_to_hub", "load_teacher",
    "RememError", "ConfigError", "UnsupportedModelError", "NotReweightedError", "HubError", "CheckpointError",
    "TrainingError",
]

# Names that left the top level -> their room. Still importable from here, with a DeprecationWarning, until 0.3.
_MOVED = {
    **dict.fromkeys(("find_branches", "ScaledBranch", "Branch", "unscale"), "reweighting"),
    **dict.fromkeys(("SAMStats", "RhoScheduler"), "sam"),
    **dict.fromkeys(("dist_loss", "spectral_loss", "task_loss", "FeatureDistillation", "DistillationStudent",
                     "TeacherLogitCache", "precompute_teacher_logits", "RememDistillationTask"), "distill"),
    "TeacherMetadata": "hub",
    **dict.fromkeys(("finetune_teacher", "distill_student", "select_teacher", "run_demo", "FinetuneConfig",
                     "DistillConfig", "TrainResult", "SelectResult", "DemoResult"), "train"),
    **dict.fromkeys(("save_checkpoint", "load_checkpoint", "CheckpointInfo"), "checkpoint"),
    **dict.fromkeys(("run_study", "StudyConfig", "StudyResult"), "study"),
    **dict.fromkeys(("apply_lora", "merge_lora", "PeftMissingError"), "lora"),
    **dict.fromkeys(("estimate_mi", "MutualInformation", "teacher_information", "information_plane",
                     "rank_checkpoints", "mlp_expertness", "pruning_diagnostic", "layer_dynamics"), "analysis"),
    **dict.fromkeys(("create_dataset", "create_loader"), "data"),
}
# Rooms reachable as attributes without importing them first (``timm_remem.train.finetune_teacher``).
_ROOMS = ("analysis", "checkpoint", "data", "distill", "distributed", "errors", "hub", "lora", "reweighting", "sam",
          "study", "teachers", "train")


def __getattr__(name: str):
    if name in _ROOMS:
        return _importlib.import_module(f"{__name__}.{name}")  # the import binds it here
    if name in _MOVED:
        room = _MOVED[name]
        _warnings.warn(f"timm_remem.{name} is deprecated at the top level and goes away in 0.3; import it from "
                       f"its room: from timm_remem.{room} import {name}", DeprecationWarning, stacklevel=2)
        return getattr(_importlib.import_module(f"{__name__}.{room}"), name)
    raise AttributeError(f"module 'timm_remem' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ROOMS))
