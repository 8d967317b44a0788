"""Studies: the ReMem ablation as one call, over seeds, with confidence intervals (``timm-remem study``).
Modules: ``config`` (settings, arms), ``runner`` (run folders), ``stats`` (math only), ``report`` and ``demo``.

Example:
    >>> from timm_remem.study import StudyConfig, plan_arms
    >>> [a.name for a in plan_arms(StudyConfig(teacher="test_vit", student="test_resnet", alpha=[0.7, 0.85]))]
    ['plain', 'reweight-a0.7', 'reweight-a0.85', 'sam', 'remem-a0.7', 'remem-a0.85', 'student']
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Public name -> its module (PEP 562): ``timm_remem.study.config`` (the settings the CLI parses) loads without torch.
_LAZY = {
    **dict.fromkeys(("ARMS", "DEFAULT_ARMS", "QUICK", "REWEIGHT_ARMS", "SAM_ARMS", "SHARPNESS_DEFAULTS", "Arm",
                     "StudyConfig", "load_config", "plan_arms", "sharpness_settings", "study_config"), "config"),
    **dict.fromkeys(("DEMO_CAVEAT", "DEMO_SEEDS", "StudyDemoResult", "run_demo"), "demo"),
    **dict.fromkeys(("CAVEAT", "StudyResult", "format_study_table", "format_sharpness_table", "summarise"),
                    "report"),
    **dict.fromkeys(("RESULT_FILE", "SETTINGS_FILE", "run_folder", "run_settings", "run_study"), "runner"),
    **dict.fromkeys(("VERDICTS", "SHARPNESS_VERDICTS", "Interval", "mean_interval", "paired_interval", "t_cdf",
                     "t_quantile", "verdict", "sharpness_verdict"), "stats"),
}

if TYPE_CHECKING:
    from .config import (
        ARMS,
        DEFAULT_ARMS,
        QUICK,
        REWEIGHT_ARMS,
        SAM_ARMS,
        SHARPNESS_DEFAULTS,
        Arm,
        StudyConfig,
        load_config,
        plan_arms,
        sharpness_settings,
        study_config,
    )
    from .demo import DEMO_CAVEAT, DEMO_SEEDS, StudyDemoResult, run_demo
    from .report import CAVEAT, StudyResult, format_sharpness_table, format_study_table, summarise
    from .runner import RESULT_FILE, SETTINGS_FILE, run_folder, run_settings, run_study
    from .stats import (
        SHARPNESS_VERDICTS,
        VERDICTS,
        Interval,
        mean_interval,
        paired_interval,
        sharpness_verdict,
        t_cdf,
        t_quantile,
        verdict,
    )

__all__ = [
    "ARMS", "DEFAULT_ARMS", "REWEIGHT_ARMS", "SAM_ARMS", "QUICK", "SHARPNESS_DEFAULTS", "VERDICTS",
    "SHARPNESS_VERDICTS", "CAVEAT", "Arm", "StudyConfig", "StudyResult", "Interval", "run_study", "run_demo",
    "StudyDemoResult", "DEMO_SEEDS", "DEMO_CAVEAT", "run_folder", "run_settings", "load_config", "plan_arms",
    "sharpness_settings", "study_config", "summarise", "format_study_table", "format_sharpness_table",
    "mean_interval", "paired_interval", "t_cdf", "t_quantile", "verdict", "sharpness_verdict", "RESULT_FILE",
    "SETTINGS_FILE",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
