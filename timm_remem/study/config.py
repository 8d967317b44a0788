"""The settings of a study: :class:`StudyConfig`, its arms (:func:`plan_arms`) and config files (:func:`load_config`).

The arms (``plain``, ``reweight``, ``sam``, ``onepass``, ``remem``, ``student``) are described in
``docs/evidence.md``; several ``alpha`` values or schedules give one ``reweight`` and one ``remem`` arm each.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._serialization import dataclass_from_dict, dataclass_to_dict, documented
from .._validation import check_bool, check_float, check_int, paths_as_strings
from ..errors import ConfigError
from ..reweighting.config import SCHEDULES
from ..train.config import DistillConfig, FinetuneConfig

__all__ = ["ARMS", "DEFAULT_ARMS", "REWEIGHT_ARMS", "SAM_ARMS", "QUICK", "SHARPNESS_DEFAULTS", "Arm", "StudyConfig",
           "plan_arms", "sharpness_settings", "load_config", "study_config"]

#: Every arm a study knows, in the order reports list them.
ARMS = ("plain", "reweight", "sam", "onepass", "remem", "student")
#: The arms a study runs when none are named: the paper's ablation and the student alone (``onepass`` is opt-in).
DEFAULT_ARMS = ("plain", "reweight", "sam", "remem", "student")
#: The arms whose teacher trains with SAM, and the SAM algorithm each uses (``FinetuneConfig.sam``).
SAM_ARMS = {"sam": "exact", "onepass": "onepass", "remem": "exact"}
#: The arms whose teacher is reweighted (they need a teacher with transformer MLP branches).
REWEIGHT_ARMS = ("reweight", "remem")
#: What ``quick=True`` (``--quick``) sets: tiny timm test models on digits, 2 seeds, 1 epoch of 2 batches.
QUICK: dict[str, Any] = {
    "teacher": "test_vit", "student": "test_resnet", "dataset": "digits", "seeds": 2, "teacher_kwargs": {},
    "student_kwargs": {}, "finetune": {"epochs": 1, "img_size": 16, "limit_train_batches": 2},
    "distill": {"epochs": 1, "img_size": 16, "limit_train_batches": 2}, "select_options": {"epochs": 1},
    "mi": {"max_samples": 200}, "sharpness": {"batches": 1, "batch_size": 16, "iters": 5},
}
#: The sharpness measurement's options and their defaults (``rho`` None: the study's ``rho``). The CPU protocol
#: (docs/evidence.md: a 0.69 M-parameter ViT at 32 px, 50 images) spent 3 to 5 s per teacher on it (one thread).
SHARPNESS_DEFAULTS: dict[str, Any] = {"batches": 4, "batch_size": 32, "iters": 30, "tol": 1e-3, "rho": None,
                                      "eigen": True, "seed": 0}
# Stage fields the study sets itself (per arm and seed, or once for every stage).
_STUDY_OWNED = ("model", "model_kwargs", "pretrained", "dataset", "data_dir", "seed", "output", "resume",
                "progress", "device", "amp", "alpha", "schedule", "rho", "sam", "teacher", "teacher_kwargs",
                "teacher_pretrained")
_MI_OPTIONS = ("features", "method", "noise", "conditional", "max_dim", "max_samples", "seed")
# Fields that may change between two invocations of one study (they do not change what a run's training computes;
# a changed sharpness option recomputes the sharpness stage only).
_FREE = ("arms", "seeds", "first_seed", "output", "progress", "confidence", "quick", "sharpness")


@dataclass(frozen=True)
class Arm:
    """One arm of a study: its name and what its teacher gets.

    Attributes:
        name: The arm's name (also its folder name).
        kind: ``"plain"``, ``"reweight"``, ``"sam"``, ``"onepass"``, ``"remem"`` or ``"student"``.
        alpha: Reweighting factor (reweight / remem), else None.
        schedule: Reweighting schedule (reweight / remem), else None.
        rho: SAM radius (sam / onepass / remem), else 0.
        sam: The SAM algorithm of the teacher (``FinetuneConfig.sam``): ``"onepass"`` for ``onepass``, else
            ``"exact"`` (also where ``rho`` is 0 and no SAM runs).
    """

    name: str
    kind: str
    alpha: float | None = None
    schedule: str | None = None
    rho: float = 0.0
    sam: str = "exact"

    @property
    def has_teacher(self) -> bool:
        """Whether the arm trains a teacher (every arm but ``student``)."""
        return self.kind != "student"


def _opt(default: Any, help: str) -> Any:  # noqa: A002 - "help" is the argparse word
    """A field with a default (a factory for dicts) and its help, written once (docstring and CLI read it)."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@documented
@dataclass
class StudyConfig:
    """Settings of a study (see the module docstring). Stage settings are :class:`~timm_remem.train.FinetuneConfig`
    / :class:`~timm_remem.train.DistillConfig` fields, given as dicts; the study sets model, data, seed, output,
    device and the arm's ReMem settings itself.
    """

    teacher: str = _opt("", "teacher: a timm name (hf-hub: and local-dir: included)")
    student: str = _opt("", "student: a timm name")
    dataset: str = _opt("digits", "dataset, as finetune and distill take it (digits, folder, torch/cifar100, ...)")
    data_dir: str | None = _opt(None, "dataset root folder")
    teacher_kwargs: dict = _opt({}, "timm.create_model arguments of the teacher")
    student_kwargs: dict = _opt({}, "timm.create_model arguments of the student")
    pretrained: bool = _opt(False, "start the teachers from their pretrained weights (the paper's setting)")
    arms: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS), metadata={
        "help": f"arms to run, from {', '.join(ARMS)}"})
    seeds: int = _opt(3, "seeds per arm")
    first_seed: int = _opt(0, "the seeds are first_seed .. first_seed + seeds - 1")
    alpha: list[float] = field(default_factory=lambda: [0.85], metadata={
        "help": "reweighting factor(s); several add arms (a sweep)"})
    schedule: list[str] = field(default_factory=lambda: ["exponential"], metadata={
        "help": "reweighting schedule(s); several add arms", "choices": SCHEDULES})
    rho: float = _opt(0.05, "SAM radius of the sam, onepass and remem arms")
    select: bool = _opt(False, "pick each teacher's checkpoint with ReMem's protocol (select_teacher) instead of "
                               "taking the last one")
    finetune: dict = _opt({}, "FinetuneConfig settings of the teachers, e.g. lr=1e-3 warmup_epochs=1")
    distill: dict = _opt({}, "DistillConfig settings of the students, e.g. method=dist temperature=2")
    select_options: dict = _opt({}, "DistillConfig settings of the short select distillations")
    mi: dict | None = _opt({}, "teacher_information options (method, features, noise, max_samples, ...); none: no "
                               "MI measurement")
    sharpness: dict | None = _opt({}, "options of the teachers' sharpness measurement (SAM increase, top Hessian "
                                      "eigenvalue: batches, batch_size, iters, tol, rho, eigen, seed); none: not "
                                      "measured; may change between invocations: only the sharpness is measured "
                                      "again")
    confidence: float | None = _opt(0.95, "confidence level of the intervals; none: no intervals (allows one seed)")
    device: str = _opt("auto", "device of every stage: 'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1'")
    amp: bool = _opt(False, "mixed precision in every stage: bfloat16 on CPU, float16 with a GradScaler on CUDA")
    output: str = _opt("runs/study", "the study folder")
    progress: bool = _opt(True, "progress bars and every stage's lines; without, one line per finished run")
    quick: bool = _opt(False, "tiny test models on digits, 2 seeds, 1 epoch (seconds; a smoke test); recorded")

    def __post_init__(self) -> None:
        paths_as_strings(self)  # output=Path(...), data_dir=Path(...): recorded as text
        for f in dataclasses.fields(self):  # a bool setting takes True or False, never a string that reads as true
            if typing.get_type_hints(type(self))[f.name] is bool:
                check_bool(f.name, getattr(self, f.name))
        for name in ("teacher", "student"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name} must be a timm model name such as 'vit_tiny_patch16_224', got "
                                  f"{getattr(self, name)!r} (or pass quick=True / --quick for tiny test models)")
        for name in ("dataset", "device", "output"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("teacher_kwargs", "student_kwargs", "finetune", "distill", "select_options"):
            if not isinstance(getattr(self, name), Mapping):
                raise ConfigError(f"{name} must be a mapping of settings, got {getattr(self, name)!r}")
            setattr(self, name, dict(getattr(self, name)))
        self.arms = _name_list("arms", self.arms)
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ConfigError(f"unknown arm(s) {unknown}; a study's arms are {_ARM_WORDS}")
        if not self.arms:
            raise ConfigError(f"arms is empty; name at least one of {_ARM_WORDS}")
        self.arms = [a for a in ARMS if a in self.arms]  # report order, duplicates dropped
        check_int("seeds", self.seeds, low=1)
        check_int("first_seed", self.first_seed, low=0)
        if not isinstance(self.alpha, (list, tuple)) or not self.alpha:
            raise ConfigError(f"alpha must be a non-empty list of reweighting factors such as [0.85], got "
                              f"{self.alpha!r}")
        self.alpha = list(dict.fromkeys(float(check_float("alpha", a, low=0, low_open=True,
                                                          hint="ReMem uses (0, 1], e.g. 0.85")) for a in self.alpha))
        self.schedule = _name_list("schedule", self.schedule)
        bad = [s for s in self.schedule if s not in SCHEDULES]
        if bad or not self.schedule:
            raise ConfigError(f"schedule must list 'exponential' and/or 'constant', got {self.schedule!r}")
        check_float("rho", self.rho, low=0, low_open=True,
                    hint="the sam, onepass and remem arms need a SAM radius, e.g. 0.05")
        if self.mi is not None:
            if not isinstance(self.mi, Mapping):
                raise ConfigError(f"mi must be a mapping of teacher_information options or None, got {self.mi!r}")
            self.mi = dict(self.mi)
            extra = sorted(set(self.mi) - set(_MI_OPTIONS))
            if extra:
                raise ConfigError(f"unknown mi option(s) {extra}; valid: {list(_MI_OPTIONS)}")
        if self.sharpness is not None:
            if not isinstance(self.sharpness, Mapping):
                raise ConfigError(f"sharpness must be a mapping of sharpness options such as {{'iters': 20}}, or None "
                                  f"(--no-sharpness) to skip the measurement, got {self.sharpness!r}")
            self.sharpness = dict(self.sharpness)
            _check_sharpness(self.sharpness)
        if self.confidence is not None:
            check_float("confidence", self.confidence, low=0, high=1, low_open=True, high_open=True,
                        hint="0.95 is usual; None turns intervals off")
            if self.seeds < 2:
                raise ConfigError(
                    f"seeds={self.seeds}: a confidence interval needs at least 2 seeds per arm; pass seeds=2 or more "
                    "(--seeds 3 is the default), or confidence=None (--confidence none) for a run without intervals"
                )
        for name, cls in (("finetune", FinetuneConfig), ("distill", DistillConfig), ("select_options", DistillConfig)):
            _check_stage(name, cls, getattr(self, name))

    @property
    def seed_list(self) -> list[int]:
        """The seeds every arm runs."""
        return list(range(self.first_seed, self.first_seed + self.seeds))

    def to_dict(self) -> dict[str, Any]:
        """Sorted JSON-ready dict, stamped with the timm-remem version."""
        return dataclass_to_dict(self, stamp_version=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudyConfig:
        """Build from a dict; unknown keys are dropped with a warning."""
        return dataclass_from_dict(cls, data, ignore=("version",))

    def fingerprint(self) -> dict[str, Any]:
        """The settings two invocations of one study must share (everything but arms, seeds, output, progress and
        the confidence level, which may change between invocations: a study can gain arms and seeds)."""
        return {k: v for k, v in json.loads(json.dumps(self.to_dict())).items() if k not in _FREE + ("version",)}


# The arms in words, defaults first: "plain, reweight, sam, remem, student (the default) and onepass".
_ARM_WORDS = (", ".join(DEFAULT_ARMS) + " (the default) and " + ", ".join(a for a in ARMS if a not in DEFAULT_ARMS))


def _check_sharpness(options: dict[str, Any]) -> None:
    extra = sorted(set(options) - set(SHARPNESS_DEFAULTS))
    if extra:
        raise ConfigError(f"unknown sharpness option(s) {extra}; valid: {list(SHARPNESS_DEFAULTS)} (or sharpness=None, "
                          "--no-sharpness, to skip the measurement)")
    for name in ("batches", "batch_size", "iters"):
        if name in options:
            check_int(f"sharpness {name}", options[name], low=1)
    if "seed" in options:
        check_int("sharpness seed", options["seed"], low=0)
    if "tol" in options:
        check_float("sharpness tol", options["tol"], low=0, low_open=True, hint="a relative tolerance such as 1e-3")
    if "rho" in options:
        check_float("sharpness rho", options["rho"], low=0, low_open=True, allow_none=True,
                    hint="SAM's radius, e.g. 0.05; None takes the study's rho")
    if "eigen" in options:
        check_bool("sharpness eigen", options["eigen"], hint="eigen=false skips the Hessian's top eigenvalue")


def sharpness_settings(cfg: StudyConfig) -> dict[str, Any] | None:
    """The sharpness options every teacher of ``cfg`` is measured with (defaults filled in, ``rho`` resolved to the
    study's), or None when the measurement is off.

    Example:
        >>> cfg = StudyConfig(teacher="t", student="s", rho=0.1, sharpness={"iters": 5})
        >>> s = sharpness_settings(cfg)
        >>> s["iters"], s["rho"], s["batch_size"]
        (5, 0.1, 32)
        >>> sharpness_settings(StudyConfig(teacher="t", student="s", sharpness=None)) is None
        True
    """
    if cfg.sharpness is None:
        return None
    out = {**SHARPNESS_DEFAULTS, **cfg.sharpness}
    if out["rho"] is None:
        out["rho"] = cfg.rho
    out["rho"], out["tol"] = float(out["rho"]), float(out["tol"])
    return out


def _name_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} must be a list of names, got {value!r}")
    return list(dict.fromkeys(value))


def _check_stage(name: str, cls: type, options: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown {name} setting(s) {unknown}; valid: {sorted(known - set(_STUDY_OWNED))}")
    owned = sorted(set(options) & set(_STUDY_OWNED))
    if owned:
        raise ConfigError(f"{name} setting(s) {owned} are set by the study itself (per arm and seed, or once for "
                          "every stage: teacher, student, dataset, data_dir, device, amp, alpha, schedule, rho, and "
                          "sam by the arm: sam or onepass); set them at the study level")


def plan_arms(cfg: StudyConfig) -> list[Arm]:
    """The arms of ``cfg``, sweeps expanded (see the module docstring).

    Example:
        >>> cfg = StudyConfig(teacher="t", student="s", schedule=["exponential", "constant"], arms=["reweight"])
        >>> [(a.name, a.schedule) for a in plan_arms(cfg)]
        [('reweight-exponential', 'exponential'), ('reweight-constant', 'constant')]
    """
    arms: list[Arm] = []
    for kind in cfg.arms:
        if kind in REWEIGHT_ARMS:
            for alpha in cfg.alpha:
                for schedule in cfg.schedule:
                    name = kind + (f"-a{alpha:g}" if len(cfg.alpha) > 1 else "") + (
                        f"-{schedule}" if len(cfg.schedule) > 1 else "")
                    arms.append(Arm(name, kind, alpha, schedule, cfg.rho if kind == "remem" else 0.0))
        else:
            arms.append(Arm(kind, kind, rho=cfg.rho if kind in SAM_ARMS else 0.0, sam=SAM_ARMS.get(kind, "exact")))
    return arms


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Study settings from a YAML (``.yaml``/``.yml``) or JSON file: a mapping of :class:`StudyConfig` fields.

    Raises:
        ConfigError: A missing file, a file that does not parse, or one that is not a mapping.

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "study.yaml"
        >>> _ = p.write_text("teacher: test_vit\\nstudent: test_resnet\\nseeds: 2\\n")
        >>> load_config(p)["seeds"]
        2
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"study config file {str(p)!r} does not exist; pass a .yaml or .json file")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml  # a timm dependency
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"study config {str(p)!r} is not valid YAML: {err}") from err
    else:
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ConfigError(f"study config {str(p)!r} is not valid JSON ({err}); YAML files end in .yaml") from err
    if not isinstance(data, Mapping):
        raise ConfigError(f"study config {str(p)!r} must hold a mapping of settings, got {type(data).__name__}")
    return dict(data)


def study_config(config: StudyConfig | Mapping[str, Any] | None = None, /, **kwargs: Any) -> StudyConfig:
    """A :class:`StudyConfig` from a config (or a mapping, e.g. :func:`load_config`'s) updated with ``kwargs``;
    ``quick=True`` starts from :data:`QUICK`. Unknown names are refused.

    Example:
        >>> study_config(quick=True).seeds, study_config({"teacher": "a", "student": "b"}, seeds=5).seeds
        (2, 5)
    """
    if isinstance(config, StudyConfig):
        base: dict[str, Any] = {f.name: getattr(config, f.name) for f in dataclasses.fields(StudyConfig)}
    elif config is None or isinstance(config, Mapping):
        base = dict(config or {})
        base.pop("version", None)
    else:
        raise ConfigError(f"config must be a StudyConfig or a mapping, got {type(config).__name__}")
    merged = {**base, **kwargs}
    known = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ConfigError(f"unknown study setting(s) {unknown}; valid: {sorted(known)}")
    if merged.get("quick"):
        for key in ("finetune", "distill", "select_options", "mi", "sharpness"):  # dicts merge key by key
            if isinstance(merged.get(key), Mapping):
                merged[key] = {**QUICK[key], **merged[key]}
        merged = {**QUICK, **merged}
    return StudyConfig(**merged)
