"""The run folder and resuming a run from it (``resume=True``, a checkpoint path, or ``"auto"``).

A resume picks the checkpoint on rank 0, refuses other settings, another process count or (unless
``resume_mismatch="allow"``) changed data or library versions, restores the loop position, drops metric lines
written after the checkpoint and cleans up exports a crash left half-written.
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

from .. import distributed
from .._io import atomic_write_json, atomic_write_text, claim_output_dir
from ..checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint, set_rng_state
from ..errors import CheckpointError, ConfigError
from ..teachers import EXPORT_DIR
from .config import TrainConfig
from .identity import RESUME_FREE, _as_saved, _shown, attached_identity, check_run_identity
from .lock import CONFIG_FILE, IDENTITY_FILE, STATE_DIR

__all__ = ["METRICS_FILE", "STATE_DIR", "EXPORT_DIR", "RESUME_FREE", "LoopState", "restore", "resume_path",
           "config_differences", "check_resume_config", "truncate_metrics", "remove_stale_exports", "resumed_epoch",
           "prepare_output"]

METRICS_FILE = "metrics.jsonl"


def _zero_running() -> dict[str, Any]:
    return {"loss": 0.0, "correct": 0, "count": 0, "time": 0.0}


@dataclass
class LoopState:
    """Where the training loop stands (saved in every training checkpoint): the epoch and batch to run next, the
    optimizer steps so far, the finished epochs' metrics and the current one's running sums."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    running: dict[str, Any] = field(default_factory=_zero_running)

    def end_epoch(self) -> None:
        self.epoch += 1
        self.batch = 0
        self.running = _zero_running()


def resume_path(src: Path) -> Path:
    """The checkpoint to resume from (``src`` or its newest valid one), chosen on rank 0 and sent to every rank."""
    return Path(distributed.run_on_main(lambda: str(resolve_checkpoint(src))))


def config_differences(saved: Mapping[str, Any], cfg: TrainConfig) -> list[str]:
    """``name: saved -> now`` for each setting outside :data:`RESUME_FREE` that differs (a missing one: its default)."""
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
    """Refuse to resume with other settings than the saved ones (see :func:`config_differences`)."""
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
    """After a crash during an export: delete half-written ``.tmp-*`` folders and put back an ``.old-<name>``
    export whose replacement never arrived."""
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


def restore(cfg: TrainConfig, out: Path, state_dir: Path | None, *, model, optimizer, scheduler, scaler,
            ema) -> tuple[LoopState, Path | None]:
    """Resume the run if asked to (loading the checkpoint into the given objects), else make sure ``out`` holds no
    run that would be overwritten. Returns the loop position and the checkpoint (None: a fresh start).

    Raises:
        ConfigError: Resuming without a train-state folder, a fresh start in a folder that holds checkpoints, or
            a resume whose data or library versions differ from the run's start (see :func:`check_run_identity`).
        CheckpointError: A damaged checkpoint, or one written with other settings or another process count.
    """
    world, rank = distributed.get_world_size(), distributed.get_rank()
    metrics_path = out / METRICS_FILE
    resume = _wants_resume(cfg, state_dir)
    own_checkpoints = state_dir is not None and state_dir.is_dir() and bool(list_checkpoints(state_dir))
    if not resume:
        if own_checkpoints:
            raise ConfigError(
                f"{str(out)!r} already holds training checkpoints; resume it (resume=True / --resume) or choose "
                "another output folder"
            )
        return LoopState(), None
    src = state_dir if resume is True else Path(resume)
    if src is None:
        raise ConfigError("resume=True needs save_state=True (the run's own train-state folder)")
    path = resume_path(src)  # chosen by rank 0: every rank loads the very same checkpoint
    if state_dir is None or path.resolve().parent != state_dir.resolve():  # another run's checkpoint
        if own_checkpoints:
            raise ConfigError(
                f"{str(out)!r} holds a run of its own (checkpoints in {str(state_dir)!r}); resuming "
                f"{str(path)!r}, another run's checkpoint, into it would mix the two runs. Resume into the "
                "checkpoint's own output folder, or into a new one"
            )
        _refuse_finished_run(out, f"resuming {str(path)!r} into it would mix two runs")
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


def _refuse_finished_run(out: Path, why: str) -> None:
    """A folder with a run's metrics or exports (but no checkpoints) takes no other run's state."""
    held = [name for name in (METRICS_FILE, EXPORT_DIR) if (out / name).exists() or (out / name).is_symlink()]
    if held and (held != [EXPORT_DIR] or any((out / EXPORT_DIR).iterdir())):
        raise ConfigError(f"{str(out)!r} already holds a run ({', '.join(held)}): {why}. Choose another output "
                          "folder, or remove those first")


def _saved_config(path: Path) -> dict[str, Any]:
    """The configuration a checkpoint was written with ({} when even that cannot be read)."""
    try:
        return dict(load_checkpoint(path, restore_rng=False, verify=False).config)
    except CheckpointError:
        return {}


def resumed_epoch(state: LoopState) -> int:
    """The 1-based epoch a checkpoint was written in: the one in progress, or the one it ends."""
    return state.epoch if state.batch == 0 and state.epoch > 0 else state.epoch + 1


def prepare_output(cfg: TrainConfig, out: Path, resumed: bool | Path | None) -> None:
    """Write ``config.json`` and ``run-identity.json`` on rank 0; a fresh run drops old metrics. A symlinked
    ``metrics.jsonl`` is removed (fresh) or replaced by a regular file with its lines (resumed): never written
    through."""
    distributed.barrier()  # every rank has looked at the output folder before rank 0 writes into it
    if distributed.get_rank() == 0:
        claim_output_dir(out, "run")  # the lock's check again (this run's folder by now: nothing changes)
        # the settings that define the run, so that --config OUTPUT/config.json repeats it: how this process
        # started (resume) is not one of them
        settings = {**cfg.to_dict(), "resume": None}
        atomic_write_text(out / CONFIG_FILE, json.dumps(settings, indent=2, sort_keys=True) + "\n")
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
