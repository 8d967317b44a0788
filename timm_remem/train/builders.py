"""What a training run is built from: the device (and process group), the model, the data, the optimizer, the
learning-rate schedule, mixed precision, the weight EMA and Mixup/CutMix, each from a
:class:`~timm_remem.train.TrainConfig` through timm's own factories.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable

import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, random_seed
from torch import nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset

from .. import distributed
from .._models import create_timm_model, data_config
from ..data import create_dataset, create_loader, dataset_num_classes
from ..errors import ConfigError
from ..lora import apply_lora
from ..reweighting import reweight
from ..sam import create_sam
from ..subsets import training_subset
from .config import FinetuneConfig, TrainConfig

__all__ = ["resolve_device", "setup_device", "wrap_ddp", "seed_everything", "dataset_classes", "default_img_size",
           "create_model", "check_input_size", "check_training_setup", "adapt_teacher", "base_model_name", "build_data",
           "create_optimizer", "create_scheduler", "create_scaler", "autocast_factory", "create_ema", "create_mixup"]

_NO_SCHED = ("none", "constant", "")


def resolve_device(name: str) -> torch.device:
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


def setup_device(cfg: TrainConfig) -> torch.device:
    """Resolve the device and, when launched by torchrun, join the process group (nccl on CUDA, gloo on CPU)."""
    device = resolve_device(cfg.device)
    distributed.init_distributed(device)
    return device


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` inside a process group of several processes, else ``model`` itself."""
    if not distributed.is_distributed():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch (``timm.utils.random_seed``; each rank gets ``seed + rank``)."""
    random_seed(seed, rank)


def dataset_classes(cfg: TrainConfig) -> int:
    """The class count of the configured dataset, checked against ``cfg.num_classes`` when that is set."""
    found = dataset_num_classes(create_dataset(cfg.dataset, cfg.data_dir, "train", img_size=8, download=cfg.download))
    if cfg.num_classes is not None and cfg.num_classes != found:
        raise ConfigError(f"num_classes={cfg.num_classes} but dataset {cfg.dataset!r} has {found} classes")
    return found


def default_img_size(cfg: TrainConfig) -> int | None:
    """``cfg.img_size``; 32 for digits when unset; None (the model's own size) otherwise."""
    if cfg.img_size is not None:
        return cfg.img_size
    return 32 if cfg.dataset.lower() == "digits" else None


def create_model(cfg: TrainConfig, num_classes: int) -> tuple[nn.Module, int]:
    """The model to train (a head for ``num_classes``) and its checked input size."""
    img_size = default_img_size(cfg)
    model = create_timm_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes, img_size=img_size,
                              kwargs=cfg.model_kwargs)
    if img_size is None:
        img_size = int(data_config(model)["input_size"][-1])
    check_input_size(model, img_size, cfg.model)
    return model, img_size


def _patch_size(model: nn.Module) -> tuple[int, int] | None:
    """The patch size of a timm ``patch_embed`` that does not pad (None otherwise)."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "patch_size", None)
    if size is None or getattr(embed, "dynamic_img_pad", False):
        return None
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return (int(size[0]), int(size[-1])) if all(isinstance(v, int) for v in size) else None


def check_input_size(model: nn.Module, img_size: int, name: str) -> None:
    """Refuse an input size the model cannot take, before anything is trained or written.

    A patch model needs a multiple of its patch size (timm refuses others or drops the pixels past the last whole
    patch); then a forward pass on ``meta`` tensors (shapes only) lets timm's own input checks speak now. An
    operation ``meta`` tensors cannot run leaves the decision to the real forward pass.

    Raises:
        ConfigError: Naming the size, the model and the sizes that work.
    """
    patch = _patch_size(model)
    if patch is not None and (img_size % patch[0] or img_size % patch[1]):
        step = max(patch)
        below, above = img_size - img_size % step, img_size - img_size % step + step
        sizes = f"img_size={below} or {above}" if below > 0 else f"img_size={above}"
        shown = patch[0] if patch[0] == patch[1] else f"{patch[0]}x{patch[1]}"
        raise ConfigError(f"img_size={img_size} is not a multiple of {name}'s patch size {shown}: the image is cut "
                          f"into {patch[0]}x{patch[1]}-pixel patches, so timm refuses it or drops the pixels past the "
                          f"last whole patch; use {sizes}")
    stand_ins = {k: torch.empty_like(v, device="meta")
                 for k, v in itertools.chain(model.named_parameters(), model.named_buffers())}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            functional_call(model, stand_ins, (torch.empty(2, 3, img_size, img_size, device="meta"),), strict=False)
    except AssertionError as e:  # timm's input checks (timm.layers._assert)
        raise ConfigError(f"{name} cannot take {img_size}x{img_size} images: {e}. Choose another img_size "
                          "(--img-size), or the model's own size (leave img_size unset)") from None
    except Exception:  # noqa: BLE001 - an operation meta tensors cannot run: the real forward pass decides
        pass
    finally:
        model.train(was_training)


def check_training_setup(cfg: TrainConfig) -> None:
    """Build the optimizer and schedule for a stand-in, so that an unknown name fails (ConfigError) before the run's
    folder is made."""
    stand_in = nn.Module()
    stand_in.weight = nn.Parameter(torch.zeros(2, 2))
    with torch.random.fork_rng(devices=[]):
        create_scheduler(cfg, create_optimizer(cfg, stand_in), 1)


def adapt_teacher(cfg: FinetuneConfig, model: nn.Module) -> nn.Module:
    """The teacher's training form (in place): LoRA adapters first (``lora_rank``), then the reweighting (``alpha``).

    LoRA goes first so that peft adapts the plain timm model and never freezes the reweighting factors, which then
    scale the adapted MLP branches. :func:`timm_remem.lora.merge_lora` undoes both in the opposite order.
    """
    if cfg.lora_rank is not None:
        apply_lora(model, cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets)
    if cfg.alpha is not None:
        reweight(model, cfg.alpha, schedule=cfg.schedule, top_k=cfg.top_k, learnable=cfg.learnable)
    return model


def base_model_name(cfg: TrainConfig, model: nn.Module) -> str | None:
    """The export's base model: with ``cfg.pretrained``, the Hub id of the weights timm loaded, else the model name
    (``hf-hub:`` dropped); None without ``cfg.pretrained``."""
    if not cfg.pretrained:
        return None
    hub_id = (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id")
    if isinstance(hub_id, str) and hub_id:
        return hub_id.split("@")[0]
    for prefix in ("hf-hub:", "hf_hub:"):
        if cfg.model.startswith(prefix):
            return cfg.model[len(prefix):].split("@")[0]
    return cfg.model


def build_data(cfg: TrainConfig, model: nn.Module, img_size: int):
    """``(train set, val set, train loader, val loader)`` normalised with the model's mean/std."""
    dc = data_config(model)
    common = dict(img_size=img_size, mean=dc["mean"], std=dc["std"], download=cfg.download)
    train = create_dataset(cfg.dataset, cfg.data_dir, "train", augment=cfg.augment, **common)
    train = training_subset(train, per_class=cfg.train_per_class, imbalance=cfg.train_imbalance,
                            seed=cfg.subset_seed)
    val = create_dataset(cfg.dataset, cfg.data_dir, "val", **common)
    drop_last = cfg.mixup > 0 or cfg.cutmix > 0  # Mixup needs even batches
    if drop_last and len(train) < cfg.batch_size:
        raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {len(train)} training samples; lower it")
    pin = torch.cuda.is_available()
    world, rank = distributed.get_world_size(), distributed.get_rank()
    # Each rank takes every world-th sample of the epoch's shared permutation: batch_size is per process, so the
    # global batch is world * batch_size (rank r's k-th batch holds samples k*B*world + r + world*j of the order).
    # with augmentation, each sample's random transform is seeded by (seed, epoch, index): the same images with
    # any num_workers, and after a resume (see timm_remem.data.IndexedDataset)
    train_loader = create_loader(train, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=drop_last,
                                 num_workers=cfg.num_workers, pin_memory=pin, num_replicas=world, rank=rank,
                                 seed_per_sample=cfg.augment)
    if world > 1:  # a disjoint validation shard per rank, no padding: sums over ranks cover each sample once
        val_shard = Subset(val, range(rank, len(val), world))
        val_loader = create_loader(val_shard, cfg.eval_batch_size, num_workers=cfg.num_workers,
                                   pin_memory=pin) if len(val_shard) else []
    else:
        val_loader = create_loader(val, cfg.eval_batch_size, num_workers=cfg.num_workers, pin_memory=pin)
    return train, val, train_loader, val_loader


def create_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """``timm.optim.create_optimizer_v2`` with the config's settings; with rho > 0, timm_remem's SAM (exact or
    one-pass) around that optimizer."""
    base = cfg.optimizer.lower()
    try:
        if cfg.rho > 0:
            return create_sam(model, "sgd" if base == "nesterov" else base, rho=cfg.rho,
                              one_pass=cfg.sam == "onepass", adaptive=cfg.adaptive, lr=cfg.lr,
                              weight_decay=cfg.weight_decay, momentum=cfg.momentum)
        return create_optimizer_v2(model, opt=base, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    except (ValueError, KeyError, AssertionError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"cannot create optimizer {cfg.optimizer!r} ({e}); use a timm optimizer name such as "
                          "'adamw' or 'sgd'") from e


def create_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """A timm scheduler updated every step (``step_update``), or None for ``sched="none"``."""
    if cfg.sched.lower() in _NO_SCHED:
        return None
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


def create_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """A float16 ``GradScaler`` for AMP on CUDA; None otherwise (bfloat16 on the CPU needs none)."""
    return torch.amp.GradScaler("cuda") if cfg.amp and device.type == "cuda" else None


def autocast_factory(cfg: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument factory of the run's autocast context (float16 on CUDA, bfloat16 on CPU; a no-op off AMP)."""
    if not cfg.amp:
        return contextlib.nullcontext
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def create_ema(cfg: TrainConfig, model: nn.Module) -> ModelEmaV3 | None:
    """``timm.utils.ModelEmaV3`` of ``model`` when ``cfg.ema``; None otherwise."""
    return ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None


def create_mixup(cfg: TrainConfig, num_classes: int) -> Mixup | None:
    """``timm.data.Mixup`` (with the config's label smoothing) when mixup or cutmix is on; None otherwise."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=num_classes)
