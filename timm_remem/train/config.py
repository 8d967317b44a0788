"""Training configurations: :class:`TrainConfig` (shared), :class:`FinetuneConfig` (teacher) and
:class:`DistillConfig` (student). Each field's ``metadata["help"]`` is its command-line help.

Example:
    >>> from timm_remem.train import FinetuneConfig
    >>> cfg = FinetuneConfig(model="test_vit", alpha=0.85, epochs=3, save_at=[3, 1])
    >>> cfg.save_at
    [1, 3]
    >>> FinetuneConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._serialization import dataclass_from_dict, dataclass_to_dict, documented
from .._validation import check_choice, check_fields, check_float, check_int, paths_as_strings
from ..distill.losses import DISTILL_METHODS
from ..errors import ConfigError
from ..lora.config import LORA_TARGETS, check_lora_settings
from ..reweighting.config import SCHEDULES

__all__ = ["TrainConfig", "FinetuneConfig", "DistillConfig", "SAM_BASES", "SAM_MODES", "TRACKERS", "LORA_TARGETS",
           "RESUME_MISMATCH", "make_config"]

TRACKERS = ("tensorboard", "wandb")
# What a resume does when the data or the library versions changed since the run started.
RESUME_MISMATCH = ("refuse", "allow")
# Base optimizer name -> the timm_remem SAM optimizer registered in timm's factory (see timm_remem.sam).
# "sgd" and "nesterov" are Nesterov SGD (timm's "sgd" is Nesterov too); "momentum" is classical momentum.
SAM_BASES = {"sgd": "samsgd", "momentum": "sammomentum", "nesterov": "samsgd", "adam": "samadam",
             "adamw": "samadamw"}
SAM_MODES = ("exact", "onepass")


def _opt(default: Any, help: str) -> Any:  # noqa: A002 - "help" is the argparse word
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@documented
@dataclass
class TrainConfig:
    """Settings shared by teacher fine-tuning and student distillation."""

    model: str = _opt("", "timm model name (hf-hub:org/name and local-dir:/path included)")
    model_kwargs: dict = _opt({}, "extra timm.create_model arguments as a JSON object, e.g. '{\"depth\": 6}'")
    pretrained: bool = _opt(False, "load the model's pretrained weights (from the Hub cache or a local dir)")
    dataset: str = _opt("digits", "dataset: 'digits' (offline), 'folder', 'torch/cifar100', 'hfds/<id>', ...")
    data_dir: str | None = _opt(None, "dataset root folder (not needed for digits)")
    download: bool = _opt(False, "allow torchvision to download torch/... datasets")
    img_size: int | None = _opt(None, "input size; 32 for digits when unset, else the model's pretrained input size")
    num_classes: int | None = _opt(None, "number of classes; read from the dataset when unset")
    output: str = _opt("runs/train", "output folder of the run")
    epochs: int = _opt(10, "training epochs")
    batch_size: int = _opt(64, "training batch size (per process under torchrun)")
    eval_batch_size: int = _opt(256, "evaluation batch size")
    optimizer: str = _opt("adamw", "timm optimizer name (adamw, sgd, ...); with rho > 0 SAM wraps sgd, momentum, "
                                   "nesterov, adam or adamw (momentum is classical momentum, sgd and nesterov "
                                   "Nesterov momentum)")
    lr: float = _opt(1e-3, "peak learning rate")
    weight_decay: float = _opt(0.05, "weight decay (not applied to biases, norms and 0-d scales: timm's parameter "
                                        "groups)")
    momentum: float = _opt(0.9, "momentum of SGD-type optimizers")
    sched: str = _opt("cosine", "timm scheduler name (cosine, step, ...) or 'none'; updated every step")
    warmup_epochs: int = _opt(0, "linear warmup epochs")
    min_lr: float = _opt(0.0, "final learning rate of the schedule")
    label_smoothing: float = _opt(0.0, "label smoothing of the task loss, in [0, 1)")
    augment: bool = _opt(False, "timm training augmentation for image folders and torchvision sets (digits has none)")
    mixup: float = _opt(0.0, "Mixup alpha (0 disables)")
    cutmix: float = _opt(0.0, "CutMix alpha (0 disables)")
    rho: float = _opt(0.0, "SAM radius; 0 trains without SAM")
    adaptive: bool = _opt(False, "ASAM: scale-invariant SAM (needs rho > 0)")
    sam: str = field(default="exact", metadata={
        "help": "SAM algorithm with rho > 0: exact (two forward/backward passes per step) or onepass (Momentum-SAM: "
                "one pass, the base optimizer's cost; timm_remem.sam.OnePassSAM)", "choices": SAM_MODES})
    amp: bool = _opt(False, "mixed precision: bfloat16 autocast on CPU, float16 with a GradScaler on CUDA")
    clip_grad: float | None = _opt(None, "clip the global gradient norm to this value (off when unset)")
    ema: bool = _opt(False, "keep an EMA of the weights (timm.utils.ModelEmaV3); exports then hold the EMA "
                             "weights")
    ema_decay: float = _opt(0.998, "EMA decay, in [0, 1)")
    seed: int = _opt(0, "seed of model init, data order and augmentation")
    device: str = _opt("auto", "'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...")
    num_workers: int = _opt(0, "DataLoader workers")
    save_at: list[int] | None = _opt(None, "epochs (1-based) after which to export a checkpoint; the last epoch "
                                           "only when unset; none when empty")
    save_state: bool = _opt(True, "write resumable training checkpoints (after every epoch and every "
                                  "checkpoint_every steps)")
    checkpoint_every: int = _opt(0, "also write a training checkpoint every this many optimizer steps (0: at epoch "
                                    "ends only)")
    keep_last: int = _opt(2, "number of newest training checkpoints kept")
    resume: bool | str | None = _opt(None, "resume: True from output/train-state, a path from that checkpoint, "
                                           "'auto' when output/train-state holds one and start afresh otherwise (jobs "
                                           "restarted after a crash or pre-emption, e.g. torchrun --max-restarts); "
                                           "unset: start afresh")
    resume_mismatch: str = field(default="refuse", metadata={
        "help": "when resuming, data (files added, removed or changed in an image folder, another dataset size or "
                "subset) or library versions (timm-remem, timm, torch, torchvision) that changed since the run "
                "started: refuse (naming what changed) or allow (resume anyway; the run is then not what an "
                "uninterrupted run would have computed); settings that differ are always refused",
        "choices": RESUME_MISMATCH})
    progress: bool = _opt(True, "show tqdm progress bars")
    limit_train_batches: int | None = _opt(None, "stop each epoch after this many batches (quick runs, benchmarks)")
    train_per_class: int | None = _opt(None, "train on a seeded subset of this many images per class (few-label "
                                             "runs); the validation split is never cut")
    train_imbalance: float | None = _opt(None, "long-tailed training subset: the largest class keeps this many times "
                                               "the images of the smallest (e.g. 10; see timm_remem.subsets)")
    subset_seed: int = _opt(0, "seed of the training subset's images (independent of seed, so runs share them)")
    log: list[str] = field(default_factory=list, metadata={
        "help": "experiment trackers beside metrics.jsonl: tensorboard, wandb (each an optional extra)",
        "choices": TRACKERS})

    def __post_init__(self) -> None:
        paths_as_strings(self)  # output=Path(...), data_dir=Path(...): recorded as text
        for name in ("model", "dataset", "optimizer", "sched", "device", "output"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not self.model:
            raise ConfigError(f"model must be a timm model name such as 'vit_tiny_patch16_224', got {self.model!r}")
        if not isinstance(self.model_kwargs, dict):
            raise ConfigError(f"model_kwargs must be a dict of timm.create_model arguments, got {self.model_kwargs!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "keep_last"):
            check_int(name, getattr(self, name), low=1)
        for name in ("weight_decay", "momentum", "warmup_epochs", "min_lr", "mixup", "cutmix", "rho", "ema_decay",
                     "checkpoint_every"):
            check_float(name, getattr(self, name), low=0)
        check_float("lr", self.lr, low=0, low_open=True)
        check_float("label_smoothing", self.label_smoothing, low=0, high=1, high_open=True)
        check_float("ema_decay", self.ema_decay, low=0, high=1, high_open=True, hint="0.998 is a common choice")
        check_float("clip_grad", self.clip_grad, low=0, low_open=True, allow_none=True)
        for name in ("img_size", "num_classes", "limit_train_batches", "train_per_class"):
            check_int(name, getattr(self, name), low=1, allow_none=True)
        check_float("train_imbalance", self.train_imbalance, low=1, allow_none=True,
                    hint="the ratio of the largest class to the smallest, e.g. 10")
        for name in ("seed", "subset_seed"):  # numpy's generators take seeds in [0, 2**32)
            check_int(name, getattr(self, name), low=0, high=2**32 - 1)
        check_int("num_workers", self.num_workers, low=0, hint="0 loads in the main process")
        if not isinstance(self.log, (list, tuple)) or isinstance(self.log, str):
            raise ConfigError(f"log must be a list of tracker names such as ['tensorboard'], got {self.log!r}")
        self.log = list(dict.fromkeys(self.log))
        for name in self.log:
            check_choice("log", name, TRACKERS)
        if self.save_at is not None:
            self.save_at = sorted({check_int("save_at epoch", e) for e in self.save_at})
            bad = [e for e in self.save_at if not 1 <= e <= self.epochs]
            if bad:
                raise ConfigError(f"save_at epochs {bad} are outside 1..epochs={self.epochs}; pick epochs in range")
        check_choice("sam", self.sam, SAM_MODES)
        check_choice("resume_mismatch", self.resume_mismatch, RESUME_MISMATCH)
        if self.adaptive and self.sam == "onepass":
            raise ConfigError("adaptive=True (ASAM) needs the exact SAM: set sam='exact', or adaptive=False for the "
                              "one-pass SAM")
        if self.adaptive and self.rho == 0:
            raise ConfigError("adaptive=True (ASAM) needs rho > 0 (ASAM uses a larger radius, e.g. rho=0.5)")
        if self.rho > 0 and self.optimizer.lower() not in SAM_BASES:
            raise ConfigError(
                f"SAM (rho={self.rho}) wraps sgd, momentum, adam or adamw; got optimizer={self.optimizer!r}. "
                "Pick one of those or set rho=0"
            )
        self._check_own()
        check_fields(self)  # every field (a subclass's too) against its annotation: "false" is no bool, 1.5 no int

    def _check_own(self) -> None:
        """A subclass's own checks (before the type check of every field, for their clearer words)."""

    def to_dict(self) -> dict[str, Any]:
        """Sorted JSON-ready dict, stamped with the timm-remem version."""
        return dataclass_to_dict(self, stamp_version=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a dict; unknown keys are dropped with a warning."""
        return dataclass_from_dict(cls, data, ignore=("version",))


@documented
@dataclass
class FinetuneConfig(TrainConfig):
    """Teacher fine-tuning settings: :class:`TrainConfig` plus reweighting."""

    output: str = _opt("runs/teacher", "output folder of the run")
    alpha: float | None = _opt(None, "MLP weight of the ReMem reweighting, e.g. 0.85; no reweighting when unset")
    schedule: str = field(default="exponential", metadata={"help": "reweighting schedule (see reweight)",
                                                                 "choices": SCHEDULES})
    top_k: int | None = _opt(None, "reweight only the top k blocks (all when unset)")
    learnable: bool = _opt(False, "make the reweighting factors trainable")
    lora_rank: int | None = _opt(None, "fine-tune LoRA adapters of this rank (needs timm-remem[lora]); the head "
                                       "trains fully; full fine-tuning when unset")
    lora_alpha: float | None = _opt(None, "LoRA scaling numerator (peft lora_alpha); equal to the rank when unset")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA path, in [0, 1)")
    lora_targets: list[str] | None = field(default=None, metadata={
        "help": "Linear layers that get LoRA adapters, comma-separated (peft target_modules); "
                "qkv,proj,fc1,fc2 when unset"})

    def _check_own(self) -> None:
        check_float("alpha", self.alpha, low=0, low_open=True, allow_none=True, hint="ReMem uses (0, 1], e.g. 0.85")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be {' or '.join(map(repr, SCHEDULES))}, got {self.schedule!r}")
        check_int("top_k", self.top_k, low=1, allow_none=True)
        if self.alpha is None and (self.top_k is not None or self.learnable):
            raise ConfigError("top_k and learnable configure reweighting: also pass alpha (e.g. alpha=0.85)")
        self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets = check_lora_settings(
            self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets, allow_no_rank=True)
        if self.lora_rank is None and (self.lora_alpha is not None or self.lora_targets is not None
                                       or self.lora_dropout != 0):
            raise ConfigError("lora_alpha, lora_dropout and lora_targets configure LoRA: also pass lora_rank (e.g. 8)")


@documented
@dataclass
class DistillConfig(TrainConfig):
    """Student distillation settings: :class:`TrainConfig` plus the teacher and the loss."""

    output: str = _opt("runs/student", "output folder of the run")
    teacher: str | None = _opt(None, "teacher: a checkpoint folder (checkpoints/epoch-NNN) or a timm, hf-hub: or "
                                     "local-dir: name; the student trains alone when unset")
    teacher_kwargs: dict = _opt({}, "timm.create_model arguments for a teacher given by timm name, as a JSON object")
    teacher_pretrained: bool = _opt(True, "load pretrained weights for a teacher given by timm name")
    method: str = field(default="kd", metadata={"help": "distillation method (see timm_remem.distill.DistillationLoss)",
                                                "choices": DISTILL_METHODS})
    temperature: float = _opt(1.0, "distillation temperature")
    task_weight: float = _opt(1.0, "weight of the label loss")
    distill_weight: float = _opt(1.0, "weight of the distillation loss")
    cache_teacher: bool | None = _opt(None, "cache teacher logits by sample index; automatic when unset (on when "
                                            "inputs are deterministic: no augmentation, mixup or cutmix)")
    labels_per_class: int | None = _opt(None, "semi-supervised distillation: the label loss sees the labels of "
                                              "only this many training images per class (a seeded subset, "
                                              "subset_seed; the mean over a batch's labelled images, 0 without "
                                              "one), the distillation loss every image; without a teacher the "
                                              "student learns from those labelled images alone (the baseline)")

    def _check_own(self) -> None:
        check_choice("method", self.method, DISTILL_METHODS)
        check_int("labels_per_class", self.labels_per_class, low=1, allow_none=True)
        if self.labels_per_class is not None and (self.mixup > 0 or self.cutmix > 0):
            raise ConfigError(
                f"labels_per_class={self.labels_per_class} masks the label loss per image, but mixup/cutmix blend "
                "labelled with unlabelled images; turn mixup and cutmix off (mixup=0 cutmix=0) or unset "
                "labels_per_class"
            )
        check_float("temperature", self.temperature, low=0, low_open=True)
        check_float("task_weight", self.task_weight, low=0)
        check_float("distill_weight", self.distill_weight, low=0)
        if self.cache_teacher and self.stochastic_inputs:
            raise ConfigError(
                "cache_teacher=True needs deterministic inputs, but augment/mixup/cutmix are on: the cached logits "
                "would belong to other views. Turn the augmentation off or set cache_teacher=None"
            )

    @property
    def stochastic_inputs(self) -> bool:
        """Whether the training inputs change from epoch to epoch (augmentation, mixup or cutmix)."""
        return bool((self.augment and self.dataset.lower() != "digits") or self.mixup > 0 or self.cutmix > 0)


def make_config(cls: type, config: Any, kwargs: dict[str, Any]) -> Any:
    """``config`` (an instance of ``cls`` or None) updated with ``kwargs``; unknown keyword names are refused."""
    if config is not None and not isinstance(config, cls):
        raise ConfigError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {cls.__name__}; valid options: {sorted(known)}")
    if config is None:
        return cls(**kwargs)
    return dataclasses.replace(config, **kwargs)
