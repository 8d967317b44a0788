"""The study's sharpness stage: every teacher checkpoint of a study measured on the same training images.

The images (:func:`sharpness_batches`): the teacher's fine-tuning split (its few-label subset when ``finetune`` sets
``train_per_class`` / ``train_imbalance``, with the same ``subset_seed``) with the evaluation transform (no
augmentation), normalised as the checkpoint expects. From that split, the first ``batches x batch_size`` positions
of a permutation drawn from ``torch.Generator().manual_seed(seed)`` (all of them when the split is smaller), in that
order, cut into batches of ``batch_size`` (the last one shorter when the split runs out). They depend on the study's
data settings and the sharpness options only, never on the arm or the run's seed, so every teacher of a study is
measured on the same images.

The measure is :func:`timm_remem.analysis.measure_sharpness` with the teacher's task loss (cross-entropy with the
fine-tuning's ``label_smoothing``), in float32 on the study's device, with the same ``seed`` as the power
iteration's start: SAM's loss increase at ``rho`` and the Hessian's top eigenvalue.

Example:
    >>> from timm_remem.train.config import FinetuneConfig
    >>> tcfg = FinetuneConfig(model="test_vit", img_size=16)
    >>> b = sharpness_batches(tcfg, mean=(0.5,) * 3, std=(0.5,) * 3, img_size=16, batches=2, batch_size=4, seed=0)
    >>> [tuple(x.shape) for x, _ in b], [tuple(y.shape) for _, y in b]
    ([(4, 3, 16, 16), (4, 3, 16, 16)], [(4,), (4,)])
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._models import data_config
from ..analysis import measure_sharpness
from ..data import create_dataset
from ..distill.losses import task_loss
from ..errors import ConfigError
from ..subsets import training_subset
from ..teachers import load_teacher_model
from ..train.builders import dataset_classes, default_img_size, resolve_device
from ..train.config import FinetuneConfig

__all__ = ["sharpness_batches", "measure_teacher_sharpness"]


def sharpness_batches(tcfg: FinetuneConfig, *, mean: Sequence[float], std: Sequence[float], img_size: int,
                      batches: int, batch_size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(images, labels)`` batches a study measures every teacher on (see the module docstring)."""
    train = create_dataset(tcfg.dataset, tcfg.data_dir, "train", img_size=img_size, mean=mean, std=std,
                           download=tcfg.download)  # augment off: the evaluation transform
    train = training_subset(train, per_class=tcfg.train_per_class, imbalance=tcfg.train_imbalance,
                            seed=tcfg.subset_seed)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:batches * batch_size].tolist()
    out = []
    for start in range(0, len(order), batch_size):
        items = [train[i] for i in order[start:start + batch_size]]
        out.append((torch.stack([torch.as_tensor(x) for x, _ in items]),
                    torch.tensor([int(y) for _, y in items], dtype=torch.long)))
    return out


def measure_teacher_sharpness(tcfg: FinetuneConfig, checkpoint: str | Path, options: dict[str, Any],
                              device: str) -> dict[str, Any]:
    """The sharpness of one teacher checkpoint: ``sam_increase``, ``top_eigenvalue`` (None with ``eigen`` off),
    ``loss``, ``eigen_iterations``, ``eigen_converged``, ``num_batches`` and ``num_samples``.

    Args:
        tcfg: The teacher's fine-tuning settings (dataset, subset, image size, label smoothing).
        checkpoint: The checkpoint folder the study distils from.
        options: The resolved sharpness options (:func:`~timm_remem.study.sharpness_settings`).
        device: The study's device (``auto``, ``cpu``, ``cuda``, ...).

    Raises:
        ConfigError: The checkpoint folder is gone (a finished run measured later needs it on disk).
    """
    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"the sharpness stage needs the teacher checkpoint {str(path)!r}, which is not there (was it deleted?); "
            "delete that run's folder to recompute the run, or switch the measurement off (sharpness=None, "
            "--no-sharpness)"
        )
    model = load_teacher_model(str(path), num_classes=dataset_classes(tcfg)).to(resolve_device(device)).float()
    dc = data_config(model)
    size = default_img_size(tcfg) or int(dc["input_size"][-1])
    batches = sharpness_batches(tcfg, mean=dc["mean"], std=dc["std"], img_size=size, batches=options["batches"],
                                batch_size=options["batch_size"], seed=options["seed"])
    loss = functools.partial(task_loss, label_smoothing=tcfg.label_smoothing)
    s = measure_sharpness(model, batches, loss_fn=loss, rho=options["rho"], eigen=options["eigen"],
                          iters=options["iters"], tol=options["tol"], seed=options["seed"])
    return {"sam_increase": s.sam_increase, "top_eigenvalue": s.top_eigenvalue, "loss": s.loss,
            "eigen_iterations": s.eigen_iterations, "eigen_converged": s.eigen_converged,
            "num_batches": s.num_batches, "num_samples": s.num_samples}
