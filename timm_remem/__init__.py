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

Lazy loading: ``import timm_remem`` imports neither torch nor timm, so the ``timm-remem`` command answers ``--help``
at once. Each public name is loaded from its room on first use (PEP 562 ``__getattr__`` over :data:`_LAZY`), then
kept here, so ``timm_remem.reweight`` and ``from timm_remem import reweight`` work as if imported eagerly.

SAM in timm's optimizer factory: importing ``timm_remem.sam`` registers ``sam``, ``samsgd``, ``sammomentum``,
``samadam`` and ``samadamw``. So that ``timm.optim.create_optimizer_v2(model, "samsgd")`` keeps working right after
``import timm_remem``, in either import order, without making ``import timm_remem`` pay for torch and timm:

- timm already imported (``import timm; import timm_remem``): ``timm_remem.sam`` is imported at once.
- timm not imported yet (``import timm_remem; import timm``): a one-shot finder on ``sys.meta_path`` watches for
  the ``timm`` package; right after timm's own ``__init__`` has finished it imports ``timm_remem.sam`` (which also
  imports ``timm.optim``) and removes itself. It changes nothing about how timm is found or loaded, and timm's
  module keeps its real loader. If the registration fails (a timm too old for timm_remem), ``import timm`` still
  succeeds and a ``RuntimeWarning`` says why ``"samsgd"`` is unknown.

Example:
    >>> import timm, timm_remem
    >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
    >>> _ = timm_remem.reweight(model, alpha=0.85)
    >>> round(list(timm_remem.get_scales(model).values())[-1], 4) == round(0.85 ** len(model.blocks), 4)
    True
    >>> timm.optim.create_optimizer_v2(model, "samsgd", lr=0.1).__class__.__name__
    'SAM'
"""

from __future__ import annotations

import importlib as _importlib
import importlib.abc as _importlib_abc
import sys as _sys
import warnings as _warnings
from typing import TYPE_CHECKING

from ._version import __version__

# Public name -> the room it is loaded from on first use.
_LAZY = {
    **dict.fromkeys(("RememError", "ConfigError", "UnsupportedModelError", "NotReweightedError", "HubError",
                     "CheckpointError", "TrainingError"), "timm_remem.errors"),
    **dict.fromkeys(("reweight", "merge", "unreweight", "get_scales", "get_reweight_config", "find_branches",
                     "is_reweighted", "ReweightConfig", "ScaledBranch", "Branch", "unscale"),
                    "timm_remem.reweighting"),
    **dict.fromkeys(("SAM", "SAMStats", "RhoScheduler"), "timm_remem.sam"),
    **dict.fromkeys(("kd_loss", "dist_loss", "spectral_loss", "task_loss", "DistillationLoss", "FeatureDistillation",
                     "DistillationStudent", "Teacher", "TeacherLogitCache", "precompute_teacher_logits",
                     "RememDistillationTask"), "timm_remem.distill"),
    **dict.fromkeys(("save_pretrained", "push_to_hub", "load_teacher", "TeacherMetadata"), "timm_remem.hub"),
    **dict.fromkeys(("finetune_teacher", "distill_student", "select_teacher", "run_demo", "FinetuneConfig",
                     "DistillConfig", "TrainResult", "SelectResult", "DemoResult"), "timm_remem.train"),
    **dict.fromkeys(("save_checkpoint", "load_checkpoint", "CheckpointInfo"), "timm_remem.checkpoint"),
    **dict.fromkeys(("run_study", "StudyConfig", "StudyResult"), "timm_remem.study"),
    **dict.fromkeys(("apply_lora", "merge_lora", "PeftMissingError"), "timm_remem.lora"),
    **dict.fromkeys(("estimate_mi", "MutualInformation", "teacher_information", "information_plane",
                     "rank_checkpoints", "mlp_expertness", "pruning_diagnostic", "layer_dynamics"),
                    "timm_remem.analysis"),
}
# Rooms reachable as attributes (``timm_remem.data.DigitsDataset``), as they were when the package imported them all.
_ROOMS = ("analysis", "checkpoint", "data", "distill", "distributed", "errors", "hub", "lora", "reweighting", "sam",
          "study", "teachers", "train")

if TYPE_CHECKING:  # what type checkers and IDEs see; tests/test_init.py checks it matches _LAZY
    from . import analysis
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
    from .lora import PeftMissingError, apply_lora, merge_lora
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
        unscale,
    )
    from .sam import SAM, RhoScheduler, SAMStats
    from .study import StudyConfig, StudyResult, run_study
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
    "ReweightConfig", "ScaledBranch", "Branch", "unscale",
    "SAM", "SAMStats", "RhoScheduler",
    "kd_loss", "dist_loss", "spectral_loss", "task_loss", "DistillationLoss", "FeatureDistillation",
    "DistillationStudent", "Teacher", "TeacherLogitCache", "precompute_teacher_logits", "RememDistillationTask",
    "save_pretrained", "push_to_hub", "load_teacher", "TeacherMetadata",
    "finetune_teacher", "distill_student", "select_teacher", "run_demo", "FinetuneConfig", "DistillConfig",
    "TrainResult", "SelectResult", "DemoResult", "save_checkpoint", "load_checkpoint", "CheckpointInfo",
    "run_study", "StudyConfig", "StudyResult",
    "apply_lora", "merge_lora", "PeftMissingError",
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
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    if name in _ROOMS:
        return _importlib.import_module(f"{__name__}.{name}")  # the import binds it here
    if name in _MOVED:
        where = _MOVED[name]
        _warnings.warn(
            f"timm_remem.{name} is deprecated at the top level (it shadowed timm's own {name}); "
            f"use {where}.{name}", DeprecationWarning, stacklevel=2,
        )
        return getattr(_importlib.import_module(where), name)
    raise AttributeError(f"module 'timm_remem' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_ROOMS) | set(_MOVED))


class _RegisterSamAfterTimm(_importlib_abc.MetaPathFinder):
    """One-shot ``sys.meta_path`` finder: once the ``timm`` package has been imported, import ``timm_remem.sam``.

    It finds ``timm`` with the finders behind it and wraps only the loader's ``exec_module``; after timm's
    ``__init__`` ran it puts the real loader back on the module and its spec, removes itself and registers SAM.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        for finder in _sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec  # nothing to hook into; timm_remem.sam registers when it is imported
        spec.loader = _AfterExec(loader, self)
        return spec

    def registered(self) -> None:
        if self in _sys.meta_path:
            _sys.meta_path.remove(self)
        try:
            _importlib.import_module("timm_remem.sam")
        except Exception as error:  # noqa: BLE001 - import timm must not fail because of us
            _warnings.warn(f"timm_remem could not register SAM in timm's optimizer factory ({error!r}); "
                           "'import timm_remem.sam' shows the full error", RuntimeWarning, stacklevel=2)


class _AfterExec(_importlib_abc.Loader):
    """A loader that runs ``loader`` and then the finder's registration, and hands the module its real loader."""

    def __init__(self, loader, finder: _RegisterSamAfterTimm) -> None:
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.finder.registered()

    def __getattr__(self, name: str):  # get_source, get_resource_reader, ...: the real loader's
        return getattr(self.loader, name)


if "timm" in _sys.modules:
    _importlib.import_module("timm_remem.sam")
elif not any(isinstance(f, _RegisterSamAfterTimm) for f in _sys.meta_path):
    _sys.meta_path.insert(0, _RegisterSamAfterTimm())
