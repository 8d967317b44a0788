"""What ``config.json`` records about a teacher: :class:`TeacherMetadata`, the ``remem`` block (reweighting settings,
factors, training metadata) and the teacher's own ``pretrained_cfg`` fields."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from timm.models import get_pretrained_cfg
from torch import nn

from .._serialization import dataclass_from_dict, dataclass_to_dict, known_fields
from .._validation import check_bool, check_float, check_int
from .._version import __version__
from ..errors import CheckpointError, ConfigError
from ..reweighting import ReweightConfig, get_reweight_config
from ._common import PAPER_ARXIV, PAPER_TITLE

__all__ = ["TeacherMetadata", "REWEIGHT_KEYS", "RANDOM_INIT", "metadata_from_fields", "remem_block",
           "reweight_config_from_block", "rewrite_pretrained_cfg", "base_model_hub_id", "initialisation"]

# What the card and config.json say of a teacher whose weights did not start from a pretrained checkpoint.
RANDOM_INIT = "trained from random initialisation (no pretrained weights were loaded)"
# pretrained_cfg fields that locate the base checkpoint's weights: false for the teacher, dropped.
_BASE_WEIGHT_KEYS = ("url", "file", "state_dict", "hf_hub_filename", "source", "origin_url", "notes")

# ReweightConfig fields written flat into the ``remem`` block of config.json.
REWEIGHT_KEYS = tuple(f.name for f in dataclasses.fields(ReweightConfig) if f.name != "version")
_ACCURACY_HINT = "give the top-1 accuracy in percent, between 0 and 100"


@dataclass
class TeacherMetadata:
    """How a teacher was made, recorded in ``config.json`` and shown on the model card; every field is optional.

    Attributes:
        base_model: The pretrained checkpoint the teacher started from (a timm name or a Hub id), only when those
            weights were really loaded; ``None``: trained from random initialisation (never guessed).
        dataset: Dataset the teacher was fine-tuned on (a Hub dataset id or a name, e.g. ``"cifar100"``).
        rho: SAM neighbourhood radius used for fine-tuning.
        adaptive: Whether SAM was adaptive (ASAM).
        epochs: Number of fine-tuning epochs.
        teacher_accuracy: Top-1 accuracy of the teacher on ``dataset``, in percent.
        student_accuracies: ``{student model: top-1 accuracy in percent}`` of students distilled from it.
        license: License of the weights (e.g. ``"apache-2.0"``); left out of the card when ``None``.

    Example:
        >>> TeacherMetadata(dataset="cifar100", rho=0.1, teacher_accuracy=91.5).to_dict()["rho"]
        0.1
    """

    base_model: str | None = None
    dataset: str | None = None
    rho: float | None = None
    adaptive: bool | None = None
    epochs: int | None = None
    teacher_accuracy: float | None = None
    student_accuracies: dict[str, float] = field(default_factory=dict)
    license: str | None = None

    def __post_init__(self) -> None:
        for name in ("base_model", "dataset", "license"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"{name} must be a non-empty string or None, got {value!r}.")
        if self.rho is not None:
            number = not isinstance(self.rho, bool) and isinstance(self.rho, (int, float))
            if not (number and math.isfinite(self.rho) and self.rho >= 0):
                raise ConfigError(f"rho must be a finite number >= 0 (the SAM radius, e.g. 0.05), got {self.rho!r}.")
            self.rho = float(self.rho)
        if self.adaptive is not None:
            check_bool("adaptive", self.adaptive, hint="or None when it was not recorded")
        self.epochs = check_int("epochs", self.epochs, low=0, allow_none=True)
        if not isinstance(self.student_accuracies, Mapping):
            raise ConfigError(
                f"student_accuracies must be a dict {{student model: top-1 %}}, got {self.student_accuracies!r}."
            )
        self.student_accuracies = dict(self.student_accuracies)
        self.teacher_accuracy = check_float("teacher_accuracy", self.teacher_accuracy, low=0, high=100,
                                            allow_none=True, hint=_ACCURACY_HINT)
        for student, acc in self.student_accuracies.items():
            self.student_accuracies[student] = check_float(f"student_accuracies[{student!r}]", acc, low=0, high=100,
                                                           hint=_ACCURACY_HINT)
        if (self.teacher_accuracy is not None or self.student_accuracies) and self.dataset is None:
            raise ConfigError("accuracies need the dataset they were measured on: pass dataset='...' too.")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict with sorted keys."""
        return dataclass_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TeacherMetadata:
        """Build metadata from a dict, dropping unknown keys with a warning (newer versions may add keys).

        Example:
            >>> TeacherMetadata.from_dict({"dataset": "cifar100", "epochs": None}).dataset
            'cifar100'
        """
        known = known_fields(cls)
        return dataclass_from_dict(cls, {k: v for k, v in data.items() if v is not None or k not in known})


def metadata_from_fields(metadata: TeacherMetadata | None, fields: dict[str, Any]) -> TeacherMetadata:
    """``metadata`` (or empty metadata) with the keyword ``fields`` of ``save_pretrained`` applied on top."""
    if metadata is not None and not isinstance(metadata, TeacherMetadata):
        raise ConfigError(f"metadata must be a TeacherMetadata, got {type(metadata).__name__}.")
    known = known_fields(TeacherMetadata)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"unknown keyword arguments {unknown}: the teacher metadata fields are {sorted(known)}.")
    return dataclasses.replace(metadata or TeacherMetadata(), **fields)


def base_model_hub_id(base_model: str | None) -> str | None:
    """The Hub repository of ``base_model`` (a Hub id, ``hf-hub:`` name or timm name), or ``None`` if unknown.

    Example:
        >>> base_model_hub_id("vit_base_patch16_224.augreg_in21k"), base_model_hub_id("hf-hub:me/vit@v1")
        ('timm/vit_base_patch16_224.augreg_in21k', 'me/vit')
        >>> base_model_hub_id(None), base_model_hub_id("no_such_model")
        (None, None)
    """
    if base_model is None:
        return None
    name = re.sub(r"^hf[-_]hub:", "", base_model).split("@")[0]
    if "/" in name:
        return name
    cfg = get_pretrained_cfg(name) if "." in name else None
    return getattr(cfg, "hf_hub_id", None) or None


def initialisation(meta: TeacherMetadata) -> str:
    """How the teacher's weights started, in words: ``fine-tuned from <base>`` or :data:`RANDOM_INIT`."""
    return f"fine-tuned from {meta.base_model}" if meta.base_model else RANDOM_INIT


def remem_block(model: nn.Module, meta: TeacherMetadata, merged: bool) -> dict[str, Any]:
    """The ``remem`` block of ``config.json`` for ``model``, sorted by key.

    Example:
        >>> import timm, timm_remem
        >>> teacher = timm_remem.reweight(timm.create_model("test_vit", pretrained=False), alpha=0.5, top_k=2)
        >>> block = remem_block(teacher, TeacherMetadata(rho=0.1), merged=False)
        >>> block["factors"], block["merged"], block["rho"]
        ([0.5, 0.25], False, 0.1)
    """
    config = get_reweight_config(model)
    block: dict[str, Any] = {"library": "timm-remem", "version": __version__, "reweighted": config is not None}
    if config is not None:  # read from the model's modules at this moment (get_reweight_config checks them)
        block.update({k: v for k, v in config.to_dict().items() if k in REWEIGHT_KEYS})
        if config.folded:  # reweighted again after a merge: what the weights hold in all
            block["total_factors"] = config.total_factors()
    else:
        block.update({k: None for k in ("alpha", "schedule", "top_k", "learnable", "num_blocks")}, factors=[])
    block["merged"] = merged
    block.update(meta.to_dict())
    block["initialisation"] = "pretrained" if meta.base_model else "random"
    return dict(sorted(block.items()))


def reweight_config_from_block(remem: Mapping[str, Any]) -> ReweightConfig | None:
    """The :class:`~timm_remem.ReweightConfig` a ``remem`` block records, or ``None`` for a plain teacher;
    :class:`~timm_remem.errors.CheckpointError` when the block is damaged."""
    if not remem.get("reweighted") or not remem.get("factors"):
        return None
    try:
        return ReweightConfig.from_dict({k: remem[k] for k in (*REWEIGHT_KEYS, "version") if k in remem})
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"the 'remem' block of config.json is invalid ({err}); write it again with "
                              "timm_remem.save_pretrained.") from None


def rewrite_pretrained_cfg(cfg: dict, model: nn.Module, meta: TeacherMetadata, repo_id: str | None) -> None:
    """Replace what the base checkpoint's ``pretrained_cfg`` says about itself with what is true of the teacher.

    Example:
        >>> cfg = {"tag": "augreg_in21k", "license": "mit", "origin_url": "https://example.org"}
        >>> model = type("M", (), {"num_classes": 10})()
        >>> rewrite_pretrained_cfg(cfg, model, TeacherMetadata(dataset="CIFAR-100"), "alice/vit")
        >>> cfg["tag"], cfg["hf_hub_id"], "license" in cfg, "origin_url" in cfg
        ('remem_cifar_100', 'alice/vit', False, False)
    """
    suffix = re.sub(r"[^a-z0-9]+", "_", meta.dataset.lower()).strip("_") if meta.dataset else ""
    cfg["tag"] = f"remem_{suffix}" if suffix else "remem"
    cfg["num_classes"] = model.num_classes
    for key, value in (("license", meta.license), ("hf_hub_id", repo_id)):
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    data = f" on {meta.dataset}" if meta.dataset else ""
    cfg["description"] = (f"ReMem teacher {initialisation(meta)}{data}, prepared for knowledge distillation with "
                          "timm-remem.")
    cfg["paper_name"] = PAPER_TITLE
    cfg["paper_ids"] = f"arXiv:{PAPER_ARXIV}"
    for key in _BASE_WEIGHT_KEYS:
        cfg.pop(key, None)
