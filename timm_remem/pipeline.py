"""Deprecated: ``timm_remem.pipeline`` is now :mod:`timm_remem.train`.

Every name this module had still resolves (to where it lives now), with a ``DeprecationWarning``; import from
:mod:`timm_remem.train` (or the sub-module named below) instead.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_MESSAGE = "timm_remem.pipeline is now timm_remem.train"

# old name -> (module under timm_remem.train, name there)
_MOVED = {
    **{name: ("", name) for name in (
        "TrainConfig", "FinetuneConfig", "DistillConfig", "TrainResult", "SelectResult", "DemoResult",
        "finetune_teacher", "distill_student", "select_teacher", "run_demo", "METRICS_FILE", "STATE_DIR",
        "EXPORT_DIR", "DEMO_TEACHER", "DEMO_TEACHER_KWARGS", "DEMO_STUDENT", "DEMO_STUDENT_KWARGS", "DEMO_ALPHA",
        "DEMO_RHO",
    )},
    "_SAM_BASES": ("config", "SAM_BASES"),
    "_make_config": ("config", "make_config"),
    "_RESUME_FREE": ("resume", "RESUME_FREE"),
    "_device": ("builders", "resolve_device"),
    "_setup_device": ("builders", "setup_device"),
    "_wrap_ddp": ("builders", "wrap_ddp"),
    "_build_data": ("builders", "build_data"),
    "_num_classes": ("builders", "dataset_classes"),
    "_img_size": ("builders", "default_img_size"),
    "_create_optimizer": ("builders", "create_optimizer"),
    "_create_scheduler": ("builders", "create_scheduler"),
    "_autocast": ("builders", "autocast_factory"),
    "_seed": ("builders", "seed_everything"),
    "_accuracy": ("loop", "accuracy"),
    "_evaluate": ("loop", "evaluate"),
    "_check_finite": ("loop", "check_finite"),
    "_checked_loss": ("loop", "checked_loss"),
    "_write_metrics": ("loop", "write_metrics"),
    "_train_step": ("loop", "train_step"),
    "_fit": ("loop", "fit"),
    "_truncate_metrics": ("resume", "truncate_metrics"),
    "_check_resume_config": ("resume", "check_resume_config"),
    "_resume_path": ("resume", "resume_path"),
    "_remove_stale_exports": ("resume", "remove_stale_exports"),
    "_start_run": ("recipes", "start_run"),
    "_task_loss": ("recipes", "task_loss"),
    "_load_teacher": ("recipes", "load_distill_teacher"),
    "_spearman": ("select", "spearman"),
    "_format_table": ("_table", "format_table"),
}

def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, new_name = _MOVED[name]
    warnings.warn(_MESSAGE, DeprecationWarning, stacklevel=2)
    where = importlib.import_module(f"timm_remem.train{'.' + module if module else ''}")
    return getattr(where, new_name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MOVED))
