"""The run folder and resuming a run from it.

A run writes ``config.json``, ``run-identity.json`` (what it is computed from, see :func:`run_identity`),
``metrics.jsonl`` (one JSON object per epoch), ``train-state/step-*`` (resumable training checkpoints, see
:mod:`timm_remem.checkpoint`) and ``checkpoints/epoch-NNN`` (exports). Resuming (``resume=True``, a checkpoint
path, or ``"auto"``) picks the checkpoint on rank 0, refuses one written with other settings or another number of
processes, refuses data or library versions that changed since the run started (unless
``resume_mismatch="allow"``), restores the loop position (epoch, batch, step, history, running sums), drops metric
lines written after that checkpoint and cleans up exports a crash left half-written.

Example:
    >>> import tempfile, pathlib
    >>> from timm_remem.train.resume import truncate_metrics
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.jsonl"
    >>> _ = path.write_text('{"step": 3}\\n{"step": 6}\\n')
    >>> truncate_metrics(path, 3)
    >>> path.read_text()
    '{"step": 3}\\n'
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch

from .. import distributed
from .._io import atomic_write_json, atomic_write_text, claim_output_dir
from .._version import __version__
from ..checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint, set_rng_state
from ..data import dataset_differences, dataset_identity
from ..errors import CheckpointError, ConfigError
from ..teachers import EXPORT_DIR
from .config import TrainConfig
from .console import log
from .lock import CONFIG_FILE, IDENTITY_FILE

__all__ = [
    "METRICS_FILE",
    "STATE_DIR",
    "EXPORT_DIR",
    "RESUME_FREE",
    "LoopState",
    "restore",
    "resume_path",
    "config_differences",
    "check_resume_config",
    "truncate_metrics",
    "remove_stale_exports",
    "resumed_epoch",
    "prepare_output",
    "IDENTITY_FILE",
    "run_identity",
    "identity_differences",
    "attach_identity",
    "attached_identity",
    "check_run_identity",
]

METRICS_FILE = "metrics.jsonl"
STATE_DIR = "train-state"
# Configuration fields that may change between a run and its resumption: how a run is shown, saved and logged,
# where it runs and what it may download. num_workers changes nothing (each sample's augmentation is seeded by
# (seed, epoch, index)); device and clip_grad change the numbers, on purpose (moving a run to another machine,
# clipping after a divergence). They are left out of the settings diff and of the run's identity.
RESUME_FREE = frozenset(
    {"resume", "resume_mismatch", "progress", "output", "num_workers", "device", "save_at", "keep_last",
     "checkpoint_every", "save_state", "clip_grad", "log", "download", "version"}
)
IDENTITY_FORMAT = 1


def _zero_running() -> dict[str, Any]:
    return {"loss": 0.0, "correct": 0, "count": 0, "time": 0.0}


@dataclass
class LoopState:
    """Where the training loop stands: the epoch and batch to run next, optimizer steps so far, the metrics of the
    finished epochs and the running sums of the current one (all saved in every training checkpoint).

    Example:
        >>> s = LoopState()
        >>> s.end_epoch(); (s.epoch, s.batch, s.running["count"])
        (1, 0, 0)
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    running: dict[str, Any] = field(default_factory=_zero_running)

    def end_epoch(self) -> None:
        """Move to the start of the next epoch."""
        self.epoch += 1
        self.batch = 0
        self.running = _zero_running()


def resume_path(src: Path) -> Path:
    """The checkpoint to resume from (``src`` or its newest valid one), chosen on rank 0 and sent to every rank."""
    return Path(distributed.run_on_main(lambda: str(resolve_checkpoint(src))))


def _as_saved(value: Any) -> Any:
    return json.loads(json.dumps(value))  # as a checkpoint holds it: tuples become lists


def _shown(value: Any) -> str:
    return "unset" if value is None else json.dumps(value, sort_keys=True)


def config_differences(saved: Mapping[str, Any], cfg: TrainConfig) -> list[str]:
    """The settings (outside :data:`RESUME_FREE`) that differ between a checkpoint's config and ``cfg``, as
    ``name: saved -> now`` lines; a setting the checkpoint predates counts as its default.

    Example:
        >>> from timm_remem.train import FinetuneConfig
        >>> cfg = FinetuneConfig(model="test_vit", lr=0.01)
        >>> saved = FinetuneConfig(model="test_vit", alpha=0.8).to_dict()
        >>> config_differences(saved, cfg)
        ['alpha: 0.8 -> unset', 'lr: 0.001 -> 0.01']
    """
    current = _as_saved(cfg.to_dict())
    defaults = _as_saved({
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(cfg)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    })
    return [
        f"{k}: {_shown(saved.get(k, defaults.get(k)))} -> {_shown(current.get(k))}"
        for k in sorted(set(saved) | set(current))
        if k not in RESUME_FREE and saved.get(k, defaults.get(k)) != current.get(k)
    ]


def _mismatch(path: Path, diffs: list[str]) -> CheckpointError:
    # one setting a line, punctuated so that the message still reads as one line (the command line prints it so)
    lines = "".join(f"\n  {d}{';' if i < len(diffs) - 1 else '.'}" for i, d in enumerate(diffs))
    return CheckpointError(
        f"checkpoint {str(path)!r} was written by a run with other settings (saved -> now):{lines}\nResume with "
        "the same settings, or start a fresh run in another output folder"
    )


def check_resume_config(saved: Mapping[str, Any], cfg: TrainConfig, path: Path) -> None:
    """Refuse to resume with settings other than the saved ones (except those in :data:`RESUME_FREE`), listing
    every difference as a ``name: saved -> now`` line."""
    diffs = config_differences(saved, cfg)
    if diffs:
        raise _mismatch(path, diffs)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after ``step`` (by a run that crashed after its last checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def remove_stale_exports(folder: Path) -> None:
    """Clean up after a crash during an export: delete half-written ``.tmp-*`` folders (their epoch is trained and
    exported again) and put back an ``.old-<name>`` export whose replacement never arrived."""
    if not folder.is_dir():
        return
    for stale in sorted(folder.iterdir()):
        if not stale.is_dir():
            continue
        if stale.name.startswith(".old-") and not (folder / stale.name[len(".old-"):]).exists():
            os.replace(stale, folder / stale.name[len(".old-"):])
        elif stale.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(stale, ignore_errors=True)


def _wants_resume(cfg: TrainConfig, state_dir: Path | None) -> bool | str | None:
    """``cfg.resume`` with ``"auto"`` decided (on rank 0, so that every rank does the same)."""
    if cfg.resume != "auto":
        return cfg.resume
    if state_dir is None:
        raise ConfigError("resume='auto' needs save_state=True (the run's own train-state folder)")
    found = distributed.is_main_process() and bool(list_checkpoints(state_dir))
    return True if distributed.broadcast_object(found) else None


def restore(
    cfg: TrainConfig, out: Path, state_dir: Path | None, *, model, optimizer, scheduler, scaler, ema,
) -> tuple[LoopState, Path | None]:
    """Resume the run if asked to, else make sure ``out`` holds no run that would be overwritten.

    Loads the checkpoint into ``model``/``optimizer``/``scheduler``/``scaler``/``ema`` (and this rank's random
    state under torchrun). Returns the loop position and the checkpoint it resumed from (None: a fresh start).
    Settings that differ from the checkpoint's are the first thing reported, before any weight mismatch.

    Raises:
        ConfigError: Resuming without a train-state folder, a fresh start in a folder that holds checkpoints, or
            a resume whose data or library versions differ from the run's start (see :func:`check_run_identity`).
        CheckpointError: A damaged checkpoint, or one written with other settings or another process count.
    """
    world, rank = distributed.get_world_size(), distributed.get_rank()
    metrics_path = out / METRICS_FILE
    resume = _wants_resume(cfg, state_dir)
    if not resume:
        if state_dir is not None and (state_dir.exists() or metrics_path.exists()) and list_checkpoints(state_dir):
            raise ConfigError(
                f"{str(out)!r} already holds training checkpoints; resume it (resume=True / --resume) or choose "
                "another output folder"
            )
        return LoopState(), None
    src = state_dir if resume is True else Path(resume)
    if src is None:
        raise ConfigError("resume=True needs save_state=True (the run's own train-state folder)")
    path = resume_path(src)  # chosen by rank 0: every rank loads the very same checkpoint
    try:
        info = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema)
    except CheckpointError as e:  # other settings explain a key or shape mismatch better than the keys do
        diffs = config_differences(_saved_config(path), cfg)
        if diffs:
            raise _mismatch(path, diffs) from e
        raise
    check_resume_config(info.config, cfg, info.path)
    distributed.run_on_main(lambda: check_run_identity(cfg, info.path, out))
    saved_world = int(info.extra.get("world_size", 1))
    if saved_world != world:
        raise CheckpointError(
            f"checkpoint {str(info.path)!r} was written by a run of {saved_world} process(es) but this run has "
            f"{world}: the data shards, the steps per epoch (hence the learning-rate schedule) and the random "
            f"states depend on it. Resume with the same number of processes (torchrun --nproc_per_node "
            f"{saved_world}), or start a fresh run in another output folder"
        )
    if world > 1 and "rank_rng" in info.extra:
        set_rng_state(info.extra["rank_rng"][rank])
    state = LoopState(epoch=int(info.extra["epoch"]), batch=int(info.extra["batch"]), step=info.step,
                      history=list(info.extra.get("history", [])),
                      running=dict(info.extra.get("running", _zero_running())))
    if rank == 0:
        truncate_metrics(metrics_path, state.step)
        remove_stale_exports(out / EXPORT_DIR)
    return state, info.path


def _saved_config(path: Path) -> dict[str, Any]:
    """The configuration a checkpoint was written with ({} when even that cannot be read)."""
    try:
        return dict(load_checkpoint(path, restore_rng=False, verify=False).config)
    except CheckpointError:
        return {}


def resumed_epoch(state: LoopState) -> int:
    """The 1-based epoch a checkpoint was written in: the one in progress, or the one it ends.

    Example:
        >>> resumed_epoch(LoopState(epoch=0, batch=4, step=4)), resumed_epoch(LoopState(epoch=1, batch=0, step=12))
        (1, 1)
    """
    return state.epoch if state.batch == 0 and state.epoch > 0 else state.epoch + 1


def prepare_output(cfg: TrainConfig, out: Path, resumed: bool | Path | None) -> None:
    """Write ``config.json`` and ``run-identity.json`` (rank 0, after every rank has looked at the folder); a fresh
    run drops old metrics. ``metrics.jsonl`` is appended to line by line, so a symlink in its place is removed (a
    fresh run) or replaced by a regular file with its lines (a resumed one): it is never written through."""
    distributed.barrier()  # every rank has looked at the output folder before rank 0 writes into it
    if distributed.get_rank() == 0:
        claim_output_dir(out, "run")  # the lock's check again (this run's folder by now: nothing changes)
        atomic_write_text(out / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
        identity = attached_identity(cfg)
        if identity is not None:
            atomic_write_json(out / IDENTITY_FILE, identity, indent=None)
        elif not resumed and (out / IDENTITY_FILE).exists():
            (out / IDENTITY_FILE).unlink()  # another run's: this one records none (fit called on its own)
        metrics_path = out / METRICS_FILE
        if not resumed and (metrics_path.exists() or metrics_path.is_symlink()):
            metrics_path.unlink()
        elif metrics_path.is_symlink():
            lines = metrics_path.read_text(encoding="utf-8") if metrics_path.exists() else ""
            atomic_write_text(metrics_path, lines)


# ---------------------------------------------------------------------------------------------- run identity

_IDENTITY_ATTR = "_timm_remem_run_identity"


def _library_versions() -> dict[str, str]:
    versions = {"timm-remem": __version__, "timm": timm.__version__, "torch": torch.__version__}
    try:  # timm's training transforms are torchvision's
        import torchvision

        versions["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover - timm depends on it
        pass
    return versions


def _teacher_identity(cfg: TrainConfig) -> dict[str, Any] | None:
    """The files of a distillation teacher given as a folder (size and modification time of each)."""
    name = getattr(cfg, "teacher", None)
    if not isinstance(name, str):
        return None
    folder = Path(name[len("local-dir:"):] if name.startswith("local-dir:") else name)
    if not folder.is_dir():
        return None  # a timm or hf-hub: name; the name is a setting (pin a revision with name@revision)
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file():
            st = p.stat()
            files[p.name] = [st.st_size, st.st_mtime_ns]
    return {"folder": str(folder), "files": files}


def run_identity(cfg: TrainConfig, train: Any, val: Any, *, num_classes: int, img_size: int) -> dict[str, Any]:
    """What a run computes from, as JSON data: recorded when it starts (``run-identity.json``), compared on resume.

    - ``settings``: the configuration, less the fields in :data:`RESUME_FREE` (display, saving, logging, where it
      runs: they may change between a run and its resumption);
    - ``resolved``: what the settings left open and the run decided (class count, input size);
    - ``data``: :func:`timm_remem.data.dataset_identity` of the training set (with its training subset) and of the
      validation set: an image folder's files with their sizes and modification times, a dataset's name, split and
      size otherwise;
    - ``teacher``: the files of a distillation teacher given as a folder (sizes and modification times);
    - ``versions``: timm-remem, timm, torch and torchvision.

    Example:
        >>> from timm_remem.data import create_dataset
        >>> from timm_remem.train import FinetuneConfig
        >>> train, val = (create_dataset("digits", split=s, img_size=8) for s in ("train", "val"))
        >>> ident = run_identity(FinetuneConfig(model="test_vit"), train, val, num_classes=10, img_size=8)
        >>> sorted(ident), ident["data"]["train"]["size"]
        (['data', 'format', 'resolved', 'settings', 'teacher', 'versions'], 1437)
    """
    settings = {k: v for k, v in _as_saved(cfg.to_dict()).items() if k not in RESUME_FREE}
    return {"format": IDENTITY_FORMAT, "settings": settings,
            "resolved": {"num_classes": int(num_classes), "img_size": int(img_size)},
            "data": {"train": dataset_identity(train), "val": dataset_identity(val)},
            "teacher": _teacher_identity(cfg), "versions": _library_versions()}


def identity_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What differs between two :func:`run_identity` records, one line each (empty: the same run).

    Example:
        >>> a = {"versions": {"timm": "1.0.31"}, "resolved": {"img_size": 32}}
        >>> identity_differences(a, {"versions": {"timm": "1.0.32"}, "resolved": {"img_size": 32}})
        ['timm 1.0.31 -> 1.0.32']
    """
    lines: list[str] = []
    old_v, new_v = saved.get("versions") or {}, now.get("versions") or {}
    lines += [f"{lib} {old_v.get(lib, 'unrecorded')} -> {new_v.get(lib, 'not installed')}"
              for lib in sorted(set(old_v) | set(new_v)) if old_v.get(lib) != new_v.get(lib)]
    # the settings are compared with the checkpoint's own (check_resume_config, which reports them first)
    old, new = saved.get("resolved") or {}, now.get("resolved") or {}
    lines += [f"{k}: {_shown(old.get(k))} -> {_shown(new.get(k))}" for k in sorted(set(old) | set(new))
              if old.get(k) != new.get(k)]
    old_d, new_d = saved.get("data") or {}, now.get("data") or {}
    for split, what in (("train", "the training data"), ("val", "the validation data")):
        if split in new_d:
            lines += dataset_differences(old_d.get(split), new_d[split], what)
    old_t, new_t = saved.get("teacher"), now.get("teacher")
    if old_t != new_t:
        if old_t and new_t and old_t.get("folder") == new_t.get("folder"):
            changed = sorted(n for n in set(old_t["files"]) | set(new_t["files"])
                             if old_t["files"].get(n) != new_t["files"].get(n))
            lines.append(f"the teacher folder {new_t['folder']!r} changed since the run started: "
                         f"{', '.join(changed)} (other files, sizes or modification times)")
        else:
            lines.append(f"the teacher was {(old_t or {}).get('folder', 'not a folder')}, now "
                         f"{(new_t or {}).get('folder', 'not a folder')}")
    return lines


def attach_identity(cfg: TrainConfig, identity: Mapping[str, Any]) -> None:
    """Hand a run's identity (computed by the recipe with its data) to :func:`restore` and :func:`prepare_output`,
    which the training loop calls with the config alone. It rides on this config object only: a copy
    (``dataclasses.replace``) has none, its serialisation never shows it."""
    object.__setattr__(cfg, _IDENTITY_ATTR, dict(identity))


def attached_identity(cfg: TrainConfig) -> dict[str, Any] | None:
    """The identity :func:`attach_identity` gave ``cfg`` (None: the run records none, e.g. ``fit`` called alone)."""
    return getattr(cfg, _IDENTITY_ATTR, None)


def _recorded_identity(checkpoint: Path, out: Path) -> tuple[Path, Any]:
    """The identity file of the run a checkpoint belongs to (``RUN/train-state/step-N``), else of ``out``."""
    run = checkpoint.parent.parent if checkpoint.parent.name == STATE_DIR else out
    path = run / IDENTITY_FILE
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return path, None
    except (OSError, ValueError):
        return path, {}


def check_run_identity(cfg: TrainConfig, checkpoint: Path, out: Path) -> None:
    """Refuse to resume from ``checkpoint`` when the run's data or library versions changed since it started.

    Compares the identity attached to ``cfg`` (see :func:`run_identity`) with the one its run recorded. With
    ``cfg.resume_mismatch == "allow"`` the differences are logged as a warning and the run goes on (recording the
    new identity). A run that recorded none (written by an older timm-remem) is resumed with a warning.

    Raises:
        ConfigError: Naming each difference, and the three ways on.
    """
    now = attached_identity(cfg)
    if now is None:
        return
    path, saved = _recorded_identity(checkpoint, out)
    if saved is None:
        log.warning("resuming %s: its run recorded no %s (written by an older timm-remem), so changed data cannot "
                    "be detected", checkpoint, IDENTITY_FILE)
        return
    diffs = identity_differences(saved if isinstance(saved, dict) else {}, now)
    if not diffs:
        return
    listed = "".join(f"\n  - {d}" for d in diffs)
    if cfg.resume_mismatch == "allow":
        log.warning("resuming %s although what it is computed from changed since the run started "
                    "(resume_mismatch='allow'):%s", checkpoint, listed)
        return
    raise ConfigError(
        f"cannot resume {str(checkpoint)!r}: what the run is computed from changed since it started (recorded in "
        f"{str(path)!r}):{listed}\nResume with the data and libraries the run started with, start a fresh run in "
        "another output folder, or resume anyway with resume_mismatch='allow' (--resume-mismatch allow): the run "
        "then goes on with what changed and is no longer what an uninterrupted run would have computed"
    )
