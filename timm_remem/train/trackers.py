"""Experiment trackers beside ``metrics.jsonl`` (``log=["tensorboard", "wandb"]``), each an optional extra.

Both log every number of an epoch's metrics at the run's optimizer step, on rank 0, into ``OUTPUT/tensorboard`` or
``OUTPUT/wandb`` (``WANDB_MODE`` and ``WANDB_PROJECT`` are read at the start). A resumed run continues the same
TensorBoard folder (dropping events after its checkpoint) and the same wandb run (id in ``OUTPUT/wandb/run-id``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._io import atomic_write_text
from ..errors import ConfigError
from .config import TrainConfig

__all__ = ["TENSORBOARD_DIR", "WANDB_DIR", "scalars", "Trackers"]

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
_NOT_SCALARS = ("epoch", "step", "world_size")


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record a tracker logs (not the epoch/step/world size that place them).

    Example:
        >>> scalars({"epoch": 1, "step": 23, "val_acc": 0.5, "lr": 0.001, "world_size": 2, "teacher_acc": None})
        {'lr': 0.001, 'val_acc': 0.5}
    """
    return {k: float(v) for k, v in sorted(record.items())
            if k not in _NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}


class _TensorBoard:
    def __init__(self, out: Path, resumed_step: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("log=['tensorboard'] (--log tensorboard) needs TensorBoard: pip install "
                              "timm-remem[tensorboard]") from e
        # A resumed run drops the events logged after its checkpoint (a crash after it), as metrics.jsonl does.
        purge = resumed_step + 1 if resumed_step is not None else None
        self.writer = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR), purge_step=purge)

    def log(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.add_scalar("epoch", float(record["epoch"]), global_step=step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, cfg: TrainConfig, out: Path, resumed_step: int | None) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError("log=['wandb'] (--log wandb) needs Weights & Biases: pip install "
                              "timm-remem[wandb]") from e
        folder = out / WANDB_DIR
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run-id"
        run_id = id_file.read_text(encoding="utf-8").strip() if resumed_step is not None and id_file.is_file() \
            else None
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "timm-remem"), dir=str(out),
                                  name=out.resolve().name, config=cfg.to_dict(), id=run_id,
                                  resume="allow" if run_id else None,
                                  mode=os.environ.get("WANDB_MODE") or None)  # read now, not at wandb's import
        except Exception as e:  # noqa: BLE001 - wandb's own errors (login, network, settings) as one clear error
            raise ConfigError(f"wandb could not start a run ({type(e).__name__}: {e}); run `wandb login`, or set "
                              "WANDB_MODE=offline to log locally (then `wandb sync` it), or drop --log wandb") from e
        atomic_write_text(id_file, self.run.id + "\n")

    def log(self, record: Mapping[str, Any]) -> None:
        values = {k: v for k, v in scalars(record).items() if math.isfinite(v)}
        self.run.log({**values, "epoch": int(record["epoch"])}, step=int(record["step"]))

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Trackers:
    """The trackers ``cfg.log`` names, for one run on rank 0 (``resumed_step``: None for a fresh start).

    Raises:
        ImportError: A tracker whose package is not installed (naming the extra to install).
        ConfigError: wandb cannot start (not logged in and not offline, no network).
    """

    def __init__(self, cfg: TrainConfig, out: Path, resumed_step: int | None) -> None:
        self.trackers: list[Any] = []
        try:
            for name in cfg.log:
                self.trackers.append(_TensorBoard(out, resumed_step) if name == "tensorboard"
                                     else _WandB(cfg, out, resumed_step))
        except BaseException:
            self.close(failed=True)
            raise

    def log(self, record: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(record)

    def close(self, failed: bool = False) -> None:
        """Flush and close every tracker (a wandb run is marked failed when ``failed``)."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(failed)
