"""The study's sharpness stage: every teacher checkpoint of a study measured on the same training images.

The images depend on the study's data settings and the sharpness options only, never on the arm or the run's seed.
The measure is :func:`timm_remem.analysis.measure_sharpness` with the teacher's task loss, in float32.
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

_FIELDS = ("sam_increase", "top_eigenvalue", "loss", "eigen_iterations", "eigen_converged", "num_batches",
           "num_samples")


def sharpness_batches(tcfg: FinetuneConfig, *, mean: Sequence[float], std: Sequence[float], img_size: int,
                      batches: int, batch_size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``batches x batch_size`` images of a ``seed``-ed permutation of the teacher's fine-tuning split (its
    few-label subset too), evaluation transform, as ``(images, labels)`` batches of ``batch_size``.

    Example:
        >>> from timm_remem.train.config import FinetuneConfig
        >>> tcfg = FinetuneConfig(model="test_vit", img_size=16)
        >>> b = sharpness_batches(tcfg, mean=(0.5,) * 3, std=(0.5,) * 3, img_size=16, batches=2, batch_size=4, seed=0)
        >>> [tuple(x.shape) for x, _ in b], [tuple(y.shape) for _, y in b]
        ([(4, 3, 16, 16), (4, 3, 16, 16)], [(4,), (4,)])
    """
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
    """The sharpness of one teacher checkpoint (``options``: :func:`~timm_remem.study.sharpness_settings`'s) as a
    dict of :data:`_FIELDS`; ``top_eigenvalue`` is None with ``eigen`` off.

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
    return {name: getattr(s, name) for name in _FIELDS}
