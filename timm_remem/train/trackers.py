"""Experiment trackers beside ``metrics.jsonl``: TensorBoard and Weights & Biases (``log=["tensorboard", "wandb"]``).

Each is an optional extra, imported only when asked for: ``tensorboard`` writes torch's
``torch.utils.tensorboard.SummaryWriter`` event files into ``OUTPUT/tensorboard`` (``pip install
timm-remem[tensorboard]``); ``wandb`` starts a Weights & Biases run whose files live in ``OUTPUT/wandb`` (``pip install
timm-remem[wandb]``; ``WANDB_MODE=offline`` logs locally without a network, ``wandb sync`` uploads later;
``WANDB_PROJECT`` names the project, ``timm-remem`` by default). Both get every number of an epoch's ``metrics.jsonl``
line (``train_loss``, ``val_acc``, ``lr``, ...) at the run's optimizer step, on rank 0 only.

A resumed run continues the same TensorBoard folder, dropping events logged after the checkpoint it resumed from
(the lines ``metrics.jsonl`` drops too), and the same wandb run (its id is kept in ``OUTPUT/wandb/run-id``).

Example:
    >>> from timm_remem.train.trackers import scalars
    >>> scalars({"epoch": 1, "step": 23, "val_acc": 0.5, "lr": 0.001, "world_size": 2, "note": "x"})
    {'lr': 0.001, 'val_acc': 0.5}
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
        >>> scalars({"epoch": 2, "step": 6, "train_loss": 1.5, "teacher_acc": None})
        {'train_loss': 1.5}
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
    """The trackers ``cfg.log`` names, for one run (create and use them on rank 0 only).

    Args:
        cfg: The run's config (``cfg.log``: ``"tensorboard"``, ``"wandb"``).
        out: The output folder.
        resumed_step: The optimizer step of the checkpoint the run resumed from (None: a fresh start).

    Raises:
        ImportError: A tracker whose package is not installed (naming the extra to install).
        ConfigError: wandb cannot start (not logged in and not offline, no network).

    Example:
        >>> import tempfile
        >>> from timm_remem.train import TrainConfig
        >>> trackers = Trackers(TrainConfig(model="m", log=[]), Path(tempfile.mkdtemp()), None)  # none asked for
        >>> trackers.log({"epoch": 1, "step": 3, "val_acc": 0.5}); trackers.close()
        >>> trackers.trackers
        []
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
        """Log one epoch's metrics record to every tracker."""
        for tracker in self.trackers:
            tracker.log(record)

    def close(self, failed: bool = False) -> None:
        """Flush and close every tracker (a wandb run is marked failed when ``failed``)."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(failed)
