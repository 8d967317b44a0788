"""The two training recipes: :func:`finetune_teacher` and :func:`distill_student`.

Both start with :func:`start_run` (which checks everything it can before the run's folder is made) and train with
:func:`timm_remem.train.loop.fit`; they differ in the loss and in what an export holds.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.models import save_for_hf
from torch import nn

from .. import distributed
from .._io import claim_output_dir, os_error_reason, write_into
from ..distill import DistillationLoss, RememDistillationTask, Teacher, TeacherLogitCache, task_loss
from ..errors import CheckpointError
from ..hub import save_pretrained
from ..lora import is_lora, merge_lora, trainable_parameters
from ..subsets import training_subset
from ..teachers import load_teacher_model
from .builders import (
    adapt_teacher,
    autocast_factory,
    base_model_name,
    build_data,
    check_training_setup,
    create_model,
    dataset_classes,
    seed_everything,
    setup_device,
    wrap_ddp,
)
from .config import DistillConfig, FinetuneConfig, TrainConfig, make_config
from .console import log
from .identity import attach_identity, run_identity
from .loop import evaluate, fit
from .results import TrainResult

__all__ = ["finetune_teacher", "distill_student", "start_run", "load_distill_teacher"]


def start_run(cfg: TrainConfig) -> tuple[torch.device, int, int, nn.Module, tuple]:
    """What every run does first, writing nothing: check the output folder, set up the device and seed, build the
    model and the data, try the optimizer and schedule, and attach the run's identity to ``cfg``.

    Returns:
        ``(device, num_classes, img_size, model, (train set, val set, train loader, val loader))``.
    """
    claim_output_dir(cfg.output, "run", create=False)
    device = setup_device(cfg)
    seed_everything(cfg.seed)
    num_classes = dataset_classes(cfg)
    model, img_size = create_model(cfg, num_classes)
    data = build_data(cfg, model, img_size)
    check_training_setup(cfg)
    attach_identity(cfg, run_identity(cfg, data[0], data[1], num_classes=num_classes, img_size=img_size))
    return device, num_classes, img_size, model, data


def _save_student(model: nn.Module, folder: Path, info: Mapping[str, Any]) -> None:
    """A student export: timm's Hugging Face format with a ``remem_student`` block."""
    claim_output_dir(folder, "export", what="path")
    try:
        write_into(folder, lambda tmp: save_for_hf(model, str(tmp), model_config={"remem_student": dict(info)},
                                                   safe_serialization=True), last=("config.json",))
    except OSError as err:
        raise CheckpointError(f"could not write the export {str(folder)!r}: {os_error_reason(err)}. Free disk space "
                              "or make the folder writable (or choose another --output); the earlier exports and "
                              "training checkpoints are kept") from err


def load_distill_teacher(cfg: DistillConfig, num_classes: int, device: torch.device) -> nn.Module:
    """The teacher ``cfg.teacher`` names (see :func:`timm_remem.teachers.load_teacher_model`), on ``device``, eval."""
    teacher = load_teacher_model(cfg.teacher, num_classes=num_classes, pretrained=cfg.teacher_pretrained,
                                 model_kwargs=cfg.teacher_kwargs, against=f"dataset {cfg.dataset!r}")
    return teacher.to(device).eval()


def finetune_teacher(config: FinetuneConfig | None = None, /, **kwargs: Any) -> TrainResult:
    """Fine-tune a teacher, optionally with ReMem's reweighting (``alpha``), SAM (``rho``) and LoRA (``lora_rank``).

    With ``lora_rank`` only the adapters, the head and learnable factors train. Every export (``save_at`` epochs) is
    merged into plain timm weights, loadable with ``timm.create_model("local-dir:<export>", pretrained=True)``.

    Args:
        config: A :class:`~timm_remem.train.FinetuneConfig`; keyword arguments override its fields (or build one).
        **kwargs: Any :class:`~timm_remem.train.FinetuneConfig` field.

    Returns:
        A :class:`~timm_remem.train.TrainResult` (its model stays reweighted and adapted, not merged).

    Raises:
        ConfigError: Bad settings, unknown model/dataset, LoRA targets that match no layer, peft missing for
            ``lora_rank`` (``pip install timm-remem[lora]``), an output folder that already holds a run.
        UnsupportedModelError: ``alpha`` or ``lora_rank`` on a model without transformer MLP branches.
        CheckpointError: A resume checkpoint that is damaged or was written with other settings.
        RememError: The loss became NaN or infinite (checkpoints already written are kept).

    Example:
        >>> import tempfile
        >>> r = finetune_teacher(model="test_vit", img_size=16, epochs=1, alpha=0.8, rho=0.05,
        ...                      limit_train_batches=1, output=tempfile.mkdtemp(), progress=False)
        >>> 0.0 <= r.val_acc <= 1.0
        True
    """
    cfg = make_config(FinetuneConfig, config, kwargs)
    t0 = time.perf_counter()
    device, _, _, model, (_, _, train_loader, val_loader) = start_run(cfg)
    adapt_teacher(cfg, model)  # LoRA adapters (lora_rank), then the reweighting (alpha)
    base_model = base_model_name(cfg, model)
    model.to(device)
    train_model = wrap_ddp(model, device)  # under torchrun: DistributedDataParallel

    def compute(x, target, idx, teacher_logits):
        logits = train_model(x)
        return task_loss(logits, target, cfg.label_smoothing), logits, None

    def write_export(src: nn.Module, folder: Path, record: Mapping[str, Any]) -> None:
        acc = record.get("ema_val_acc", record["val_acc"])
        if is_lora(src):  # fold the adapters (and the factors) into a copy: the run goes on with src
            src = merge_lora(copy.deepcopy(src))
        save_pretrained(src, folder, merge=True, base_model=base_model, dataset=cfg.dataset, rho=cfg.rho,
                        adaptive=cfg.adaptive, epochs=int(record["epoch"]), teacher_accuracy=100.0 * acc)

    history, exports, val_acc = fit(
        cfg, model, train_loader=train_loader, val_loader=val_loader, device=device, compute=compute,
        desc="finetune", write_export=write_export, train_model=train_model,
    )
    model.eval()
    return TrainResult(Path(cfg.output), model, history, exports, val_acc, wall_time=time.perf_counter() - t0,
                       trainable_params=trainable_parameters(model))


class _ForwardCounter:
    """Counts a teacher's forward passes, summed over every rank."""

    def __init__(self, module: nn.Module | None) -> None:
        self.calls = 0
        self._handle = module.register_forward_hook(self._hook) if module is not None else None

    def _hook(self, *_: Any) -> None:
        self.calls += 1

    def total(self) -> int:
        return int(distributed.all_reduce_sum([self.calls])[0])

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()


def _labelled_mask(cfg: DistillConfig, train) -> torch.Tensor | None:
    """Which training images keep their label (``labels_per_class``), by dataset index; None: every image."""
    if cfg.labels_per_class is None:
        return None
    chosen = training_subset(train, per_class=cfg.labels_per_class, seed=cfg.subset_seed,
                             option="labels_per_class").indices
    mask = torch.zeros(len(train), dtype=torch.bool)
    mask[torch.as_tensor(chosen, dtype=torch.long)] = True
    if distributed.is_main_process():
        log.info("semi-supervised: the labels of %d of %d training images (%d per class); the rest are seen "
                 "through the teacher only", len(chosen), len(train), cfg.labels_per_class)
    return mask


def _labelled_task_loss(cfg: DistillConfig, logits: torch.Tensor, target: torch.Tensor, idx: torch.Tensor,
                        labelled: torch.Tensor) -> torch.Tensor:
    """The label loss over the batch's labelled images (mean), 0 (with a graph) in a batch without one."""
    keep = labelled[idx.cpu()].to(logits.device)
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return task_loss(logits[keep], target[keep], cfg.label_smoothing)


def distill_student(config: DistillConfig | None = None, /, *, teacher_model: nn.Module | None = None,
                    **kwargs: Any) -> TrainResult:
    """Distill a student from a teacher (or, with no teacher, train it alone as the baseline).

    The teacher runs in eval mode, once per step (SAM's second pass reuses its logits); its logits are cached across
    epochs when the inputs are deterministic (``cache_teacher``).

    Args:
        config: A :class:`~timm_remem.train.DistillConfig`; keyword arguments override its fields (or build one).
        teacher_model: A teacher module to use instead of ``config.teacher`` (library use).
        **kwargs: Any :class:`~timm_remem.train.DistillConfig` field.

    Returns:
        A :class:`~timm_remem.train.TrainResult` (with ``teacher_acc`` and ``teacher_forwards``).

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
    cfg = make_config(DistillConfig, config, kwargs)
    t0 = time.perf_counter()
    device, num_classes, _, student, (train, _, train_loader, val_loader) = start_run(cfg)
    student.to(device)
    autocast = autocast_factory(cfg, device)

    teacher_net = teacher_model
    if teacher_net is None and cfg.teacher is not None:
        teacher_net = load_distill_teacher(cfg, num_classes, device)
    teacher_acc = None
    counter = _ForwardCounter(None)
    labelled = _labelled_mask(cfg, train)
    if teacher_net is None:
        train_model = wrap_ddp(student, device)  # under torchrun: DistributedDataParallel

        def compute(x, target, idx, teacher_logits):
            logits = train_model(x)
            if labelled is not None:
                return _labelled_task_loss(cfg, logits, target, idx, labelled), logits, None
            return task_loss(logits, target, cfg.label_smoothing), logits, None
    else:
        teacher_net = teacher_net.to(device)
        use_cache = (not cfg.stochastic_inputs) if cfg.cache_teacher is None else cfg.cache_teacher
        cache = TeacherLogitCache(len(train)) if use_cache else None
        teacher = Teacher(teacher_net, student, cache=cache)
        teacher_acc = evaluate(teacher, val_loader, device, autocast)[1]  # without indices: never cached
        counter = _ForwardCounter(teacher_net)  # training forwards only (cache hits run none)
        # semi-supervised: the loss gets no labels; the label term over the labelled images is added in compute
        loss_fn = DistillationLoss(cfg.method, task_weight=cfg.task_weight if labelled is None else 0.0,
                                   distill_weight=cfg.distill_weight, temperature=cfg.temperature,
                                   label_smoothing=cfg.label_smoothing)
        task = RememDistillationTask(student, teacher, loss_fn, device=device, verbose=False)
        if distributed.is_distributed():  # the student in DDP; the frozen teacher (eval, no_grad) stays unwrapped
            task.prepare_distributed(device_ids=[device.index] if device.type == "cuda" else None)
        train_model = task.trainable_module

        def compute(x, target, idx, teacher_logits):
            res = task(x, target if labelled is None else None, teacher_logits=teacher_logits,
                       indices=idx if cache is not None else None)
            loss = res["loss"]
            if labelled is not None and cfg.task_weight > 0:
                loss = loss + cfg.task_weight * _labelled_task_loss(cfg, res["output"], target, idx, labelled)
            return loss, res["output"], res["teacher_logits"]

    def write_export(src: nn.Module, folder: Path, record: Mapping[str, Any]) -> None:
        acc = record.get("ema_val_acc", record["val_acc"])
        info = {"teacher": cfg.teacher, "teacher_acc": teacher_acc, "dataset": cfg.dataset, "val_acc": acc,
                "epoch": record["epoch"], "method": cfg.method if teacher_net is not None else None}
        _save_student(src, folder, info)

    try:
        history, exports, val_acc = fit(
            cfg, student, train_loader=train_loader, val_loader=val_loader, device=device, compute=compute,
            desc="distill" if teacher_net is not None else "train", write_export=write_export,
            extra_metrics=(lambda: {"teacher_acc": teacher_acc, "teacher_forwards": counter.total()})
            if teacher_net is not None else None, train_model=train_model,
        )
    finally:
        counter.remove()
    student.eval()
    return TrainResult(Path(cfg.output), student, history, exports, val_acc, teacher_acc=teacher_acc,
                       wall_time=time.perf_counter() - t0, teacher_forwards=counter.total(),
                       trainable_params=trainable_parameters(student))
