"""The ReMem pipeline: fine-tune a teacher, distill a student, pick the best teacher checkpoint, run the demo.

Four library calls, each the body of a ``timm-remem`` sub-command:

- :func:`finetune_teacher`: a teacher from any timm name (``hf-hub:`` and ``local-dir:`` included), optionally
  reweighted (``alpha``/``schedule``/``top_k``, see :func:`timm_remem.reweight`) and fine-tuned with SAM
  (``rho``/``adaptive``, see :class:`timm_remem.sam.SAM`); merged, plain-timm checkpoints are exported at the epochs
  in ``save_at``.
- :func:`distill_student`: a student from any timm name distilled from a teacher (a checkpoint folder, a timm or
  ``hf-hub:`` name, or a module); ``teacher=None`` trains the student alone (the no-teacher baseline).
- :func:`select_teacher`: ReMem's protocol: a short distillation from every checkpoint in a folder, a table and a
  plot of student accuracy per checkpoint, the best one named. Inputs are deterministic there, so the teacher runs
  once per training sample and its logits are cached for later epochs.
- :func:`run_demo`: the offline demo on scikit-learn's digits (plain vs ReMem teacher, a small CNN student from each,
  plus the student alone).

Every run writes into its ``output`` folder: ``config.json``; ``metrics.jsonl`` (one JSON object per epoch);
``train-state/step-*`` (resumable training checkpoints, safetensors + JSON, see :mod:`timm_remem.checkpoint`);
``checkpoints/epoch-NNN`` (exports written with :func:`timm_remem.hub.save_pretrained`, loadable by plain timm).
Training builds on timm: ``timm.data`` (datasets, transforms, ``Mixup``), ``timm.optim.create_optimizer_v2``,
``timm.scheduler.create_scheduler_v2``, ``timm.utils.ModelEmaV3`` and ``dispatch_clip_grad``.

Under ``torchrun --nproc_per_node N`` the same calls train with ``DistributedDataParallel`` (nccl on CUDA, gloo on
the CPU; see :mod:`timm_remem.distributed`): ``batch_size`` is per process, each rank takes a disjoint shard of every
epoch's permutation, metrics are reduced over ranks, rank 0 alone writes files, and SAM perturbs each replica by its
own gradient. See ``docs/distributed.md``.

Example:
    >>> import tempfile
    >>> from timm_remem.pipeline import finetune_teacher
    >>> result = finetune_teacher(model="test_vit", dataset="digits", img_size=16, epochs=1, batch_size=64,
    ...                           limit_train_batches=2, output=tempfile.mkdtemp(), progress=False)
    >>> [p.name for p in result.checkpoints]
    ['epoch-001']
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .errors import CheckpointError, ConfigError, TrainingError

__all__ = [
    "TrainConfig",
    "FinetuneConfig",
    "DistillConfig",
    "TrainResult",
    "SelectResult",
    "DemoResult",
    "finetune_teacher",
    "distill_student",
    "select_teacher",
    "run_demo",
]

_log = logging.getLogger(__name__)

_SAM_BASES = {"sgd": "samsgd", "momentum": "samsgd", "nesterov": "samsgd", "adam": "samadam", "adamw": "samadamw"}
_NO_SCHED = ("none", "constant", "")
# Configuration fields that may change between a run and its resumption.
_RESUME_FREE = frozenset(
    {"resume", "progress", "output", "num_workers", "device", "save_at", "keep_last", "checkpoint_every",
     "save_state", "clip_grad", "version"}
)
METRICS_FILE = "metrics.jsonl"
STATE_DIR = "train-state"
EXPORT_DIR = "checkpoints"


# ------------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------------


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass
class TrainConfig:
    """Settings shared by teacher fine-tuning and student distillation.

    Attributes:
        model: timm model name (``hf-hub:org/name`` and ``local-dir:/path`` included).
        model_kwargs: Extra ``timm.create_model`` arguments (e.g. ``{"depth": 6}``).
        pretrained: Load the model's pretrained weights (from the Hub cache or a local dir).
        dataset: ``"digits"`` (offline), ``"folder"``, ``"torch/cifar100"``, ``"hfds/<id>"``, ...
        data_dir: Dataset root folder (not needed for digits).
        download: Allow torchvision to download ``torch/...`` sets.
        img_size: Input size; default 32 for digits, else the model's pretrained input size.
        num_classes: Number of classes; default: read from the dataset.
        output: Output folder of the run.
        epochs: Training epochs.
        batch_size: Training batch size.
        eval_batch_size: Evaluation batch size.
        optimizer: timm optimizer name (``adamw``, ``sgd``, ...); with ``rho > 0`` SAM wraps sgd/adam/adamw.
        lr: Peak learning rate.
        weight_decay: Weight decay (not applied to biases, norms and 0-d scales: timm's parameter groups).
        momentum: Momentum for SGD-type optimizers.
        sched: timm scheduler name (``cosine``, ``step``, ...) or ``"none"``; updated every step.
        warmup_epochs: Linear warmup epochs.
        min_lr: Final learning rate of the schedule.
        label_smoothing: Label smoothing of the task loss.
        augment: timm training augmentation for image folders and torchvision sets (digits has none).
        mixup: Mixup alpha (0 disables; ``timm.data.Mixup``).
        cutmix: CutMix alpha (0 disables).
        rho: SAM radius; 0 trains without SAM.
        adaptive: ASAM (scale-invariant SAM).
        amp: Mixed precision: bfloat16 autocast on CPU, float16 autocast with a GradScaler on CUDA.
        clip_grad: Clip the global gradient norm to this value (None: off).
        ema: Keep an EMA of the weights (``timm.utils.ModelEmaV3``); exports then hold the EMA weights.
        ema_decay: EMA decay.
        seed: Seed of model init, data order and augmentation.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        num_workers: DataLoader workers.
        save_at: Epochs (1-based) after which to export a checkpoint; None: the last epoch only; []: none.
        save_state: Write resumable training checkpoints (after every epoch and every ``checkpoint_every`` steps).
        checkpoint_every: Also write a training checkpoint every this many optimizer steps (0: epoch ends only).
        keep_last: Number of newest training checkpoints kept.
        resume: ``True`` resumes from ``output/train-state``; a path resumes from that checkpoint; ``"auto"`` resumes
            from ``output/train-state`` when it holds a checkpoint and starts afresh otherwise (for jobs that are
            restarted after a crash or pre-emption, e.g. ``torchrun --max-restarts``); None starts afresh.
        progress: Show tqdm progress bars.
        limit_train_batches: Stop each epoch after this many batches (quick runs, benchmarks).
    """

    model: str = ""
    model_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    img_size: int | None = None
    num_classes: int | None = None
    output: str = "runs/train"
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 256
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    sched: str = "cosine"
    warmup_epochs: int = 0
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    augment: bool = False
    mixup: float = 0.0
    cutmix: float = 0.0
    rho: float = 0.0
    adaptive: bool = False
    amp: bool = False
    clip_grad: float | None = None
    ema: bool = False
    ema_decay: float = 0.998
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    save_at: list[int] | None = None
    save_state: bool = True
    checkpoint_every: int = 0
    keep_last: int = 2
    resume: bool | str | None = None
    progress: bool = True
    limit_train_batches: int | None = None

    def __post_init__(self) -> None:
        for name in ("model", "dataset", "optimizer", "sched", "device", "output"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not self.model:
            raise ConfigError(f"model must be a timm model name such as 'vit_tiny_patch16_224', got {self.model!r}")
        if not isinstance(self.model_kwargs, dict):
            raise ConfigError(f"model_kwargs must be a dict of timm.create_model arguments, got {self.model_kwargs!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "keep_last"):
            _positive_int(name, getattr(self, name))
        for name in ("weight_decay", "momentum", "warmup_epochs", "min_lr", "mixup", "cutmix", "rho", "ema_decay"):
            _non_negative(name, getattr(self, name))
        _non_negative("checkpoint_every", self.checkpoint_every)
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (0 < self.lr < math.inf):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}; 0.998 is a common choice")
        if self.clip_grad is not None and not (isinstance(self.clip_grad, (int, float)) and self.clip_grad > 0):
            raise ConfigError(f"clip_grad must be a number > 0 or None, got {self.clip_grad!r}")
        if self.img_size is not None:
            _positive_int("img_size", self.img_size)
        if self.num_classes is not None:
            _positive_int("num_classes", self.num_classes)
        if self.limit_train_batches is not None:
            _positive_int("limit_train_batches", self.limit_train_batches)
        if self.save_at is not None:
            self.save_at = sorted({int(e) for e in self.save_at})
            bad = [e for e in self.save_at if not 1 <= e <= self.epochs]
            if bad:
                raise ConfigError(f"save_at epochs {bad} are outside 1..epochs={self.epochs}; pick epochs in range")
        if self.adaptive and self.rho == 0:
            raise ConfigError("adaptive=True (ASAM) needs rho > 0 (ASAM uses a larger radius, e.g. rho=0.5)")
        if self.rho > 0 and self.optimizer.lower() not in _SAM_BASES:
            raise ConfigError(
                f"SAM (rho={self.rho}) wraps sgd, momentum, adam or adamw; got optimizer={self.optimizer!r}. "
                "Pick one of those or set rho=0"
            )

    def to_dict(self) -> dict[str, Any]:
        """Sorted JSON-ready dict, stamped with the timm-remem version."""
        from . import __version__

        data = dataclasses.asdict(self)
        data["version"] = __version__
        return dict(sorted(data.items()))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a dict; unknown keys are dropped with a warning."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"version"})
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class FinetuneConfig(TrainConfig):
    """Teacher fine-tuning settings: :class:`TrainConfig` plus reweighting.

    Attributes:
        alpha: MLP weight of :func:`timm_remem.reweight`; None: no reweighting.
        schedule: Reweighting schedule (``"exponential"`` or ``"constant"``).
        top_k: Reweight only the top ``k`` blocks (None: all).
        learnable: Make the factors trainable.
    """

    output: str = "runs/teacher"
    alpha: float | None = None
    schedule: str = "exponential"
    top_k: int | None = None
    learnable: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha is not None and (
            isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf
        ):
            raise ConfigError(f"alpha must be a number > 0 (ReMem uses (0, 1], e.g. 0.85), got {self.alpha!r}")
        if self.schedule not in ("exponential", "constant"):
            raise ConfigError(f"schedule must be 'exponential' or 'constant', got {self.schedule!r}")
        if self.top_k is not None:
            _positive_int("top_k", self.top_k)
        if self.alpha is None and (self.top_k is not None or self.learnable):
            raise ConfigError("top_k and learnable configure reweighting: also pass alpha (e.g. alpha=0.85)")


@dataclass
class DistillConfig(TrainConfig):
    """Student distillation settings: :class:`TrainConfig` plus the teacher and the loss.

    Attributes:
        teacher: A checkpoint folder (``checkpoints/epoch-NNN``), a timm / ``hf-hub:`` / ``local-dir:`` name; None
            trains the student without a teacher.
        teacher_kwargs: ``timm.create_model`` arguments for a teacher given by timm name.
        teacher_pretrained: Load pretrained weights for a teacher given by timm name.
        method: ``"kd"``, ``"hard"`` or ``"dist"`` (see :class:`timm_remem.distill.DistillationLoss`).
        temperature: Distillation temperature.
        task_weight: Weight of the label loss.
        distill_weight: Weight of the distillation loss.
        cache_teacher: Cache teacher logits by sample index (None: automatic, when inputs are deterministic: no
            augmentation and no mixup/cutmix).
    """

    output: str = "runs/student"
    teacher: str | None = None
    teacher_kwargs: dict = field(default_factory=dict)
    teacher_pretrained: bool = True
    method: str = "kd"
    temperature: float = 1.0
    task_weight: float = 1.0
    distill_weight: float = 1.0
    cache_teacher: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in ("kd", "hard", "dist"):
            raise ConfigError(f"method must be 'kd', 'hard' or 'dist', got {self.method!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature < math.inf):
            raise ConfigError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        _non_negative("task_weight", self.task_weight)
        _non_negative("distill_weight", self.distill_weight)
        if self.cache_teacher and self.stochastic_inputs:
            raise ConfigError(
                "cache_teacher=True needs deterministic inputs, but augment/mixup/cutmix are on: the cached logits "
                "would belong to other views. Turn the augmentation off or set cache_teacher=None"
            )

    @property
    def stochastic_inputs(self) -> bool:
        """Whether the training inputs change from epoch to epoch."""
        return bool((self.augment and self.dataset.lower() != "digits") or self.mixup > 0 or self.cutmix > 0)


def _make_config(cls: type, config: Any, kwargs: dict[str, Any]) -> Any:
    if config is not None and not isinstance(config, cls):
        raise ConfigError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {cls.__name__}; valid options: {sorted(known)}")
    if config is None:
        return cls(**kwargs)
    return dataclasses.replace(config, **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        output: The run folder.
        model: The trained model (eval mode; a teacher stays reweighted, not merged).
        history: One dict of metrics per epoch (also in ``metrics.jsonl``).
        checkpoints: Exported checkpoint folders, oldest first.
        val_acc: Final validation accuracy (of the EMA weights when ``ema=True``), in [0, 1].
        teacher_acc: The teacher's validation accuracy (distillation only).
        wall_time: Seconds spent in this call.
        teacher_forwards: Teacher forward passes run during training (distillation only; cache hits not counted).
    """

    output: Path
    model: nn.Module
    history: list[dict[str, Any]]
    checkpoints: list[Path]
    val_acc: float
    teacher_acc: float | None = None
    wall_time: float = 0.0
    teacher_forwards: int = 0


@dataclass
class SelectResult:
    """Outcome of :func:`select_teacher`.

    Attributes:
        rows: One dict per checkpoint: ``checkpoint``, ``teacher_acc``, ``student_acc``, ``time_s`` (and
            ``mi_score`` when computed).
        best: The checkpoint whose student was most accurate.
        table: The printed table.
        plot: The PNG plot (None when matplotlib is missing).
        spearman: Spearman correlation between ``mi_score`` and ``student_acc`` (None when not computed).
    """

    rows: list[dict[str, Any]]
    best: Path
    table: str
    plot: Path | None
    spearman: float | None = None


@dataclass
class DemoResult:
    """Outcome of :func:`run_demo`: the table rows, the printed table, the plot and the total time."""

    rows: list[dict[str, Any]]
    table: str
    plot: Path | None
    output: Path
    wall_time: float


# ------------------------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    """The training device; under torchrun (``WORLD_SIZE > 1``) CUDA means this process's ``cuda:LOCAL_RANK``."""
    launched = distributed.env_world_size() > 1
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {name!r} is not a torch device; use 'auto', 'cpu' or 'cuda[:N]'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for CUDA but no GPU is available; use device='cpu'")
    if dev.type == "cuda" and launched:
        if dev.index is not None:
            raise ConfigError(
                f"device {name!r} names one GPU, but under torchrun each process uses the GPU of its LOCAL_RANK; pass "
                "--device cuda (or auto), and choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
        dev = torch.device("cuda", distributed.env_local_rank())
    return dev


def _setup_device(cfg: TrainConfig) -> torch.device:
    """Resolve the device and, when launched by torchrun, join the process group (nccl on CUDA, gloo on CPU)."""
    device = _device(cfg.device)
    distributed.init_distributed(device)
    return device


def _wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` inside a process group of several processes, else ``model`` itself."""
    if not distributed.is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _create_model(name: str, *, num_classes: int, img_size: int | None, kwargs: Mapping[str, Any],
                  pretrained: bool, keep_head: bool = False) -> nn.Module:
    """``timm.create_model`` with clear errors; ``img_size`` is passed only to models that take it."""
    import timm

    args = dict(kwargs)
    if not keep_head:
        args.setdefault("num_classes", num_classes)
    attempts = [args]
    if img_size is not None and "img_size" not in args:
        attempts.insert(0, {**args, "img_size": img_size})
    for i, attempt in enumerate(attempts):
        try:
            return timm.create_model(name, pretrained=pretrained, **attempt)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ConfigError(
                    f"unknown timm model {name!r}; list names with timm.list_models('*vit*') (or use "
                    "'hf-hub:org/name' or 'local-dir:/path')"
                ) from e
            raise
        except TypeError as e:
            if i + 1 < len(attempts) and "img_size" in str(e):
                continue  # a model without an img_size argument (a CNN): it takes any input size
            raise ConfigError(f"timm.create_model({name!r}, **{attempt!r}) rejected an argument: {e}") from e
    raise AssertionError("unreachable")  # pragma: no cover


def _data_config(model: nn.Module) -> dict[str, Any]:
    from timm.data import resolve_model_data_config

    return resolve_model_data_config(model)


def _build_data(cfg: TrainConfig, model: nn.Module, img_size: int):
    from .data import create_dataset, create_loader

    dc = _data_config(model)
    common = dict(img_size=img_size, mean=dc["mean"], std=dc["std"], download=cfg.download)
    train = create_dataset(cfg.dataset, cfg.data_dir, "train", augment=cfg.augment, **common)
    val = create_dataset(cfg.dataset, cfg.data_dir, "val", **common)
    drop_last = cfg.mixup > 0 or cfg.cutmix > 0  # Mixup needs even batches
    if drop_last and len(train) < cfg.batch_size:
        raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {len(train)} training samples; lower it")
    pin = torch.cuda.is_available()
    world, rank = distributed.get_world_size(), distributed.get_rank()
    # Each rank takes every world-th sample of the epoch's shared permutation: batch_size is per process, so the
    # global batch is world * batch_size (rank r's k-th batch holds samples k*B*world + r + world*j of the order).
    train_loader = create_loader(train, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=drop_last,
                                 num_workers=cfg.num_workers, pin_memory=pin, num_replicas=world, rank=rank)
    if world > 1:  # a disjoint validation shard per rank, no padding: sums over ranks cover each sample once
        from torch.utils.data import Subset

        val_shard = Subset(val, range(rank, len(val), world))
        val_loader = create_loader(val_shard, cfg.eval_batch_size, num_workers=cfg.num_workers,
                                   pin_memory=pin) if len(val_shard) else []
    else:
        val_loader = create_loader(val, cfg.eval_batch_size, num_workers=cfg.num_workers, pin_memory=pin)
    return train, val, train_loader, val_loader


def _num_classes(cfg: TrainConfig) -> int:
    from .data import create_dataset, dataset_num_classes

    found = dataset_num_classes(create_dataset(cfg.dataset, cfg.data_dir, "train", img_size=8, download=cfg.download))
    if cfg.num_classes is not None and cfg.num_classes != found:
        raise ConfigError(f"num_classes={cfg.num_classes} but dataset {cfg.dataset!r} has {found} classes")
    return found


def _img_size(cfg: TrainConfig) -> int | None:
    if cfg.img_size is not None:
        return cfg.img_size
    return 32 if cfg.dataset.lower() == "digits" else None


def _create_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    from . import sam as _sam  # noqa: F401  (registers the SAM optimizers with timm)

    name = cfg.optimizer.lower()
    extra: dict[str, Any] = {}
    if cfg.rho > 0:
        name = _SAM_BASES[name]
        extra = {"rho": cfg.rho, "adaptive": cfg.adaptive}
    try:
        return create_optimizer_v2(model, opt=name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum, **extra)
    except (ValueError, KeyError, AssertionError) as e:
        raise ConfigError(f"cannot create optimizer {cfg.optimizer!r} ({e}); use a timm optimizer name such as "
                          "'adamw' or 'sgd'") from e


def _create_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    if cfg.sched.lower() in _NO_SCHED:
        return None
    from timm.scheduler import create_scheduler_v2

    try:
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, min_lr=cfg.min_lr,
            warmup_lr=cfg.lr * 0.01, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
        )
    except (ValueError, AssertionError, KeyError) as e:
        raise ConfigError(f"cannot create scheduler {cfg.sched!r} ({e}); use 'cosine', 'step' or 'none'") from e
    if scheduler is None:
        raise ConfigError(f"unknown scheduler {cfg.sched!r}; use 'cosine', 'step', 'multistep', 'poly' or 'none'")
    return scheduler


def _autocast(cfg: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if not cfg.amp:
        return contextlib.nullcontext
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _export(write: Callable[[Path], Any], path: Path) -> Path:
    """Run ``write(folder)`` into a temporary folder, then rename it to ``path`` (never a half-written export)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = path.parent / f".old-{path.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _load_teacher(cfg: DistillConfig, num_classes: int, device: torch.device) -> nn.Module:
    spec = cfg.teacher
    path = Path(spec)
    if path.is_dir() and not (path / "config.json").is_file():
        raise CheckpointError(
            f"teacher folder {spec!r} has no config.json; pass a folder written by finetune_teacher (e.g. "
            "runs/teacher/checkpoints/epoch-010) or a timm model name"
        )
    if path.is_dir() or spec.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        from .hub import load_teacher

        teacher = load_teacher(spec, **cfg.teacher_kwargs)
    else:  # a timm name: its own head is kept (a head re-initialised for our classes would be a random teacher)
        teacher = _create_model(spec, num_classes=num_classes, img_size=None, kwargs=cfg.teacher_kwargs,
                                pretrained=cfg.teacher_pretrained, keep_head=True)
    t_classes = getattr(teacher, "num_classes", None)
    if t_classes is not None and int(t_classes) != num_classes:
        raise ConfigError(
            f"teacher {spec!r} predicts {t_classes} classes but dataset {cfg.dataset!r} has {num_classes}; "
            "fine-tune the teacher on this dataset first (timm-remem finetune)"
        )
    return teacher.to(device).eval()


def _task_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy with labels (and smoothing) or with soft Mixup/CutMix targets (already smoothed)."""
    if target.is_floating_point():
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def _accuracy(logits: torch.Tensor, target: torch.Tensor) -> int:
    return int((logits.argmax(dim=-1) == target).sum())


@torch.no_grad()
def _evaluate(model: nn.Module, loader: Iterable, device: torch.device, autocast) -> tuple[float, float]:
    """Mean loss and accuracy; under torchrun the sums of every rank's shard are reduced (same result everywhere)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y, _ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += _accuracy(logits, y)
        count += y.numel()
    model.train(was_training)
    if distributed.is_distributed():
        loss_sum, correct, count = distributed.all_reduce_sum([loss_sum, correct, count])
    return loss_sum / max(count, 1), correct / max(count, 1)


def _check_finite(loss: torch.Tensor, *, epoch: int, step: int, state_dir: Path | None) -> float:
    value = float(loss.detach())
    if not math.isfinite(value):
        from .checkpoint import latest_checkpoint

        last = latest_checkpoint(state_dir) if state_dir is not None else None
        where = f"the last good checkpoint is {str(last)!r}" if last else "no checkpoint was written yet"
        raise TrainingError(
            f"the training loss became {value} at epoch {epoch + 1}, step {step + 1}; training stopped and nothing was "
            f"saved after it ({where}). Resume with gradient clipping (--resume --clip-grad 1.0), or start a new run "
            "with a lower learning rate or without amp"
        )
    return value


def _checked_loss(loss: torch.Tensor, *, epoch: int, step: int, state_dir: Path | None) -> float:
    """The step's loss, averaged over ranks under torchrun, checked finite: every rank stops on the same step."""
    if distributed.is_distributed():
        mean = distributed.all_reduce_sum([float(loss.detach())])[0] / distributed.get_world_size()
        loss = torch.tensor(mean, dtype=torch.float64)
    return _check_finite(loss, epoch=epoch, step=step, state_dir=state_dir)


def _write_metrics(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
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
    _atomic_write_text(path, "".join(line + "\n" for line in keep))


def _check_resume_config(saved: Mapping[str, Any], cfg: TrainConfig, path: Path) -> None:
    current = json.loads(json.dumps(cfg.to_dict()))  # as saved: tuples become lists
    diffs = [
        f"{k}={saved.get(k)!r} (checkpoint) vs {current.get(k)!r} (now)"
        for k in sorted(set(saved) | set(current))
        if k not in _RESUME_FREE and saved.get(k) != current.get(k)
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by a run with other settings: {'; '.join(diffs)}. Resume with the "
            "same settings, or start a fresh run in another output folder"
        )


# ------------------------------------------------------------------------------------------------------------------
# The training loop
# ------------------------------------------------------------------------------------------------------------------


def _fit(
    cfg: TrainConfig,
    model: nn.Module,
    *,
    train_loader,
    val_loader,
    device: torch.device,
    compute: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    desc: str,
    write_export: Callable[[nn.Module, Path, Mapping[str, Any]], Any],
    extra_metrics: Callable[[], dict[str, Any]] | None = None,
    train_model: nn.Module | None = None,
) -> tuple[list[dict[str, Any]], list[Path], float]:
    """Train ``model`` with ``compute(x, y, idx, teacher_logits) -> (loss, logits, teacher_logits)``.

    ``train_model`` is what ``compute`` runs forward through: ``model`` itself, or its ``DistributedDataParallel``
    wrapper under torchrun (SAM's first pass then runs under its ``no_sync``). The optimizer, EMA, checkpoints and
    exports use the plain ``model``. Under torchrun every rank runs this function: the metrics are reduced over
    ranks, and rank 0 alone writes files (checkpoints, exports, metrics) while the others wait at a barrier.
    """
    from timm.utils import ModelEmaV3
    from tqdm.auto import tqdm

    from .checkpoint import load_checkpoint, save_checkpoint

    train_model = model if train_model is None else train_model
    world, rank = distributed.get_world_size(), distributed.get_rank()
    main = rank == 0
    out = Path(cfg.output)
    state_dir = out / STATE_DIR if cfg.save_state else None
    metrics_path = out / METRICS_FILE
    steps_per_epoch = len(train_loader)
    if cfg.limit_train_batches is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.limit_train_batches)
    if steps_per_epoch == 0:
        raise ConfigError("the training loader yields no batch; lower batch_size or check the dataset")
    if world > 1:  # identical initial weights everywhere (DDP also broadcasts them); per-rank dropout/augmentation
        from timm.utils import random_seed

        random_seed(cfg.seed, rank)

    optimizer = _create_optimizer(cfg, model)
    scheduler = _create_scheduler(cfg, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp and device.type == "cuda" else None
    autocast = _autocast(cfg, device)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                      num_classes=model.num_classes)

    epoch, batch_done, step = 0, 0, 0
    history: list[dict[str, Any]] = []
    running = {"loss": 0.0, "correct": 0, "count": 0, "time": 0.0}
    resume = cfg.resume
    if resume == "auto":  # decided on rank 0, so that every rank does the same
        from .checkpoint import list_checkpoints

        if state_dir is None:
            raise ConfigError("resume='auto' needs save_state=True (the run's own train-state folder)")
        found = distributed.is_main_process() and bool(list_checkpoints(state_dir))
        resume = True if distributed.broadcast_object(found) else None
    if resume:
        src = state_dir if resume is True else Path(resume)
        if src is None:
            raise ConfigError("resume=True needs save_state=True (the run's own train-state folder)")
        path = _resume_path(src)  # chosen by rank 0: every rank loads the very same checkpoint
        info = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema)
        _check_resume_config(info.config, cfg, info.path)
        saved_world = int(info.extra.get("world_size", 1))
        if saved_world != world:
            raise CheckpointError(
                f"checkpoint {str(info.path)!r} was written by a run of {saved_world} process(es) but this run has "
                f"{world}: the data shards, the steps per epoch (hence the learning-rate schedule) and the random "
                f"states depend on it. Resume with the same number of processes (torchrun --nproc_per_node "
                f"{saved_world}), or start a fresh run in another output folder"
            )
        if world > 1 and "rank_rng" in info.extra:
            from .checkpoint import set_rng_state

            set_rng_state(info.extra["rank_rng"][rank])
        epoch, batch_done, step = int(info.extra["epoch"]), int(info.extra["batch"]), info.step
        history = list(info.extra.get("history", []))
        running = dict(info.extra.get("running", running))
        if main:
            _truncate_metrics(metrics_path, step)
            _remove_stale_exports(out / EXPORT_DIR)
            _log.info("resumed from %s at epoch %d, batch %d, step %d", info.path, epoch + 1, batch_done, step)
    elif state_dir is not None and (state_dir.exists() or metrics_path.exists()):
        from .checkpoint import list_checkpoints

        if list_checkpoints(state_dir):
            raise ConfigError(
                f"{str(out)!r} already holds training checkpoints; resume it (resume=True / --resume) or choose "
                "another output folder"
            )
    distributed.barrier()  # every rank has looked at the output folder before rank 0 writes into it
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
        if not resume and metrics_path.exists():
            metrics_path.unlink()

    save_at = [cfg.epochs] if cfg.save_at is None else list(cfg.save_at)
    exports = sorted(p for p in (out / EXPORT_DIR).glob("epoch-*") if p.is_dir()) if resume else []

    def sync_buffers() -> None:  # rank 0's BatchNorm statistics everywhere: the model that rank 0 saves
        if world > 1:
            distributed.broadcast_buffers(model)
            if ema is not None:
                distributed.broadcast_buffers(ema)

    def checkpoint(epoch_: int, batch_: int, metrics: Mapping[str, Any]) -> None:
        if state_dir is None:
            return
        sync_buffers()
        extra = {"epoch": epoch_, "batch": batch_, "history": history, "running": running, "world_size": world}
        if world > 1:  # each rank's random state, so a resumed rank continues its own dropout/augmentation stream
            from .checkpoint import get_rng_state

            extra["rank_rng"] = distributed.all_gather_object(get_rng_state())
        if main:
            save_checkpoint(
                state_dir, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema,
                epoch=epoch_, step=step, config=cfg.to_dict(), metrics=dict(metrics), keep_last=cfg.keep_last,
                extra=extra,
            )
        distributed.barrier()  # the others wait until the checkpoint is complete

    while epoch < cfg.epochs:
        model.train()
        train_loader.sampler.set_epoch(epoch, start_index=batch_done * cfg.batch_size)
        remaining = steps_per_epoch - batch_done
        bar = tqdm(total=steps_per_epoch, initial=batch_done, desc=f"{desc} {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and main), leave=False, dynamic_ncols=True)
        t0, time_before = time.perf_counter(), running["time"]
        for i, (x, y, idx) in enumerate(train_loader):
            if i >= remaining:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            target = y
            if mixup is not None:
                x, target = mixup(x, y)
            loss_value, logits = _train_step(
                train_model, optimizer, compute, x, target, idx, scaler=scaler, autocast=autocast,
                clip_grad=cfg.clip_grad, check=partial(_checked_loss, epoch=epoch, step=step, state_dir=state_dir),
            )
            step += 1
            batch_done += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=step)
            if ema is not None:
                ema.update(model, step=step)
            n, correct = y.numel(), _accuracy(logits.detach(), y)
            if world > 1:  # loss_value is already the mean over ranks (every rank holds as many samples)
                correct, n = (int(v) for v in distributed.all_reduce_sum([correct, n]))
            running["loss"] += loss_value * n
            running["correct"] += correct
            running["count"] += n
            running["time"] = time_before + time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{running['loss'] / running['count']:.3f}",
                            acc=f"{running['correct'] / running['count']:.3f}",
                            img_s=f"{running['count'] / max(running['time'], 1e-9):.0f}", refresh=False)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and batch_done < steps_per_epoch:
                checkpoint(epoch, batch_done, {})
        bar.close()
        sync_buffers()
        val_loss, val_acc = _evaluate(model, val_loader, device, autocast)
        epoch_time = distributed.all_reduce_max([running["time"]])[0]  # the slowest rank's time
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": running["loss"] / max(running["count"], 1),
            "train_acc": running["correct"] / max(running["count"], 1),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_time_s": epoch_time,
            "samples_per_s": running["count"] / max(epoch_time, 1e-9),
        }
        if world > 1:
            record["world_size"] = world
        if ema is not None:
            record["ema_val_loss"], record["ema_val_acc"] = _evaluate(ema.module, val_loader, device, autocast)
        if extra_metrics is not None:
            record.update(extra_metrics())
        if cfg.progress and main:
            tqdm.write(f"{desc} epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f} "
                       f"train acc {record['train_acc']:.4f} val acc {val_acc:.4f} "
                       f"({record['samples_per_s']:.0f} img/s)")
        history.append(record)
        if main:
            _write_metrics(metrics_path, record)
        epoch += 1
        batch_done = 0
        running = {"loss": 0.0, "correct": 0, "count": 0, "time": 0.0}
        if epoch in save_at:  # export first: a crash before the training checkpoint redoes (and re-exports) it
            exported = out / EXPORT_DIR / f"epoch-{epoch:03d}"
            if main:
                _export(partial(write_export, ema.module if ema is not None else model, record=record), exported)
            distributed.barrier()
            exports = [p for p in exports if p != exported] + [exported]
        checkpoint(epoch, 0, record)

    final = history[-1] if history else {}
    val_acc = final.get("ema_val_acc", final.get("val_acc", 0.0))
    return history, sorted(exports), float(val_acc)


def _resume_path(src: Path) -> Path:
    """The checkpoint to resume from (``src`` or its newest valid one), chosen on rank 0 and sent to every rank."""
    from .checkpoint import resolve_checkpoint

    found: str | None = None
    error: str | None = None
    if distributed.is_main_process():
        try:
            found = str(resolve_checkpoint(src))
        except CheckpointError as e:
            error = str(e)
    found, error = distributed.broadcast_object((found, error))
    if error is not None:
        raise CheckpointError(error)
    return Path(found)


def _remove_stale_exports(folder: Path) -> None:
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


def _train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    compute: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    x: torch.Tensor,
    target: torch.Tensor,
    idx: torch.Tensor,
    *,
    scaler: torch.amp.GradScaler | None,
    autocast: Callable[[], contextlib.AbstractContextManager],
    clip_grad: float | None,
    check: Callable[[torch.Tensor], float],
) -> tuple[float, torch.Tensor]:
    """One optimizer step; returns the loss value (checked finite by ``check``) and the logits of the first pass.

    With SAM the teacher logits returned by the first ``compute`` are handed to the second one, so the teacher runs
    at most once per step; SAM's own AMP recipe is used (the scaler goes to ``first_step``/``second_step``, which
    unscale, skip on inf/NaN and call ``scaler.update()``).
    """
    from timm.utils import dispatch_clip_grad

    from .sam import SAM

    if isinstance(optimizer, SAM):
        with optimizer.first_pass(model):
            with autocast():
                loss, logits, teacher_logits = compute(x, target, idx, None)
            value = check(loss)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        perturbed = optimizer.first_step(zero_grad=True, scaler=scaler)
        if optimizer.is_sam_step and distributed.is_distributed():
            # Each replica perturbs by its own gradient, so one may skip (non-finite gradient norm) while the others
            # perturbed. The second pass's gradient all-reduce needs every rank, so all of them skip it then: the
            # perturbed ranks restore their weights and find no gradient to apply, and the weights stay identical.
            perturbed = distributed.all_reduce_sum([0.0 if perturbed else 1.0])[0] == 0
        if perturbed:
            with optimizer.second_pass(model):
                with autocast():
                    loss2, _, _ = compute(x, target, idx, teacher_logits)
                (scaler.scale(loss2) if scaler is not None else loss2).backward()
        optimizer.second_step(zero_grad=True, scaler=scaler, max_grad_norm=clip_grad)
        return value, logits
    with autocast():
        loss, logits, _ = compute(x, target, idx, None)
    value = check(loss)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if clip_grad is not None:
            scaler.unscale_(optimizer)
            dispatch_clip_grad(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip_grad is not None:
            dispatch_clip_grad(model.parameters(), clip_grad)
        optimizer.step()
    return value, logits


def _seed(seed: int) -> None:
    from timm.utils import random_seed

    random_seed(seed, 0)


# ------------------------------------------------------------------------------------------------------------------
# Public calls
# ------------------------------------------------------------------------------------------------------------------


def _start_run(cfg: TrainConfig) -> tuple[torch.device, int, int, nn.Module, tuple]:
    """What every run does first: device, seed, the model, its input size and the data."""
    device = _setup_device(cfg)
    _seed(cfg.seed)
    num_classes = _num_classes(cfg)
    img_size = _img_size(cfg)
    model = _create_model(cfg.model, num_classes=num_classes, img_size=img_size, kwargs=cfg.model_kwargs,
                          pretrained=cfg.pretrained)
    if img_size is None:
        img_size = int(_data_config(model)["input_size"][-1])
    return device, num_classes, img_size, model, _build_data(cfg, model, img_size)


def finetune_teacher(config: FinetuneConfig | None = None, /, **kwargs: Any) -> TrainResult:
    """Fine-tune a teacher, optionally with ReMem's reweighting (``alpha``) and SAM (``rho``).

    The model is reweighted before training (its factors are trained too with ``learnable=True``); every export
    (``save_at`` epochs) is merged into plain timm weights, so ``timm.create_model("local-dir:<export>",
    pretrained=True)`` loads it.

    Args:
        config: A :class:`FinetuneConfig`; keyword arguments override its fields (or build one).
        **kwargs: Any :class:`FinetuneConfig` field.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: Bad settings, unknown model/dataset, an output folder that already holds a run.
        CheckpointError: A resume checkpoint that is damaged or was written with other settings.
        RememError: The loss became NaN or infinite (checkpoints already written are kept).

    Example:
        >>> import tempfile
        >>> r = finetune_teacher(model="test_vit", img_size=16, epochs=1, alpha=0.8, rho=0.05,
        ...                      limit_train_batches=1, output=tempfile.mkdtemp(), progress=False)
        >>> 0.0 <= r.val_acc <= 1.0
        True
    """
    cfg = _make_config(FinetuneConfig, config, kwargs)
    t0 = time.perf_counter()
    device, _, _, model, (_, _, train_loader, val_loader) = _start_run(cfg)
    if cfg.alpha is not None:
        from .reweighting import reweight

        reweight(model, cfg.alpha, schedule=cfg.schedule, top_k=cfg.top_k, learnable=cfg.learnable)
    model.to(device)
    train_model = _wrap_ddp(model, device)  # under torchrun: DistributedDataParallel

    def compute(x, target, idx, teacher_logits):
        logits = train_model(x)
        return _task_loss(logits, target, cfg.label_smoothing), logits, None

    def write_export(src: nn.Module, folder: Path, record: Mapping[str, Any]) -> None:
        from .hub import save_pretrained

        acc = record.get("ema_val_acc", record["val_acc"])
        save_pretrained(src, folder, merge=True, dataset=cfg.dataset, rho=cfg.rho, adaptive=cfg.adaptive,
                        epochs=int(record["epoch"]), teacher_accuracy=100.0 * acc)

    history, exports, val_acc = _fit(
        cfg, model, train_loader=train_loader, val_loader=val_loader, device=device, compute=compute,
        desc="finetune", write_export=write_export, train_model=train_model,
    )
    model.eval()
    return TrainResult(Path(cfg.output), model, history, exports, val_acc, wall_time=time.perf_counter() - t0)


def distill_student(
    config: DistillConfig | None = None, /, *, teacher_model: nn.Module | None = None, **kwargs: Any
) -> TrainResult:
    """Distill a student from a teacher (or, with no teacher, train it alone as the baseline).

    The teacher runs in eval mode under ``no_grad``; its logits are computed once per step and reused by SAM's
    second pass, and cached across epochs when the inputs are deterministic (``cache_teacher``). The teacher gets
    the student's input re-normalised to its own mean/std (and resized to its input size).

    Args:
        config: A :class:`DistillConfig`; keyword arguments override its fields (or build one).
        teacher_model: A teacher module to use instead of ``config.teacher`` (library use).
        **kwargs: Any :class:`DistillConfig` field.

    Returns:
        A :class:`TrainResult` (with ``teacher_acc`` and ``teacher_forwards``).

    Raises:
        ConfigError: Bad settings, unknown names, a teacher whose class count differs from the dataset's.
        CheckpointError: A teacher folder or resume checkpoint that is damaged or does not match its config.
        RememError: The loss became NaN or infinite (checkpoints already written are kept).

    Example:
        >>> import tempfile
        >>> r = distill_student(model="test_resnet", img_size=16, epochs=1, limit_train_batches=1,
        ...                     output=tempfile.mkdtemp(), progress=False)
        >>> r.teacher_acc is None
        True
    """
    cfg = _make_config(DistillConfig, config, kwargs)
    t0 = time.perf_counter()
    device, num_classes, _, student, (train, _, train_loader, val_loader) = _start_run(cfg)
    student.to(device)
    autocast = _autocast(cfg, device)

    teacher_net = teacher_model
    if teacher_net is None and cfg.teacher is not None:
        teacher_net = _load_teacher(cfg, num_classes, device)
    counter = {"calls": 0}
    teacher_acc = None
    if teacher_net is None:
        train_model = _wrap_ddp(student, device)  # under torchrun: DistributedDataParallel

        def compute(x, target, idx, teacher_logits):
            logits = train_model(x)
            return _task_loss(logits, target, cfg.label_smoothing), logits, None
    else:
        from .distill import DistillationLoss, RememDistillationTask, Teacher, TeacherLogitCache

        teacher_net = teacher_net.to(device)
        use_cache = (not cfg.stochastic_inputs) if cfg.cache_teacher is None else cfg.cache_teacher
        cache = TeacherLogitCache(len(train)) if use_cache else None
        teacher = Teacher(teacher_net, student, cache=cache)
        teacher_acc = _evaluate(teacher, val_loader, device, autocast)[1]  # without indices: never cached
        handle = teacher_net.register_forward_hook(lambda *_: counter.__setitem__("calls", counter["calls"] + 1))
        loss_fn = DistillationLoss(cfg.method, task_weight=cfg.task_weight, distill_weight=cfg.distill_weight,
                                   temperature=cfg.temperature, label_smoothing=cfg.label_smoothing)
        task = RememDistillationTask(student, teacher, loss_fn, device=device, verbose=False)
        if distributed.is_distributed():  # the student in DDP; the frozen teacher (eval, no_grad) stays unwrapped
            task.prepare_distributed(device_ids=[device.index] if device.type == "cuda" else None)
        train_model = task.trainable_module

        def compute(x, target, idx, teacher_logits):
            res = task(x, target, teacher_logits=teacher_logits, indices=idx if cache is not None else None)
            return res["loss"], res["output"], res["teacher_logits"]

    def write_export(src: nn.Module, folder: Path, record: Mapping[str, Any]) -> None:
        from timm.models import save_for_hf

        acc = record.get("ema_val_acc", record["val_acc"])
        info = {"teacher": cfg.teacher, "teacher_acc": teacher_acc, "dataset": cfg.dataset, "val_acc": acc,
                "epoch": record["epoch"], "method": cfg.method if teacher_net is not None else None}
        save_for_hf(src, str(folder), model_config={"remem_student": info}, safe_serialization=True)

    try:
        history, exports, val_acc = _fit(
            cfg, student, train_loader=train_loader, val_loader=val_loader, device=device, compute=compute,
            desc="distill" if teacher_net is not None else "train", write_export=write_export,
            extra_metrics=(lambda: {"teacher_acc": teacher_acc, "teacher_forwards": _total_forwards(counter)})
            if teacher_net is not None else None, train_model=train_model,
        )
    finally:
        if teacher_net is not None:
            handle.remove()
    student.eval()
    return TrainResult(Path(cfg.output), student, history, exports, val_acc, teacher_acc=teacher_acc,
                       wall_time=time.perf_counter() - t0, teacher_forwards=_total_forwards(counter))


def _total_forwards(counter: Mapping[str, int]) -> int:
    """Teacher forward passes summed over every rank."""
    return int(distributed.all_reduce_sum([counter["calls"]])[0])


# ------------------------------------------------------------------------------------------------------------------
# Checkpoint selection
# ------------------------------------------------------------------------------------------------------------------


def _natural_key(name: str) -> list[Any]:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _teacher_dirs(teachers: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(teachers, (str, os.PathLike)):
        root = Path(teachers)
        if not root.is_dir():
            raise ConfigError(f"teacher folder {str(root)!r} does not exist; pass the checkpoints/ folder of a "
                              "finetune run (or a list of checkpoint folders)")
        if _is_export(root):
            return [root]
        dirs = [p for p in root.iterdir() if _is_export(p)]
        if not dirs and (root / EXPORT_DIR).is_dir():
            dirs = [p for p in (root / EXPORT_DIR).iterdir() if _is_export(p)]
        if not dirs:
            raise ConfigError(f"{str(root)!r} holds no teacher checkpoints (sub-folders with config.json and "
                              "model.safetensors); run "
                              "timm-remem finetune with --save-at first")
        return sorted(dirs, key=lambda p: _natural_key(p.name))
    dirs = [Path(t) for t in teachers]
    if not dirs:
        raise ConfigError("no teacher checkpoints given")
    return dirs


def _is_export(path: Path) -> bool:
    """A checkpoint folder (config.json and weights; a run folder has a config.json too, but no weights).

    Hidden folders are half-written exports left by a crash.
    """
    complete = (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    return path.is_dir() and not path.name.startswith(".") and complete


def _spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    if len(a) < 3:
        return None
    from scipy.stats import spearmanr

    value = spearmanr(a, b).statistic
    return None if value is None or not math.isfinite(float(value)) else float(value)


def _format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def select_teacher(
    teachers: str | os.PathLike | Sequence[str | os.PathLike],
    /,
    *,
    mi_score: bool = False,
    **kwargs: Any,
) -> SelectResult:
    """ReMem's checkpoint selection: distill a student briefly from each teacher checkpoint and keep the best.

    Every student starts from the same initial weights (same seed) and sees the same deterministic inputs, so
    teacher logits are computed once per training sample and cached for the later epochs. Writes ``select.json``,
    ``select.md`` (the table) and ``select.png`` (student and teacher accuracy per checkpoint) into ``output``.

    Args:
        teachers: A folder of checkpoint folders (e.g. ``runs/teacher/checkpoints``), a finetune run folder, or a
            list of checkpoint folders.
        mi_score: Also score each checkpoint with :func:`timm_remem.analysis.rank_checkpoints` (MI-based; on the
            validation split) and report its Spearman correlation with student accuracy.
        **kwargs: :class:`DistillConfig` fields for the short distillations (default ``epochs=3``,
            ``output="runs/select"``; ``save_at`` defaults to none and ``save_state`` to False).

    Returns:
        A :class:`SelectResult`.

    Raises:
        ConfigError: No checkpoints, or bad distillation settings.
        CheckpointError: A checkpoint folder that does not load.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> _ = finetune_teacher(model="test_vit", img_size=16, epochs=2, save_at=[1, 2], limit_train_batches=1,
        ...                      output=root + "/t", progress=False)
        >>> sel = select_teacher(root + "/t/checkpoints", model="test_resnet", img_size=16, epochs=1,
        ...                      limit_train_batches=1, output=root + "/s", progress=False)
        >>> sel.best.name in ("epoch-001", "epoch-002")
        True
    """
    options = {"epochs": 3, "output": "runs/select", "save_at": [], "save_state": False, **kwargs}
    if "teacher" in options:
        raise ConfigError("select_teacher takes the teachers as its first argument, not teacher=")
    base = _make_config(DistillConfig, None, options)
    if base.stochastic_inputs and base.cache_teacher is None:
        _log.warning("select: augmentation or mixup is on, so teacher logits are not cached (slower)")
    dirs = _teacher_dirs(teachers)
    names = _unique_names(dirs)
    out = Path(base.output)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for d, name in zip(dirs, names, strict=True):
        t0 = time.perf_counter()
        sub = dataclasses.replace(base, teacher=str(d), output=str(out / name.replace("/", "__")), resume=None)
        result = distill_student(sub)
        rows.append({"checkpoint": name, "path": str(d), "teacher_acc": result.teacher_acc,
                     "student_acc": result.val_acc, "time_s": time.perf_counter() - t0})
    spearman = None
    if mi_score:
        scores = _mi_scores(dirs, names, base)
        for row, s in zip(rows, scores, strict=True):
            row["mi_score"] = s
        spearman = _spearman([r["mi_score"] for r in rows], [r["student_acc"] for r in rows])
    best_i = max(range(len(rows)), key=lambda i: (rows[i]["student_acc"], -i))
    headers = ["checkpoint", "teacher acc", "student acc", "time (s)"] + (["MI score"] if mi_score else [])
    table_rows = [
        [("* " if i == best_i else "  ") + r["checkpoint"], r["teacher_acc"], r["student_acc"], r["time_s"]]
        + ([r["mi_score"]] if mi_score else [])
        for i, r in enumerate(rows)
    ]
    table = _format_table(headers, table_rows)
    table += f"\n\nbest: {rows[best_i]['checkpoint']} (student acc {rows[best_i]['student_acc']:.4f})"
    if spearman is not None:
        table += f"\nSpearman(MI score, student acc) = {spearman:.3f} over {len(rows)} checkpoints"
    plot = out / "select.png"
    if distributed.is_main_process():  # under torchrun, rank 0 writes the summary
        plot = _plot_select(rows, plot)
        _atomic_write_text(out / "select.md", table + "\n")
        _atomic_write_text(out / "select.json", json.dumps(
            {"rows": rows, "best": rows[best_i]["path"], "spearman": spearman, "config": base.to_dict()},
            indent=2, sort_keys=True) + "\n")
        if base.progress:
            print(table)
    distributed.barrier()
    return SelectResult(rows, Path(rows[best_i]["path"]), table, plot, spearman)


def _unique_names(dirs: Sequence[Path]) -> list[str]:
    """Folder names, qualified by their parents where two checkpoints share a name (``run/checkpoints/epoch-005``)."""
    names = [d.name for d in dirs]
    if len(set(names)) == len(names):
        return names
    common = Path(os.path.commonpath([str(d.resolve()) for d in dirs]))
    return [d.resolve().relative_to(common).as_posix() for d in dirs]


def _mi_scores(dirs: Sequence[Path], names: Sequence[str], cfg: DistillConfig) -> list[float]:
    from .analysis.information import rank_checkpoints
    from .data import create_dataset, create_loader

    teachers = {}
    for d, name in zip(dirs, names, strict=True):
        sub = dataclasses.replace(cfg, teacher=str(d))
        teachers[name] = _load_teacher(sub, _num_classes(cfg), torch.device("cpu"))
    first = next(iter(teachers.values()))
    dc = _data_config(first)
    size = _img_size(cfg) or int(dc["input_size"][-1])
    val = create_dataset(cfg.dataset, cfg.data_dir, "val", img_size=size, mean=dc["mean"], std=dc["std"])
    loader = [(x, y) for x, y, _ in create_loader(val, cfg.eval_batch_size)]
    ranking = rank_checkpoints(teachers, loader, progress=False)
    by_name = {r.name: r.score for r in ranking}
    return [float(by_name[name]) for name in names]


def _plot_select(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log.warning("matplotlib is not installed: no plot written (pip install timm-remem[demo])")
        return None
    names = [r["checkpoint"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 2), 3.2))
    ax.plot(names, [r["student_acc"] for r in rows], "o-", label="student (short distillation)")
    ax.plot(names, [r["teacher_acc"] for r in rows], "s--", label="teacher")
    best = max(range(len(rows)), key=lambda i: (rows[i]["student_acc"], -i))
    ax.plot([names[best]], [rows[best]["student_acc"]], "r*", markersize=14, label="best")
    ax.set_xlabel("teacher checkpoint")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------------------
# Demo
# ------------------------------------------------------------------------------------------------------------------

#: The demo's teacher: a small ViT (timm ``vit_tiny_patch16_224`` rebuilt for 32 px digits).
DEMO_TEACHER = "vit_tiny_patch16_224"
DEMO_TEACHER_KWARGS = {"patch_size": 8, "embed_dim": 96, "depth": 6, "num_heads": 3}
#: The demo's student: a CNN from timm (ResNet-18 at a quarter of its width).
DEMO_STUDENT = "resnet18"
DEMO_STUDENT_KWARGS = {"channels": (16, 32, 64, 128), "stem_width": 16}
#: ReMem settings of the demo (chosen a priori, not tuned on the demo's results).
DEMO_ALPHA = 0.85
DEMO_RHO = 0.05


def run_demo(output: str | os.PathLike = "remem-demo", *, quick: bool = False, progress: bool = True,
             seed: int = 0, teacher_epochs: int | None = None, student_epochs: int | None = None,
             threads: int | None = 1) -> DemoResult:
    """The offline demo: plain vs ReMem teacher on scikit-learn digits, the same CNN student from each.

    Five stages, each timed: a small ViT teacher trained plainly (AdamW); the same ViT, same seed, reweighted
    (``alpha=0.85``) and trained with SAM (``rho=0.05``); the student trained alone; the student distilled from each
    teacher's final checkpoint. Prints one table and saves ``demo.png``, ``demo.md`` and ``demo.json`` in
    ``output``; each teacher also exports checkpoints at a third, two thirds and the end of its training, ready for
    ``timm-remem select``. The teachers start from random weights: the demo exercises the whole pipeline, it cannot
    reproduce ReMem's effect, which concerns teachers pretrained at scale.

    Args:
        output: Output folder (each stage gets a sub-folder).
        quick: Tiny models and a few batches (a smoke test that runs in seconds).
        progress: Show progress bars and the table.
        seed: Seed of every stage.
        teacher_epochs: Override the teachers' epochs (default 12).
        student_epochs: Override the students' epochs (default 8).
        threads: torch intra-op threads while the demo runs (restored afterwards; None keeps torch's setting).
            The models are tiny, so one thread loses little on an idle machine and avoids the large slowdown
            of oversubscribed threads on a busy one.

    Returns:
        A :class:`DemoResult`.

    Example:
        >>> import tempfile
        >>> run_demo(tempfile.mkdtemp(), quick=True, progress=False).rows[0]["stage"]
        'teacher: plain'
    """
    if distributed.env_world_size() > 1:
        raise ConfigError(
            "the demo runs in one process; run `timm-remem demo` without torchrun (finetune, distill and select "
            "run under torchrun)"
        )
    if threads is not None:
        _positive_int("threads", threads)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run_demo(output, quick=quick, progress=progress, seed=seed, teacher_epochs=teacher_epochs,
                            student_epochs=student_epochs, threads=None)
        finally:
            torch.set_num_threads(previous)
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        if not (out / "demo.json").is_file():
            raise ConfigError(f"{str(out)!r} is not empty and holds no earlier demo; choose another --output")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if quick:
        teacher, teacher_kwargs = "test_vit", {}
        student, student_kwargs = "test_resnet", {}
        t_epochs, s_epochs, img, limit = 1, 1, 16, 2
    else:
        teacher, teacher_kwargs = DEMO_TEACHER, DEMO_TEACHER_KWARGS
        student, student_kwargs = DEMO_STUDENT, DEMO_STUDENT_KWARGS
        t_epochs, s_epochs, img, limit = 12, 8, 32, None
    t_epochs = teacher_epochs or t_epochs
    s_epochs = student_epochs or s_epochs
    common = dict(dataset="digits", img_size=img, seed=seed, progress=progress, limit_train_batches=limit,
                  batch_size=64, save_state=False)
    teacher_common = dict(common, model=teacher, model_kwargs=dict(teacher_kwargs), epochs=t_epochs, lr=1e-3,
                          weight_decay=0.05, warmup_epochs=min(2, t_epochs - 1),
                          save_at=sorted({max(1, t_epochs // 3), max(1, 2 * t_epochs // 3), t_epochs}))
    student_common = dict(common, model=student, model_kwargs=dict(student_kwargs), epochs=s_epochs, lr=2e-3,
                          weight_decay=0.05)

    rows: list[dict[str, Any]] = []

    def stage(name: str, fn: Callable[[], TrainResult], kind: str) -> TrainResult:
        if progress:
            print(f"== {name}")
        res = fn()
        row = {"stage": name, "teacher_acc": None, "student_acc": None, "time_s": res.wall_time}
        if kind == "teacher":
            row["teacher_acc"] = res.val_acc
        else:
            row["student_acc"] = res.val_acc
            row["teacher_acc"] = res.teacher_acc
        rows.append(row)
        return res

    plain = stage("teacher: plain", lambda: finetune_teacher(**teacher_common, output=str(out / "teacher-plain")),
                  "teacher")
    remem = stage("teacher: ReMem", lambda: finetune_teacher(**teacher_common, output=str(out / "teacher-remem"),
                                                             alpha=DEMO_ALPHA, rho=DEMO_RHO), "teacher")
    stage("student: no teacher", lambda: distill_student(**student_common, output=str(out / "student-alone"),
                                                         save_at=[]), "student")
    stage("student <- plain teacher", lambda: distill_student(**student_common, output=str(out / "student-plain"),
                                                              teacher=str(plain.checkpoints[-1])), "student")
    stage("student <- ReMem teacher", lambda: distill_student(**student_common, output=str(out / "student-remem"),
                                                              teacher=str(remem.checkpoints[-1])), "student")
    wall = time.perf_counter() - t_start
    table = _format_table(["stage", "teacher acc", "student acc", "time (s)"],
                          [[r["stage"], r["teacher_acc"], r["student_acc"], r["time_s"]] for r in rows])
    table += (f"\n\ntotal {wall:.0f} s. Teachers: {teacher} {teacher_kwargs or ''} trained from scratch on digits "
              f"({t_epochs} epochs); ReMem = alpha {DEMO_ALPHA} + SAM rho {DEMO_RHO}. Student: {student} "
              f"{student_kwargs or ''} ({s_epochs} epochs). Not pretrained at scale: this shows the pipeline, not "
              "ReMem's effect.")
    plot = _plot_demo(rows, out / "demo.png")
    _atomic_write_text(out / "demo.md", table + "\n")
    _atomic_write_text(out / "demo.json", json.dumps({"rows": rows, "wall_time_s": wall, "quick": quick,
                                                      "seed": seed}, indent=2) + "\n")
    if progress:
        print(table)
        if plot is not None:
            print(f"plot: {plot}")
    return DemoResult(rows, table, plot, out, wall)


def _plot_demo(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log.warning("matplotlib is not installed: no plot written (pip install timm-remem[demo])")
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    names = [r["stage"] for r in rows]
    acc = [r["student_acc"] if r["student_acc"] is not None else r["teacher_acc"] for r in rows]
    colors = ["tab:gray" if "teacher:" in n else "tab:blue" for n in names]
    bars = ax.bar(range(len(rows)), acc, color=colors)
    for b, a in zip(bars, acc, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, a, f"{a:.3f}", ha="center", va="bottom", fontsize=8)
    lo = max(0.0, min(acc) - 0.1)
    ax.set_ylim(lo, 1.0)
    ax.set_xticks(range(len(rows)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("validation accuracy (digits)")
    ax.set_title("teachers (grey) and students (blue)", fontsize=9)
    bx.barh(range(len(rows)), [r["time_s"] for r in rows], color=colors)
    bx.set_yticks(range(len(rows)), names, fontsize=8)
    bx.invert_yaxis()
    bx.set_xlabel("wall time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
