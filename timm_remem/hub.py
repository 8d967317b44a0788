"""Publish ReMem teachers on the Hugging Face Hub in timm's format, and load them back.

``save_pretrained`` writes a folder that plain timm loads (``timm.create_model("local-dir:DIR", pretrained=True)``):
``config.json`` (architecture, ``num_classes``, ``model_args``, ``pretrained_cfg`` and a ``remem`` block with the
reweighting and training settings), ``model.safetensors`` and ``README.md``, a model card built with
huggingface_hub's ``ModelCard``. ``push_to_hub`` uploads that folder as one commit, so that anyone loads the teacher
with ``timm.create_model("hf-hub:org/name", pretrained=True)``. ``load_teacher`` loads it back, with the reweighting
wrappers and their exact factors when it was saved with ``merge=False``.

Only safetensors are written or read (never a pickle), keys are checked strictly, and every failure of the Hub
(bad or missing token, foreign namespace, missing repository, revision or file, network) surfaces as one
:class:`~timm_remem.errors.HubError` that says what happened and what to do.

Example:
    >>> import tempfile, timm, torch, timm_remem
    >>> teacher = timm_remem.reweight(timm.create_model("test_vit", pretrained=False, img_size=32), alpha=0.8)
    >>> folder = timm_remem.save_pretrained(teacher, tempfile.mkdtemp(), dataset="cifar100", rho=0.1)
    >>> plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    >>> x = torch.randn(2, 3, 32, 32)
    >>> torch.allclose(plain(x), teacher.eval()(x), atol=1e-5)
    True
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, HubError, RememError, UnsupportedModelError
from .reweighting import ReweightConfig, ScaledBranch, get_reweight_config, get_scales, is_reweighted, reweight
from .reweighting import merge as merge_factors

__all__ = ["TeacherMetadata", "save_pretrained", "push_to_hub", "load_teacher"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
PAPER_TITLE = (
    "ReMem: Mutual Information-Aware Fine-tuning of Pretrained Vision Transformers for Effective Knowledge Distillation"
)
PAPER_ARXIV = "2506.23041"
CARD_TAGS = ("remem", "knowledge-distillation", "image-classification", "timm")
_CITATION = f"""@article{{dong2025remem,
  title   = {{{PAPER_TITLE}}},
  author  = {{Dong and others}},
  journal = {{arXiv preprint arXiv:{PAPER_ARXIV}}},
  year    = {{2025}}
}}"""
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
# ReweightConfig fields written flat into the ``remem`` block of config.json.
_REWEIGHT_KEYS = tuple(f.name for f in dataclasses.fields(ReweightConfig) if f.name != "version")


# --------------------------------------------------------------------------------------------------------------
# Metadata


@dataclass
class TeacherMetadata:
    """How a teacher was made, recorded in ``config.json`` and shown on the model card.

    Every field is optional; pass them to :func:`save_pretrained` / :func:`push_to_hub` as keyword arguments or
    as one ``metadata=TeacherMetadata(...)``.

    Attributes:
        base_model: Hub id of the pretrained checkpoint the teacher was fine-tuned from (default: the
            ``hf_hub_id`` in the model's ``pretrained_cfg``).
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
            if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not (
                math.isfinite(self.rho) and self.rho >= 0
            ):
                raise ConfigError(f"rho must be a finite number >= 0 (the SAM radius, e.g. 0.05), got {self.rho!r}.")
            self.rho = float(self.rho)
        if self.adaptive is not None and not isinstance(self.adaptive, bool):
            raise ConfigError(f"adaptive must be True, False or None, got {self.adaptive!r}.")
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, int)
                                        or self.epochs < 0):
            raise ConfigError(f"epochs must be an int >= 0, got {self.epochs!r}.")
        if not isinstance(self.student_accuracies, Mapping):
            raise ConfigError(
                f"student_accuracies must be a dict {{student model: top-1 %}}, got {self.student_accuracies!r}."
            )
        self.student_accuracies = dict(self.student_accuracies)
        if self.teacher_accuracy is not None:
            self.teacher_accuracy = _accuracy("teacher_accuracy", self.teacher_accuracy)
        for student, acc in self.student_accuracies.items():
            self.student_accuracies[student] = _accuracy(f"student_accuracies[{student!r}]", acc)
        if (self.teacher_accuracy is not None or self.student_accuracies) and self.dataset is None:
            raise ConfigError("accuracies need the dataset they were measured on: pass dataset='...' too.")

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict with sorted keys."""
        return dict(sorted(dataclasses.asdict(self).items()))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TeacherMetadata:
        """Build metadata from a dict, dropping unknown keys with a warning (newer versions may add keys)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"TeacherMetadata: ignoring unknown keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known and v is not None})


def _accuracy(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise ConfigError(f"{name} must be a top-1 accuracy in percent, between 0 and 100, got {value!r}.")
    return float(value)


def _metadata(metadata: TeacherMetadata | None, fields: dict[str, Any]) -> TeacherMetadata:
    if metadata is not None and not isinstance(metadata, TeacherMetadata):
        raise ConfigError(f"metadata must be a TeacherMetadata, got {type(metadata).__name__}.")
    known = {f.name for f in dataclasses.fields(TeacherMetadata)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"unknown keyword arguments {unknown}: the teacher metadata fields are {sorted(known)}.")
    return dataclasses.replace(metadata or TeacherMetadata(), **fields)


# --------------------------------------------------------------------------------------------------------------
# Saving


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    merge: bool = True,
    metadata: TeacherMetadata | None = None,
    repo_id: str | None = None,
    data_config: dict[str, Any] | None = None,
    **fields: Any,
) -> Path:
    """Write a teacher to ``path`` in timm's Hugging Face format, with a ReMem model card.

    The folder holds ``config.json``, ``model.safetensors`` and ``README.md``. With ``merge=True`` (the default)
    the reweighting factors are folded into a copy of the weights (``model`` is not changed): the folder is a plain
    timm checkpoint that ``timm.create_model("local-dir:DIR", pretrained=True)`` loads and that reproduces the
    teacher's outputs. With ``merge=False`` the wrappers' factors are saved as ``...remem_scale`` tensors (e.g. to
    keep learnable factors for further fine-tuning); :func:`load_teacher` restores them exactly.

    ``pretrained_cfg`` fields inherited from the base checkpoint that would be false for the teacher are rewritten:
    ``tag``, ``license``, ``num_classes``, ``hf_hub_id`` (``repo_id``), description and paper; the input size is
    the model's current one.

    Args:
        model: A timm model, reweighted (see :func:`timm_remem.reweight`) or not.
        path: Folder to write (created if needed; existing files of the same names are replaced).
        merge: Fold the factors into the weights (plain timm checkpoint) or keep them separate.
        metadata: Training metadata; the keyword ``fields`` override its values.
        repo_id: Hub id the folder is meant for (``"namespace/name"``), recorded as ``hf_hub_id``.
        data_config: Preprocessing to record (``input_size``, ``crop_pct``, ``interpolation``, ``mean``,
            ``std``...), as accepted by ``timm.models.save_for_hf`` (default: the model's current input size).
        **fields: :class:`TeacherMetadata` fields (``base_model``, ``dataset``, ``rho``, ``adaptive``,
            ``epochs``, ``teacher_accuracy``, ``student_accuracies``, ``license``).

    Returns:
        The folder written.

    Raises:
        ConfigError: Unknown or invalid metadata, or a malformed ``repo_id``.
        UnsupportedModelError: ``model`` is not a timm model.

    Example:
        >>> import tempfile, json, timm, timm_remem
        >>> teacher = timm_remem.reweight(timm.create_model("test_vit", pretrained=False, img_size=32), alpha=0.8)
        >>> folder = timm_remem.save_pretrained(teacher, tempfile.mkdtemp(), merge=False, rho=0.1)
        >>> remem = json.loads((folder / "config.json").read_text())["remem"]
        >>> remem["alpha"], remem["merged"], remem["rho"]
        (0.8, False, 0.1)
    """
    meta = _metadata(metadata, fields)
    if repo_id is not None:
        _check_repo_id(repo_id)
    _check_timm_model(model)
    from timm.models import get_model_input_config, save_for_hf

    if meta.base_model is None:
        inherited = (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id")
        if inherited and inherited.split("@")[0] != repo_id:
            meta = dataclasses.replace(meta, base_model=inherited.split("@")[0])
    wrapped = is_reweighted(model)
    config = get_reweight_config(model)
    remem = _remem_block(model, config, meta, merged=merge or not wrapped)
    scales = get_scales(model) if wrapped else {}
    weights = merge_factors(copy.deepcopy(model)) if merge and wrapped else model

    folder = Path(path)
    if data_config is None:
        data_config = {"input_size": tuple(get_model_input_config(model)["input_size"])}
    save_for_hf(weights, str(folder), model_config={"remem": remem}, safe_serialization=True,
                data_config=data_config)
    config_file = folder / CONFIG_NAME
    hf_config = json.loads(config_file.read_text(encoding="utf-8"))
    _rewrite_pretrained_cfg(hf_config["pretrained_cfg"], model, meta, repo_id)
    config_file.write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    card = _model_card(hf_config, remem, meta, scales, repo_id)
    card.save(folder / CARD_NAME)
    return folder


def _check_timm_model(model: Any) -> None:
    if not isinstance(model, nn.Module) or not isinstance(getattr(model, "pretrained_cfg", None), Mapping):
        raise UnsupportedModelError(
            f"expected a timm model (built by timm.create_model, which sets .pretrained_cfg), got "
            f"{type(model).__name__}: only timm models can be saved in timm's Hub format."
        )


def _check_repo_id(repo_id: Any) -> None:
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id:
        raise ConfigError(
            f"repo_id must be 'namespace/name' (your user or organisation, then the model name, letters, digits, "
            f"'-', '_' and '.'), got {repo_id!r}."
        )


def _live_factors(model: nn.Module) -> list[float]:
    """Current factor of each reweighted block, bottom-up (learnable factors may have moved since reweight)."""
    by_index = {w.index: float(w.remem_scale.detach()) for w in model.modules() if isinstance(w, ScaledBranch)}
    return [by_index[i] for i in sorted(by_index)]


def _remem_block(model: nn.Module, config: ReweightConfig | None, meta: TeacherMetadata, merged: bool) -> dict:
    from . import __version__

    block: dict[str, Any] = {"library": "timm-remem", "version": __version__, "reweighted": config is not None}
    if config is not None:
        block.update({k: v for k, v in config.to_dict().items() if k in _REWEIGHT_KEYS})
        if is_reweighted(model):
            block["factors"] = _live_factors(model)
    else:
        block.update({k: None for k in ("alpha", "schedule", "top_k", "learnable", "num_blocks")}, factors=[])
    block["merged"] = merged
    block.update(meta.to_dict())
    return dict(sorted(block.items()))


def _rewrite_pretrained_cfg(cfg: dict, model: nn.Module, meta: TeacherMetadata, repo_id: str | None) -> None:
    """Replace what the base checkpoint's pretrained_cfg says about itself with what is true of the teacher."""
    suffix = re.sub(r"[^a-z0-9]+", "_", meta.dataset.lower()).strip("_") if meta.dataset else ""
    cfg["tag"] = f"remem_{suffix}" if suffix else "remem"
    cfg["num_classes"] = model.num_classes
    for key, value in (("license", meta.license), ("hf_hub_id", repo_id)):
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    base = f" fine-tuned from {meta.base_model}" if meta.base_model else ""
    data = f" on {meta.dataset}" if meta.dataset else ""
    cfg["description"] = f"ReMem teacher{base}{data}, prepared for knowledge distillation with timm-remem."
    cfg["paper_name"] = PAPER_TITLE
    cfg["paper_ids"] = f"arXiv:{PAPER_ARXIV}"
    for key in ("origin_url", "notes"):
        cfg.pop(key, None)


# --------------------------------------------------------------------------------------------------------------
# Model card


def _model_card(hf_config: dict, remem: dict, meta: TeacherMetadata, scales: dict[str, float], repo_id: str | None):
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    arch = hf_config["architecture"]
    name = repo_id.split("/")[1] if repo_id else f"{arch}-remem"
    results = []
    if meta.teacher_accuracy is not None:
        results.append(EvalResult(task_type="image-classification", dataset_type=meta.dataset,
                                  dataset_name=meta.dataset, metric_type="accuracy",
                                  metric_value=meta.teacher_accuracy, metric_name="Top-1 accuracy (%)"))
    for student, acc in sorted(meta.student_accuracies.items()):
        results.append(EvalResult(task_type="image-classification", dataset_type=meta.dataset,
                                  dataset_name=meta.dataset, metric_type="accuracy", metric_value=acc,
                                  metric_name=f"Top-1 accuracy (%) of a {student} student distilled from it"))
    data = ModelCardData(
        library_name="timm", pipeline_tag="image-classification", tags=list(CARD_TAGS), model_name=name,
        base_model=meta.base_model, datasets=[meta.dataset] if meta.dataset else None, license=meta.license,
        eval_results=results or None,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{_card_body(hf_config, remem, meta, scales, repo_id, name)}")


def _card_body(hf_config: dict, remem: dict, meta: TeacherMetadata, scales: dict[str, float],
               repo_id: str | None, name: str) -> str:
    arch = hf_config["architecture"]
    hub_name = repo_id or "<namespace>/<name>"
    base = f", fine-tuned from [{meta.base_model}](https://huggingface.co/{meta.base_model})" if meta.base_model else ""
    data = f" on `{meta.dataset}`" if meta.dataset else ""
    lines = [
        f"# {name}",
        "",
        f"A ReMem teacher: timm `{arch}` ({hf_config['num_classes']} classes){base}{data}, prepared for knowledge "
        "distillation into a small student with [timm-remem](https://pypi.org/project/timm-remem/).",
        "",
        f"[ReMem](https://arxiv.org/abs/{PAPER_ARXIV}) makes strong pretrained ViTs better teachers: fine-tuning with "
        "sharpness-aware minimisation (SAM) at a large radius, and down-weighting the MLP residual branches of the "
        "top blocks, both raise the mutual information between the input and the teacher's outputs, which gives "
        "better students.",
        "",
        "## How to use",
        "",
    ]
    if remem["merged"]:
        lines += [
            "The ReMem factors are folded into the weights: this is a plain timm checkpoint, no extra package needed.",
            "",
            "```python",
            "import timm",
            "",
            f'teacher = timm.create_model("hf-hub:{hub_name}", pretrained=True).eval()',
            "data_config = timm.data.resolve_model_data_config(teacher)",
            "transform = timm.data.create_transform(**data_config, is_training=False)",
            "```",
        ]
    else:
        lines += [
            "The ReMem factors are kept as separate (possibly learnable) `remem_scale` tensors, e.g. to continue "
            "fine-tuning: load it with timm-remem, which rebuilds the reweighted model exactly.",
            "",
            "```python",
            "import timm, timm_remem",
            "",
            f'teacher = timm_remem.load_teacher("hf-hub:{hub_name}")',
            f'plain = timm_remem.load_teacher("hf-hub:{hub_name}", merge=True)  # factors folded: a plain timm model',
            "data_config = timm.data.resolve_model_data_config(teacher)",
            "```",
        ]

    def show(value: Any) -> str:
        if value is None:
            return "not recorded"
        if isinstance(value, bool):
            return "yes" if value else "no"
        return f"{value:g}" if isinstance(value, float) else str(value)

    def code(value: str | None) -> str | None:
        return None if value is None else f"`{value}`"

    rows = [
        ("Base model", code(meta.base_model)),
        ("Fine-tuning dataset", code(meta.dataset)),
        ("SAM radius rho", meta.rho),
        ("Adaptive SAM", meta.adaptive),
        ("Epochs", meta.epochs),
        ("MLP reweighting", remem["reweighted"]),
    ]
    if remem["reweighted"]:
        rows += [
            ("MLP weight alpha", remem.get("alpha")),
            ("Schedule", code(remem.get("schedule"))),
            ("Reweighted blocks", f"top {remem['top_k']}" if remem.get("top_k") else "all"),
            ("Learnable factors", remem.get("learnable")),
            ("Factors folded into the weights", remem["merged"]),
        ]
    rows.append(("timm-remem version", code(remem["version"])))
    lines += ["", "## ReMem settings", "", "| Setting | Value |", "|---|---|"]
    lines += [f"| {key} | {show(value)} |" for key, value in rows]
    factors = remem.get("factors") or []
    if factors:
        lines += ["", "Factor of each reweighted MLP branch, bottom-up:", "", "| Block | Branch | Factor |",
                  "|---|---|---|"]
        first = (remem.get("num_blocks") or len(factors)) - len(factors)
        paths = list(dict.fromkeys(scales)) if len(scales) == len(factors) else [""] * len(factors)
        lines += [f"| {first + i} | {f'`{p}`' if p else ''} | {f:.6g} |"
                  for i, (p, f) in enumerate(zip(paths, factors, strict=True))]
    if meta.teacher_accuracy is not None or meta.student_accuracies:
        lines += ["", "## Evaluation", "", f"Top-1 accuracy (%) on `{meta.dataset}`.", "", "| Model | Top-1 (%) |",
                  "|---|---|"]
        if meta.teacher_accuracy is not None:
            lines.append(f"| this teacher | {meta.teacher_accuracy:g} |")
        lines += [f"| `{s}` student distilled from it | {a:g} |" for s, a in sorted(meta.student_accuracies.items())]
    lines += ["", "## Citation", "", "```bibtex", _CITATION, "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Pushing


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    merge: bool = True,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    metadata: TeacherMetadata | None = None,
    data_config: dict[str, Any] | None = None,
    **fields: Any,
) -> str:
    """Publish a teacher on the Hugging Face Hub, loadable with ``timm.create_model("hf-hub:<repo_id>")``.

    Creates the repository if needed (``private`` applies only then) and the branch ``revision`` if it does not
    exist, writes the folder of :func:`save_pretrained` to a temporary directory and uploads it as one commit: an
    interrupted push publishes nothing, the branch shows either the previous revision or the complete new one.

    Args:
        model: The teacher (see :func:`save_pretrained` for ``merge``, ``metadata``, ``data_config``, ``fields``).
        repo_id: ``"namespace/name"``: your user name or an organisation where you may write.
        merge: Fold the factors into the weights (loadable by plain timm) or keep them (timm-remem only).
        private: Create the repository private.
        token: Hugging Face token with the write role (default: ``HF_TOKEN`` or the token of ``hf auth login``).
        revision: Branch to commit to (default ``main``); created from ``main`` when missing.
        commit_message: Commit title (default: ``"Upload ReMem teacher <architecture>"``).
        metadata: Training metadata, see :class:`TeacherMetadata`.
        data_config: Preprocessing to record, see :func:`save_pretrained`.
        **fields: :class:`TeacherMetadata` fields.

    Returns:
        The URL of the commit.

    Raises:
        HubError: No token, a token the Hub rejects or that cannot write to ``repo_id``'s namespace, or the Hub
            cannot be reached.
        ConfigError: Malformed ``repo_id`` or metadata.

    Example:
        >>> url = timm_remem.push_to_hub(teacher, "me/vit-b-remem-cifar100", dataset="cifar100")  # doctest: +SKIP
        >>> timm.create_model("hf-hub:me/vit-b-remem-cifar100", pretrained=True)  # doctest: +SKIP
    """
    _check_repo_id(repo_id)
    from huggingface_hub import HfApi, get_token

    from . import __version__

    token = token or get_token()
    if not token:
        raise HubError(
            f"pushing to {repo_id!r} needs a Hugging Face token with the write role: pass token=..., set the "
            "HF_TOKEN environment variable or run `hf auth login`."
        )
    with tempfile.TemporaryDirectory(prefix="timm-remem-push-") as folder:
        save_pretrained(model, folder, merge=merge, metadata=metadata, repo_id=repo_id, data_config=data_config,
                        **fields)
        message = commit_message or f"Upload ReMem teacher {model.pretrained_cfg.get('architecture') or ''}".strip()
        api = HfApi(token=token, library_name="timm-remem", library_version=__version__)
        with _hub_errors("push to", repo_id, revision, api.endpoint, pushing=True):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message, revision=revision)
    return info.commit_url


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_teacher(
    name_or_path: str | os.PathLike,
    *,
    merge: bool = False,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """Load a teacher written by :func:`save_pretrained` / :func:`push_to_hub` (or any timm Hub-format model).

    Accepts ``"hf-hub:namespace/name"`` (optionally ``@revision``), ``"local-dir:DIR"`` or a folder. The model is
    built from ``config.json`` (architecture, ``model_args``, ``pretrained_cfg``) and the weights are read from
    ``model.safetensors`` only (never a pickle), with a strict key check. A teacher saved with ``merge=False`` comes
    back reweighted, with its exact factors (learnable ones stay learnable), unless ``merge=True`` folds them. For a
    merged teacher, :func:`timm_remem.get_reweight_config` still reports its settings (``merged=True``).

    Args:
        name_or_path: Where the teacher is.
        merge: Fold kept factors into the weights and return a plain timm model.
        revision: Branch, tag or commit for ``hf-hub:`` (same as ``@revision`` in the name).
        token: Token for private repositories (default: ``HF_TOKEN`` or the stored login).
        cache_dir: Hub cache folder (default: huggingface_hub's). With ``HF_HUB_OFFLINE=1`` cached files are used.
        **model_kwargs: Passed to ``timm.create_model`` (e.g. ``drop_path_rate``).

    Returns:
        The teacher in eval mode, with ``pretrained_cfg`` describing its preprocessing.

    Raises:
        ConfigError: ``name_or_path`` is not one of the accepted forms.
        HubError: The repository, revision or ``config.json`` cannot be fetched (with the reason).
        CheckpointError: ``model.safetensors`` is missing or unreadable, or its keys or shapes do not match.

    Example:
        >>> import tempfile, timm, timm_remem
        >>> teacher = timm_remem.reweight(timm.create_model("test_vit", pretrained=False, img_size=32), alpha=0.8)
        >>> folder = timm_remem.save_pretrained(teacher, tempfile.mkdtemp(), merge=False)
        >>> timm_remem.get_scales(timm_remem.load_teacher(folder)) == timm_remem.get_scales(teacher)
        True
    """
    import timm

    folder, repo_id, revision = _fetch(name_or_path, revision, token, cache_dir)
    hf_config = _read_config(folder / CONFIG_NAME)
    remem = hf_config.get("remem") or {}
    model = timm.create_model(f"local-dir:{folder}", pretrained=False, **model_kwargs)
    saved = _reweight_config(remem)
    if saved is not None and not remem.get("merged", True):
        top = saved.factors
        reweight(model, schedule=top, top_k=len(top) if saved.top_k is not None else None, learnable=saved.learnable)
    _load_weights(model, folder / WEIGHTS_NAME, name_or_path)
    if saved is not None:
        model.remem_config = saved  # the settings as saved (reweight above recorded a "custom" schedule)
        if is_reweighted(model) and merge:
            merge_factors(model)
        saved.merged = not is_reweighted(model)
    cfg = model.pretrained_cfg
    if repo_id is not None:
        cfg.pop("file", None)
        cfg.update(hf_hub_id=repo_id if revision is None else f"{repo_id}@{revision}", source="hf-hub")
    return model.eval()


def _fetch(name_or_path: Any, revision: str | None, token: str | None,
           cache_dir: Any) -> tuple[Path, str | None, str | None]:
    """Local folder holding config.json and model.safetensors, plus the repo id and revision for hf-hub sources."""
    text = os.fspath(name_or_path) if isinstance(name_or_path, (str, os.PathLike)) else None
    if text is None:
        raise ConfigError(f"name_or_path must be a string or a path, got {type(name_or_path).__name__}.")
    if text.startswith(("hf-hub:", "hf_hub:")):
        repo_id, _, at = text.split(":", 1)[1].partition("@")
        if at and revision is not None and at != revision:
            raise ConfigError(f"two revisions given: {at!r} in {text!r} and revision={revision!r}; keep one.")
        revision = revision or at or None
        _check_repo_id(repo_id)
        return _download(repo_id, revision, token, cache_dir), repo_id, revision
    folder = Path(text[len("local-dir:"):] if text.startswith("local-dir:") else text).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"{text!r} is not an existing folder: give a folder written by save_pretrained, 'local-dir:DIR', or "
            "'hf-hub:namespace/name' for the Hugging Face Hub."
        )
    for required in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / required).is_file():
            error = HubError if required == CONFIG_NAME else CheckpointError
            raise error(
                f"{str(folder / required)!r} is missing: a teacher folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                "(timm-remem reads safetensors only, never pickle files); write it with timm_remem.save_pretrained."
            )
    return folder, None, None


def _download(repo_id: str, revision: str | None, token: str | None, cache_dir: Any) -> Path:
    from huggingface_hub import constants, hf_hub_download

    from . import __version__

    paths = {}
    with _hub_errors("download", repo_id, revision, constants.ENDPOINT):
        for filename in (CONFIG_NAME, WEIGHTS_NAME):
            try:
                paths[filename] = Path(hf_hub_download(
                    repo_id, filename, revision=revision, token=token, cache_dir=cache_dir,
                    library_name="timm-remem", library_version=__version__,
                ))
            except Exception as err:
                if filename == WEIGHTS_NAME and _find(err, "RemoteEntryNotFoundError", "EntryNotFoundError"):
                    raise CheckpointError(
                        f"the Hub repository {repo_id!r} has no {WEIGHTS_NAME}: timm-remem loads safetensors "
                        "weights only (never pickle files such as pytorch_model.bin); re-publish it with "
                        "timm_remem.push_to_hub."
                    ) from None
                raise
    folder = paths[CONFIG_NAME].parent
    if paths[WEIGHTS_NAME].parent != folder:  # both come from one snapshot of the cache
        raise CheckpointError(f"{CONFIG_NAME} and {WEIGHTS_NAME} of {repo_id!r} resolved to different revisions; "
                              "pass an explicit revision (a commit id).")
    return folder


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{str(path)!r} is not readable JSON ({err}): the download is corrupt or the file "
                              "was edited; write it again with timm_remem.save_pretrained.") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise CheckpointError(f"{str(path)!r} has no 'architecture': it is not a timm model config.")
    return config


def _reweight_config(remem: Mapping[str, Any]) -> ReweightConfig | None:
    if not remem.get("reweighted") or not remem.get("factors"):
        return None
    try:
        return ReweightConfig.from_dict({k: remem[k] for k in (*_REWEIGHT_KEYS, "version") if k in remem})
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"the 'remem' block of config.json is invalid ({err}); write it again with "
                              "timm_remem.save_pretrained.") from None


def _load_weights(model: nn.Module, path: Path, source: Any) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{str(path)!r} is unreadable ({err}): it is corrupt or truncated; download or save "
                              "it again.") from None
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = [f"{label} {items}" for label, items in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if items]
        raise CheckpointError(
            f"the weights of {os.fspath(source)!r} do not match the {model.pretrained_cfg.get('architecture')} that "
            f"its config.json describes: {'; '.join(problems)}. The files come from different models or were "
            "edited (or model_kwargs changed the architecture); save the teacher again with "
            "timm_remem.save_pretrained."
        )
    with torch.no_grad():
        model.load_state_dict(tensors, strict=True)


# --------------------------------------------------------------------------------------------------------------
# Hub errors


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from (``__cause__``, else ``__context__``), outermost first."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _find(err: BaseException, *names: str) -> BaseException | None:
    """The first exception in ``err``'s chain whose class (or a base class) is named one of ``names``."""
    return next((e for e in _chain(err) if any(cls.__name__ in names for cls in type(e).__mro__)), None)


def _is_network_error(err: BaseException) -> BaseException | None:
    """The first exception in ``err``'s chain raised by the HTTP stack for a connection problem."""
    clients = ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3")
    return next((e for e in _chain(err) if (type(e).__module__ or "").split(".")[0] in clients
                 or isinstance(e, (ConnectionError, TimeoutError))), None)


@contextmanager
def _hub_errors(action: str, repo_id: str, revision: str | None, endpoint: str, pushing: bool = False) -> Iterator:
    """Turn the errors of huggingface_hub and its HTTP client into one :class:`HubError` with a clear message."""
    try:
        yield
    except RememError:
        raise
    except Exception as err:
        message = _explain(err, action, repo_id, revision, endpoint, pushing)
        if message is None:
            raise
        raise HubError(message) from None


def _explain(err: Exception, action: str, repo_id: str, revision: str | None, endpoint: str,
             pushing: bool) -> str | None:
    where = f"{repo_id!r} on {endpoint}"
    token_help = "pass token=..., set the HF_TOKEN environment variable or run `hf auth login`"
    undone = (" The push did not complete; it is a single commit, so the repository shows the previous revision "
              "(or the complete new one if the Hub applied it just before the failure): run it again.") if pushing \
        else ""
    if _find(err, "OfflineModeIsEnabled") and pushing:
        return f"cannot {action} {where}: offline mode is on (HF_HUB_OFFLINE=1); unset it to reach the Hub."
    if _find(err, "LocalTokenNotFoundError"):
        return f"cannot {action} {where} without a token: {token_help}."
    http = _find(err, "HfHubHTTPError")
    status = getattr(getattr(http, "response", None), "status_code", None)
    server = (getattr(http, "server_message", None) or "").strip()
    server = f" (the Hub said: {server})" if server else ""
    if _find(err, "RevisionNotFoundError"):
        return (f"revision {revision or 'main'!r} does not exist in {where}: check the branch, tag or commit id "
                "(list them with huggingface_hub.HfApi().list_repo_refs).")
    if _find(err, "RepositoryNotFoundError", "GatedRepoError"):
        return (f"repository {where} was not found, or it is private and "
                + ("no token was sent" if status == 401 else "your token cannot see it")
                + f": check the name; for a private repository {token_help} with access to it.")
    if _find(err, "RemoteEntryNotFoundError", "EntryNotFoundError") and not _find(err, "LocalEntryNotFoundError"):
        return (f"{where} has no {CONFIG_NAME}: it is not a timm model repository (publish teachers with "
                "timm_remem.push_to_hub).")
    if status == 401:
        return f"the Hub rejected the token (401 Unauthorized) for {where}: it is invalid, expired or revoked; " \
               f"{token_help} with a valid token.{server}"
    if status == 403:
        namespace = repo_id.split("/")[0]
        return (f"the Hub refused to let your token {action} {where} (403 Forbidden): it has no write access to the "
                f"namespace {namespace!r} (another user's namespace, or a token with the read role). Push to your own "
                f"namespace or an organisation where you may write, with a token that has the write role.{server}")
    if _find(err, "LocalEntryNotFoundError"):
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return (f"{repo_id!r} is not in the local Hub cache and offline mode is on (HF_HUB_OFFLINE=1): download "
                    "it once online (or point cache_dir at a cache that has it).")
        return (f"cannot reach the Hub at {endpoint} to download {repo_id!r}, and it is not in the local cache: "
                "check the network connection, HF_ENDPOINT and proxy settings, or set HF_HUB_OFFLINE=1 to use a "
                "cached copy.")
    if pushing and any("xet-write-token" in str(e) for e in _chain(err)):
        return (f"cannot {action} {where}: the server offers no Xet storage (its xet-write-token route answered "
                "404). For a Hub-compatible server without Xet, set HF_HUB_DISABLE_XET=1 in the environment before "
                "Python starts (huggingface_hub reads it at import) so that uploads use plain git-LFS.")
    network = _is_network_error(err)
    if network is not None:
        return (f"cannot {action} {where}: the connection to the Hub failed ({type(network).__name__}: "
                f"{network}). Check the network connection, HF_ENDPOINT and proxy settings.{undone}")
    if http is not None and status is not None:
        return f"the Hub answered {status} when trying to {action} {where}.{server}{undone}"
    return None
