"""Running a study: every (arm, seed) in its own resumable run folder, finished runs skipped.

Layout of a study folder (see ``docs/evidence.md``)::

    study-settings.json            the settings every invocation of this study must share
    runs/<arm>/seed-<s>/           teacher/, select/, student/ (stage folders), stages.json (the stages finished so
                                   far), result.json (the run is finished when it exists and matches)
    study.json, study.md, study.png

The sharpness options are recorded with the sharpness stage, not in the run's settings: changing them measures the
sharpness again (from the teacher checkpoint on disk) and trains nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .. import distributed
from .._io import atomic_write_json, check_real_folders, claim_output_dir
from .._models import create_timm_model, data_config
from ..analysis import teacher_information
from ..data import create_dataset, create_loader
from ..errors import ConfigError, RememError
from ..reweighting import find_branches
from ..teachers import load_teacher_model
from ..train.builders import dataset_classes, default_img_size, resolve_device
from ..train.config import DistillConfig, FinetuneConfig
from ..train.console import LOGGER
from ..train.recipes import distill_student, finetune_teacher
from ..train.select import select_teacher
from ._sharpness import measure_teacher_sharpness
from .config import REWEIGHT_ARMS, Arm, StudyConfig, plan_arms, sharpness_settings, study_config
from .report import StudyResult, summarise, write_report

__all__ = ["run_study", "run_folder", "run_settings", "SETTINGS_FILE", "RESULT_FILE"]

SETTINGS_FILE = "study-settings.json"
RESULT_FILE = "result.json"
_STAGES_FILE = "stages.json"
_LEFT_OUT = ("output", "resume", "progress", "teacher", "version")  # not part of what a stage computes
_run_log = logging.getLogger(f"{LOGGER}.study")  # one line per run, through the stages' console handler


def run_folder(output: str | Path, arm: str, seed: int) -> Path:
    """The folder of one run of a study.

    Example:
        >>> run_folder("runs/study", "remem", 2).as_posix()
        'runs/study/runs/remem/seed-2'
    """
    return Path(output) / "runs" / arm / f"seed-{seed}"


def _stage_dict(cfg: Any) -> dict[str, Any]:
    return {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items() if k not in _LEFT_OUT}


def _resume(options: Mapping[str, Any]) -> str | None:
    """A stage resumes its own killed run (``"auto"``) unless it writes no training state."""
    return "auto" if options.get("save_state", True) else None


def _teacher_config(cfg: StudyConfig, arm: Arm, seed: int, folder: Path) -> FinetuneConfig:
    options = dict(cfg.finetune)
    if cfg.select and "save_at" not in options:  # ReMem's protocol picks among several checkpoints
        epochs = int(options.get("epochs", FinetuneConfig.epochs))
        options["save_at"] = sorted({max(1, epochs // 3), max(1, 2 * epochs // 3), epochs})
    return FinetuneConfig(
        **options, model=cfg.teacher, model_kwargs=dict(cfg.teacher_kwargs), pretrained=cfg.pretrained,
        dataset=cfg.dataset, data_dir=cfg.data_dir, seed=seed, device=cfg.device, amp=cfg.amp, alpha=arm.alpha,
        schedule=arm.schedule or "exponential", rho=arm.rho, sam=arm.sam, output=str(folder / "teacher"),
        resume=_resume(options), progress=cfg.progress,
    )


def _student_config(cfg: StudyConfig, seed: int, folder: Path, teacher: str | None) -> DistillConfig:
    return DistillConfig(
        **cfg.distill, model=cfg.student, model_kwargs=dict(cfg.student_kwargs), dataset=cfg.dataset,
        data_dir=cfg.data_dir, seed=seed, device=cfg.device, amp=cfg.amp, teacher=teacher,
        output=str(folder / "student"), resume=_resume(cfg.distill), progress=cfg.progress,
    )


# The data settings of the students that the short select distillations inherit (unless select_options sets them):
# a few-label study must not pick its teachers with labels its students never see.
_SELECT_INHERITS = ("train_per_class", "train_imbalance", "subset_seed", "labels_per_class", "img_size")


def _select_options(cfg: StudyConfig, seed: int, folder: Path) -> dict[str, Any]:
    inherited = {k: cfg.distill[k] for k in _SELECT_INHERITS if k in cfg.distill}
    return {"epochs": 2, **inherited, **cfg.select_options, "model": cfg.student,
            "model_kwargs": dict(cfg.student_kwargs), "dataset": cfg.dataset, "data_dir": cfg.data_dir, "seed": seed,
            "device": cfg.device, "amp": cfg.amp, "output": str(folder / "select"), "progress": cfg.progress}


def run_settings(cfg: StudyConfig, arm: Arm, seed: int) -> dict[str, Any]:
    """What one run computes (its result must match it to count as finished): the arm, the seed and every stage's
    settings, paths left out (a study folder can be moved)."""
    here = Path(".")
    out: dict[str, Any] = {"arm": arm.name, "kind": arm.kind, "alpha": arm.alpha, "schedule": arm.schedule,
                           "rho": arm.rho, "seed": seed, "distill": _stage_dict(_student_config(cfg, seed, here, None))}
    if arm.has_teacher:
        out["finetune"] = _stage_dict(_teacher_config(cfg, arm, seed, here))
        out["select"] = ({k: v for k, v in _select_options(cfg, seed, here).items() if k not in _LEFT_OUT}
                         if cfg.select else None)
        out["mi"] = cfg.mi
    return json.loads(json.dumps(out))


def _defaults(cls: type) -> dict[str, Any]:
    """The JSON form of each field default of a stage config class."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return json.loads(json.dumps(out))


_STAGE_CLASSES = {"finetune": FinetuneConfig, "distill": DistillConfig}


def _same_settings(saved: Any, current: dict[str, Any]) -> bool:
    """Whether a run's recorded settings are ``current``. A stage setting the record lacks counts as the same when
    its value now is the field's default: a field added to FinetuneConfig/DistillConfig later defaults to what the
    code did before (``sam="exact"``), so runs finished before it existed are not recomputed."""
    if not isinstance(saved, dict) or saved.keys() != current.keys():
        return False
    for key, value in current.items():
        old = saved[key]
        if key in _STAGE_CLASSES and isinstance(value, dict) and isinstance(old, dict):
            defaults = _defaults(_STAGE_CLASSES[key])
            value = {k: v for k, v in value.items() if k in old or k not in defaults or v != defaults[k]}
        if old != value:
            return False
    return True


def _check_reweightable(cfg: StudyConfig, arms: list[Arm]) -> None:
    """Refuse, before anything runs, a teacher without MLP branches when reweight/remem arms are asked for."""
    wanted = [a.name for a in arms if a.kind in REWEIGHT_ARMS]
    if not wanted:
        return
    probe = FinetuneConfig(model=cfg.teacher, model_kwargs=dict(cfg.teacher_kwargs), dataset=cfg.dataset,
                           data_dir=cfg.data_dir, **{k: v for k, v in cfg.finetune.items() if k == "img_size"})
    model = create_timm_model(cfg.teacher, pretrained=False, num_classes=2, img_size=default_img_size(probe),
                              kwargs=cfg.teacher_kwargs)
    try:
        find_branches(model)
    except RememError as err:
        others = [a for a in cfg.arms if a not in REWEIGHT_ARMS]
        raise ConfigError(
            f"teacher {cfg.teacher!r} cannot be reweighted, so arm(s) {wanted} cannot run: {err} Arms that can "
            f"still run with this teacher: {', '.join(others) or 'plain, sam, onepass, student'} (e.g. --arms "
            f"{' '.join(others) or 'plain sam onepass student'}), or pick a ViT-style teacher"
        ) from err


def _check_folder(cfg: StudyConfig, out: Path) -> None:
    """A study folder belongs to one study: refuse one that holds another study's settings (nothing written)."""
    path = out / SETTINGS_FILE
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ConfigError(f"{str(path)!r} is damaged ({err}); move the folder away or choose another "
                              "output folder") from err
        mine = cfg.fingerprint()
        diffs = [f"{k}={saved.get(k)!r} (folder) vs {mine.get(k)!r} (now)" for k in sorted(set(saved) | set(mine))
                 if k != "version" and saved.get(k) != mine.get(k)]
        if diffs:
            raise ConfigError(
                f"study folder {str(out)!r} holds another study's settings: {'; '.join(diffs)}. Rerun with the same "
                "settings to resume it (arms and seeds may change), or choose another output folder"
            )
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{str(out)!r} is not empty and holds no study ({SETTINGS_FILE} is missing); choose "
                          "another output folder")


def _measure_mi(cfg: StudyConfig, tcfg: FinetuneConfig, checkpoint: str) -> float:
    """The teacher's I(X; F_T) on the validation split, images normalised as the checkpoint expects."""
    num_classes = dataset_classes(tcfg)
    device = resolve_device(cfg.device)
    model = load_teacher_model(checkpoint, num_classes=num_classes).to(device).eval()
    dc = data_config(model)
    size = default_img_size(tcfg) or int(dc["input_size"][-1])
    val = create_dataset(cfg.dataset, cfg.data_dir, "val", img_size=size, mean=dc["mean"], std=dc["std"])
    loader = ((x, y) for x, y, _ in create_loader(val, tcfg.eval_batch_size))
    options = {"max_samples": 2000, **(cfg.mi or {})}
    return float(teacher_information(model, loader, device=device, progress=False, **options).i_xf)


@contextlib.contextmanager
def _stage_lines(shown: bool):
    """Without progress, the ``timm_remem.train`` logger (and its children) drops records below WARNING while the
    study runs, leaving one line per run (``_run_log``, at the level the application had set)."""
    stage_logger = logging.getLogger(LOGGER)
    previous = stage_logger.level
    _run_log.setLevel(stage_logger.getEffectiveLevel())  # its own level: a quiet parent does not drop it
    if not shown:
        stage_logger.setLevel(max(stage_logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        stage_logger.setLevel(previous)


def _run_line(row: Mapping[str, Any], done: int, total: int, seconds: float) -> str:
    """``study [3/10] plain seed 1: teacher 0.9278, student 0.9500 (21 s)``."""
    parts = [f"teacher {row['teacher_acc']:.4f}"] if row.get("teacher_acc") is not None else []
    parts.append(f"student {row['student_acc']:.4f}")
    return f"study [{done}/{total}] {row['arm']} seed {row['seed']}: {', '.join(parts)} ({seconds:.0f} s)"


def _sharpness_stage(tcfg: FinetuneConfig, cfg: StudyConfig, arm: Arm, seed: int, checkpoint: str,
                     wanted: dict[str, Any], stages: dict[str, Any], done: Callable[[str, dict[str, Any]], None],
                     say: Callable[[str], None]) -> dict[str, Any]:
    """The sharpness stage of a run: the one recorded when its options are ``wanted``, else measured now."""
    stage = stages.get("sharpness")
    if stage is None or stage.get("settings") != wanted or stage.get("checkpoint") != Path(checkpoint).name:
        say(f"{arm.name} seed {seed}: measuring the teacher's sharpness")
        t0 = time.perf_counter()
        values = measure_teacher_sharpness(tcfg, checkpoint, wanted, cfg.device)
        done("sharpness", {**values, "settings": wanted, "checkpoint": Path(checkpoint).name,
                           "time_s": time.perf_counter() - t0})
    return stages["sharpness"]


def _set_sharpness(row: dict[str, Any], stage: dict[str, Any] | None) -> None:
    """The sharpness fields of a result row: the two measures, the details (settings included) and the time."""
    row["sam_increase"] = None if stage is None else stage["sam_increase"]
    row["top_eigenvalue"] = None if stage is None else stage["top_eigenvalue"]
    row["sharpness"] = None if stage is None else {k: v for k, v in stage.items()
                                                   if k not in ("sam_increase", "top_eigenvalue", "time_s")}
    row.setdefault("times", {}).pop("sharpness", None)
    if stage is not None:
        row["times"]["sharpness"] = stage["time_s"]


def _run_one(cfg: StudyConfig, arm: Arm, seed: int, folder: Path, say: Callable[[str], None]) -> dict[str, Any]:
    check_real_folders(cfg.output, folder)  # runs/<arm>/seed-N: never read or written through a symlink
    settings = run_settings(cfg, arm, seed)
    wanted = sharpness_settings(cfg) if arm.has_teacher else None
    result_path = folder / RESULT_FILE
    stages_path = folder / _STAGES_FILE
    finished = None
    if result_path.is_file():
        finished = json.loads(result_path.read_text(encoding="utf-8"))
        if not _same_settings(finished.get("settings"), settings):
            raise ConfigError(f"run folder {str(folder)!r} holds a result computed with other settings; delete that "
                              "folder to recompute it, or choose another study output folder")
        if (finished.get("sharpness") or {}).get("settings") == wanted:
            say(f"{arm.name} seed {seed}: finished earlier, skipped")
            return finished
    stages: dict[str, Any] = {}
    if stages_path.is_file():
        saved = json.loads(stages_path.read_text(encoding="utf-8"))
        stages = saved.get("stages", {}) if _same_settings(saved.get("settings"), settings) else {}

    def done(name: str, value: dict[str, Any]) -> None:
        stages[name] = value
        atomic_write_json(stages_path, {"settings": settings, "stages": stages})

    if finished is not None:  # a finished run whose sharpness is missing, out of date or switched off: that only
        row = {**finished, "settings": settings}
        stage = None
        if wanted is not None:
            checkpoint = str(folder / "teacher" / "checkpoints" / finished["checkpoint"])
            stage = _sharpness_stage(_teacher_config(cfg, arm, seed, folder), cfg, arm, seed, checkpoint, wanted,
                                     stages, done, say)
        _set_sharpness(row, stage)
        atomic_write_json(result_path, row)
        return row

    folder.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"arm": arm.name, "kind": arm.kind, "seed": seed, "teacher_acc": None, "mi": None,
                           "sam_increase": None, "top_eigenvalue": None, "checkpoint": None, "sharpness": None,
                           "times": {}}
    teacher_path = None
    if arm.has_teacher:
        tcfg = _teacher_config(cfg, arm, seed, folder)
        if "teacher" not in stages:
            say(f"{arm.name} seed {seed}: fine-tuning the teacher")
            res = finetune_teacher(tcfg)
            done("teacher", {"val_acc": res.val_acc, "checkpoints": [p.name for p in res.checkpoints],
                             "time_s": res.wall_time})
        teacher_stage = stages["teacher"]
        ckpts = folder / "teacher" / "checkpoints"
        teacher_path = str(ckpts / teacher_stage["checkpoints"][-1])
        row["times"]["teacher"] = teacher_stage["time_s"]
        if cfg.select:
            if "select" not in stages:
                say(f"{arm.name} seed {seed}: choosing the teacher checkpoint (select)")
                t0 = time.perf_counter()
                sel = select_teacher(ckpts, **_select_options(cfg, seed, folder))
                done("select", {"best": sel.best.name, "time_s": time.perf_counter() - t0})
            teacher_path = str(ckpts / stages["select"]["best"])
            row["times"]["select"] = stages["select"]["time_s"]
        row["checkpoint"] = Path(teacher_path).name
        if cfg.mi is not None:
            if "mi" not in stages:
                t0 = time.perf_counter()
                done("mi", {"i_xf": _measure_mi(cfg, tcfg, teacher_path), "time_s": time.perf_counter() - t0})
            row["mi"] = stages["mi"]["i_xf"]
            row["times"]["mi"] = stages["mi"]["time_s"]
        if wanted is not None:
            _set_sharpness(row, _sharpness_stage(tcfg, cfg, arm, seed, teacher_path, wanted, stages, done, say))
    if "student" not in stages:
        say(f"{arm.name} seed {seed}: " + ("distilling the student" if teacher_path else "training the student alone"))
        res = distill_student(_student_config(cfg, seed, folder, teacher_path))
        done("student", {"val_acc": res.val_acc, "teacher_acc": res.teacher_acc, "time_s": res.wall_time})
    row["student_acc"] = stages["student"]["val_acc"]
    row["teacher_acc"] = stages["student"]["teacher_acc"]  # the chosen checkpoint's accuracy, as distilled
    row["times"]["student"] = stages["student"]["time_s"]
    row["settings"] = settings
    atomic_write_json(result_path, row)
    return row


def run_study(config: StudyConfig | Mapping[str, Any] | None = None, /, **kwargs: Any) -> StudyResult:
    """Run the ReMem ablation: every arm over every seed, then the statistics, the table and the plot.

    A killed study resumes when called again with the same settings; finished runs are skipped, so adding arms or
    seeds to a finished study runs only the new ones.

    Args:
        config: A :class:`~timm_remem.study.StudyConfig`, or a mapping of its fields (e.g. from
            :func:`~timm_remem.study.load_config`); keyword arguments override it.
        **kwargs: Any :class:`~timm_remem.study.StudyConfig` field (``quick=True`` starts from tiny test models).

    Returns:
        A :class:`~timm_remem.study.StudyResult` (also written: ``study.json``, ``study.md``, ``study.png``).

    Raises:
        ConfigError: Unknown arms, fewer than 2 seeds with intervals, a teacher that cannot be reweighted in the
            reweight/remem arms, or a study folder that holds another study's settings (nothing is written then).

    Example:
        >>> import tempfile
        >>> res = run_study(quick=True, arms=["plain", "sam"], output=tempfile.mkdtemp(), progress=False)
        >>> [a["arm"] for a in res.arms], res.arms[1]["vs_plain"]["verdict"] in res.verdicts
        (['plain', 'sam'], True)
    """
    cfg = study_config(config, **kwargs)
    if distributed.env_world_size() > 1:
        raise ConfigError("a study runs in one process (it runs many short trainings); run it without torchrun")
    arms = plan_arms(cfg)
    out = Path(cfg.output)
    _check_folder(cfg, out)
    _check_reweightable(cfg, arms)
    t_start = time.perf_counter()
    claim_output_dir(out, "study")  # the one ownership check (timm_remem._io): ours, or refused
    atomic_write_json(out / SETTINGS_FILE, cfg.fingerprint())

    def say(text: str) -> None:
        if cfg.progress:
            print(f"== study: {text}", flush=True)

    runs = []
    total = len(arms) * len(cfg.seed_list)
    with _stage_lines(shown=cfg.progress):
        for arm in arms:
            for seed in cfg.seed_list:
                t0 = time.perf_counter()
                runs.append(_run_one(cfg, arm, seed, run_folder(out, arm.name, seed), say))
                _run_log.info(_run_line(runs[-1], len(runs), total, time.perf_counter() - t0))
    summary = summarise(cfg, [a.name for a in arms], runs)
    result = write_report(cfg, summary, runs, out, wall_time=time.perf_counter() - t_start)
    if cfg.progress:
        print(result.table)
        print("wrote: " + ", ".join(str(p) for p in result.files))
    return result

