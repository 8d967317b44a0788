"""How much a teacher's outputs say about its inputs: I(X; F_T), I(F_T; Y), I(X; F_T | Y), the information plane,
and a checkpoint ranking built on them.

A deterministic network's I(X; F) is infinite for continuous F, so every quantity is measured through a noise
channel ``T = F + noise * s * Z`` (``s`` the RMS standard deviation of F's dimensions), in nats. Definitions:
docs/analysis.md, "Mutual information of a teacher".
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._models import data_config
from .._serialization import dataclass_to_dict
from .._validation import check_choice, check_float, check_int
from ..errors import ConfigError
from ..teachers import list_exports, load_teacher_model
from ._common import _check_max_samples, _hard_labels, _input_device, _progress, _Renormalised, _split_batch
from .mi import MI_METHODS, estimate_mi

__all__ = [
    "CheckpointScore",
    "TeacherInformation",
    "information_from_features",
    "information_plane",
    "rank_checkpoints",
    "teacher_information",
]

FEATURES = ("logits", "pre_logits")
_CONDITIONAL = ("chain", "classwise")
SCORES = ("combined", "mi", "conditional_mi", "accuracy")


@dataclass
class TeacherInformation:
    """Information measurements of one teacher (nats) and its accuracy on the same samples.

    Attributes:
        i_xf: ``I(X; T)``, T the noisy target.
        i_fy: ``I(T; Y)``; ``None`` without labels (as ``i_xf_given_y``, ``accuracy`` and ``h_y``).
        i_xf_given_y: ``I(X; T | Y)``.
        accuracy: Top-1 accuracy of the logits against the labels.
        h_y: Plug-in entropy of the labels, ``H(Y)`` (the ceiling of ``I(T; Y)``).
        dim: Dimension of the features after compression.
        name: Checkpoint name, when measured from a list of checkpoints.
    """

    i_xf: float
    i_fy: float | None
    i_xf_given_y: float | None
    accuracy: float | None
    h_y: float | None
    n: int
    dim: int
    features: str
    method: str
    noise: float
    conditional: str
    name: str | None = None

    @property
    def error(self) -> float | None:
        """Teacher error ``1 - accuracy`` (``None`` without labels)."""
        return None if self.accuracy is None else 1.0 - self.accuracy

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dictionary (adds ``error``)."""
        return dataclass_to_dict(self) | {"error": self.error}


@dataclass
class CheckpointScore:
    """One checkpoint's place in :func:`rank_checkpoints` (rank 1 = best)."""

    name: str
    score: float
    rank: int
    info: TeacherInformation
    components: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dictionary."""
        return {
            "name": self.name,
            "score": self.score,
            "rank": self.rank,
            "components": dict(self.components),
            "info": self.info.to_dict(),
        }


@torch.no_grad()
def _collect(
    model: nn.Module,
    loader: Iterable[Any],
    features: str,
    *,
    max_samples: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(features [n, d], labels [n] or None, correct [n] or None)`` of the model in eval mode over the loader."""
    check_choice("features", features, FEATURES)
    _check_max_samples(max_samples)
    use_head = callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))
    if features == "pre_logits" and not use_head:
        raise ConfigError(
            f"features='pre_logits' needs a timm model with forward_features/forward_head, got "
            f"{type(model).__name__}; use features='logits'."
        )
    device = _input_device(model, device)
    was_training = model.training
    model.eval()
    feats, labels, correct = [], [], []
    n = 0
    try:
        for batch in _progress(loader, progress, "teacher"):
            images, y = _split_batch(batch)
            images = images.to(device)
            if use_head:
                pooled = model.forward_features(images)
                logits = model.forward_head(pooled)
                f = model.forward_head(pooled, pre_logits=True) if features == "pre_logits" else logits
            else:
                logits = f = model(images)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise ConfigError(
                    f"the model must return logits of shape [B, classes], got "
                    f"{getattr(logits, 'shape', type(logits).__name__)}."
                )
            f = f.flatten(1).float().cpu()
            take = f.shape[0] if max_samples is None else min(f.shape[0], max_samples - n)
            feats.append(f[:take])
            if y is not None:
                y = _hard_labels(y.cpu()).long().view(-1)[:take]
                labels.append(y)
                correct.append(logits.argmax(-1).cpu()[:take] == y)
            n += take
            if max_samples is not None and n >= max_samples:
                break
    finally:
        model.train(was_training)
    if n == 0:
        raise ConfigError("the loader yielded no samples; pass a non-empty loader.")
    if labels and len(labels) != len(feats):
        raise ConfigError("some loader batches carry labels and others do not; make every batch (images, labels).")
    return torch.cat(feats), (torch.cat(labels) if labels else None), (torch.cat(correct) if correct else None)


def _checkpoint_items(checkpoints: Any) -> list[tuple[str, Any]]:
    """``[(name, spec)]`` from a mapping, a sequence of modules/paths, or one folder of checkpoint folders."""
    if isinstance(checkpoints, nn.Module):
        items = [("checkpoint_0", checkpoints)]
    elif isinstance(checkpoints, Mapping):
        items = [(str(k), v) for k, v in checkpoints.items()]
    elif isinstance(checkpoints, (str, os.PathLike)):
        items = [(p.name, p) for p in list_exports(checkpoints)]
    elif isinstance(checkpoints, Iterable):
        items = [((Path(c).name or str(c)) if isinstance(c, (str, os.PathLike)) else f"checkpoint_{i}", c)
                 for i, c in enumerate(checkpoints)]
    else:
        raise ConfigError(f"checkpoints must be a list, a dict name -> checkpoint or a folder, got {checkpoints!r}.")
    if not items:
        raise ConfigError("no checkpoints given; pass at least one model or checkpoint folder.")
    return items


def _compress(f: torch.Tensor, max_dim: int | None) -> torch.Tensor:
    """Project ``[n, d]`` features on their top ``max_dim`` principal components (no-op when ``d <= max_dim``)."""
    if max_dim is None or f.shape[1] <= max_dim:
        return f
    fc = f.double() - f.double().mean(0)
    _, _, vh = torch.linalg.svd(fc, full_matrices=False)
    return (fc @ vh[:max_dim].T).float()


def _noise_channel(f: torch.Tensor, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F, T = F + noise * s * Z)``, ``s`` the RMS of the per-dimension standard deviations of ``F``."""
    f = f.double()
    s = math.sqrt(float(f.var(0, unbiased=False).mean()))
    if s == 0.0:
        s = 1.0  # constant features: any scale gives I = 0
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(f.shape, generator=gen, dtype=torch.float64)
    return f, f + noise * s * z


def information_from_features(
    features: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    method: str = "gaussian",
    noise: float = 0.1,
    conditional: str = "chain",
    max_dim: int | None = None,
    seed: int = 0,
    **mi_options: Any,
) -> dict[str, float | None]:
    """``I(X; T)``, ``I(T; Y)`` and ``I(X; T | Y)`` from features already computed (arguments as
    :func:`teacher_information`).

    Args:
        features: ``[n, d]`` deterministic features ``F`` of ``n`` inputs.
        labels: ``[n]`` integer labels, or ``None`` (then only ``i_xf`` is computed).

    Returns:
        ``{"i_xf", "i_fy", "i_xf_given_y", "h_y", "dim"}`` in nats (``None`` entries without labels).

    Example:
        >>> import torch
        >>> f = torch.randn(500, 2)
        >>> out = information_from_features(f, noise=1.0)      # Gaussian F, noise of equal variance
        >>> abs(out["i_xf"] - 2 * 0.5 * torch.log(torch.tensor(2.0)).item()) < 0.1   # 0.5 log(1 + 1) per dim
        True
    """
    if method not in MI_METHODS:
        raise ConfigError(f"unknown MI method {method!r}; choose one of {list(MI_METHODS)}.")
    check_choice("conditional", conditional, _CONDITIONAL)
    check_float("noise", noise, low=0, low_open=True, hint=(
        "without noise I(X; F) of a deterministic network is infinite for continuous F. Use e.g. noise=0.1 (10% of "
        "the feature standard deviation)."))
    check_int("max_dim", max_dim, low=1, allow_none=True, hint="None keeps every dimension")
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise ConfigError(
            f"features must be a float tensor [n, d], got "
            f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}."
        )
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != features.shape[0]):
        raise ConfigError(
            f"labels must have shape [{features.shape[0]}] (one per feature row), got {tuple(labels.shape)}."
        )
    if not bool(torch.isfinite(features).all()):
        raise ConfigError("features contain NaN or inf; check the model (fp16 overflow?) before measuring MI.")
    f = _compress(features, max_dim)
    f, t = _noise_channel(f, float(noise), seed)
    i_xf = estimate_mi(f, t, method=method, **mi_options)
    out: dict[str, float | None] = {"i_xf": i_xf, "i_fy": None, "i_xf_given_y": None, "h_y": None,
                                    "dim": int(f.shape[1])}
    if labels is None:
        return out
    y = labels.long()
    out["h_y"] = estimate_mi(y, y, method="gaussian")  # both discrete: the exact plug-in entropy
    # I(T; Y) <= H(Y) exactly; estimators with an upward bias (gaussian, binning) can exceed it on small samples.
    out["i_fy"] = min(estimate_mi(t, y, method=method, **mi_options), out["h_y"])
    if conditional == "chain":
        out["i_xf_given_y"] = i_xf - out["i_fy"]
    else:
        total, acc = 0, 0.0
        for c in torch.unique(y):
            idx = (y == c).nonzero().flatten()
            try:
                acc += idx.numel() * estimate_mi(f[idx], t[idx], method=method, **mi_options)
            except ConfigError as err:
                raise ConfigError(
                    f"conditional='classwise' could not estimate class {int(c)} ({idx.numel()} samples): {err} "
                    "Use conditional='chain', more samples per class, or a smaller max_dim."
                ) from err
            total += idx.numel()
        out["i_xf_given_y"] = acc / total
    return out


def teacher_information(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    features: str = "logits",
    method: str = "gaussian",
    noise: float = 0.1,
    conditional: str = "chain",
    max_dim: int | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    **mi_options: Any,
) -> TeacherInformation:
    """Measure ``I(X; F_T)``, ``I(F_T; Y)``, ``I(X; F_T | Y)`` and the accuracy of a teacher on a data loader.

    Eval mode under ``no_grad`` (mode restored); the ``n x d`` features are kept on the CPU.

    Args:
        model: A classifier (a timm model for ``pre_logits``).
        loader: Batches ``(images, labels, ...)``, dicts, or images alone (no label-based measures).
        features: ``"logits"`` or ``"pre_logits"`` (``forward_head(forward_features(x), pre_logits=True)``).
        method: MI estimator, one of :data:`~timm_remem.analysis.mi.MI_METHODS`.
        noise: Relative noise ``sigma > 0`` of the channel (fraction of the features' RMS standard deviation).
        conditional: ``"chain"`` (``I(X; T) - I(T; Y)``) or ``"classwise"``.
        max_dim: Compress features to this many principal components first (``None``: all).
        max_samples: Use at most this many samples from the loader.
        seed: Seed of the channel noise.
        device: Device for the inputs (default: the model's); the model is not moved.
        progress: Show a progress bar (None: only on an interactive terminal).
        **mi_options: Options of :func:`~timm_remem.analysis.mi.estimate_mi`.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3)
        >>> data = [(torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,))) for _ in range(2)]
        >>> info = teacher_information(model, data, progress=False)
        >>> info.n, info.i_xf > 0
        (32, True)
    """
    f, y, correct = _collect(model, loader, features, max_samples=max_samples, device=device, progress=progress)
    res = information_from_features(
        f, y, method=method, noise=noise, conditional=conditional, max_dim=max_dim, seed=seed, **mi_options
    )
    return TeacherInformation(
        i_xf=float(res["i_xf"]),
        i_fy=res["i_fy"],
        i_xf_given_y=res["i_xf_given_y"],
        accuracy=None if correct is None else int(correct.sum()) / int(correct.numel()),
        h_y=res["h_y"],
        n=int(f.shape[0]),
        dim=int(res["dim"]),
        features=features,
        method=method,
        noise=float(noise),
        conditional=conditional,
    )


def _loader_normalisation(loader: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The ``(mean, std)`` of a loader's images, from its dataset's ``mean``/``std`` or ``Normalize`` transform."""
    ds = getattr(loader, "dataset", None)
    if ds is None:
        return None
    if getattr(ds, "mean", None) is not None and getattr(ds, "std", None) is not None:
        return tuple(float(v) for v in ds.mean), tuple(float(v) for v in ds.std)
    transform = getattr(ds, "transform", None)
    for t in getattr(transform, "transforms", [transform]):
        if type(t).__name__ == "Normalize" and hasattr(t, "mean") and hasattr(t, "std"):
            return tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    return None


def _norm(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    dc = data_config(model)
    return tuple(float(v) for v in dc["mean"]), tuple(float(v) for v in dc["std"])


def information_plane(
    checkpoints: Any,
    loader: Iterable[Any],
    *,
    progress: bool | None = None,
    data_mean: tuple[float, ...] | list[float] | None = None,
    data_std: tuple[float, ...] | list[float] | None = None,
    **kwargs: Any,
) -> list[TeacherInformation]:
    """One :func:`teacher_information` point (``name`` set) per checkpoint: the (teacher error, MI) plane.

    Each checkpoint sees the loader's images re-normalised to its own mean/std (its pretrained config). The loader's
    normalisation is ``data_mean``/``data_std`` when given, else read from its dataset; when it is unknown, the
    checkpoints must agree on one (the loader is taken to use it).

    Args:
        checkpoints: A list of models and/or checkpoint folders (written by ``timm_remem.save_pretrained``), a dict
            ``name -> model or folder``, or one folder holding checkpoint folders (taken in natural name order).
        loader: ``(images, labels)`` batches (labels are needed for the error axis).
        data_mean: Per-channel mean the loader's images were normalised with (``data_std`` likewise).
        **kwargs: Passed to :func:`teacher_information`.

    Raises:
        ConfigError: Checkpoints that expect different normalisations while the loader's is unknown, or only one
            of ``data_mean``/``data_std``.

    Example:
        >>> import timm, torch
        >>> models = [timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3) for _ in range(2)]
        >>> data = [(torch.randn(32, 3, 32, 32), torch.randint(0, 3, (32,)))]
        >>> [p.name for p in information_plane(models, data, progress=False)]
        ['checkpoint_0', 'checkpoint_1']
    """
    if (data_mean is None) != (data_std is None):
        raise ConfigError("pass data_mean and data_std together (the normalisation of the loader's images), or "
                          "neither")
    source = (tuple(float(v) for v in data_mean), tuple(float(v) for v in data_std)) if data_mean is not None \
        else _loader_normalisation(loader)
    items = _checkpoint_items(checkpoints)
    if source is None and len(items) > 1:
        seen = {}
        for name, spec in items:  # one at a time: only one checkpoint is in memory at once
            seen[name] = _norm(load_teacher_model(spec))
        if len(set(seen.values())) > 1:
            listed = "; ".join(f"{n}: mean {m}, std {s}" for n, (m, s) in seen.items())
            raise ConfigError(
                f"the checkpoints expect different input normalisations ({listed}) and the loader's is unknown, so "
                "one of them would see wrongly normalised images; pass data_mean= and data_std= (the normalisation "
                "of the loader's images) and each checkpoint gets its own"
            )
    points = []
    for name, spec in items:
        model = load_teacher_model(spec)  # loaded one at a time: only one checkpoint is in memory at once
        if not isinstance(spec, nn.Module) and kwargs.get("device") is not None:
            model = model.to(kwargs["device"])
        measured = model
        if source is not None and _norm(model) != source:
            measured = _Renormalised(model, source[0], source[1], *_norm(model))
        info = teacher_information(measured, loader, progress=progress, **kwargs)
        info.name = name
        points.append(info)
        del model, measured
    return points


def _zscores(values: list[float]) -> list[float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return [0.0 if std == 0 else (v - mean) / std for v in values]


def rank_checkpoints(
    checkpoints: Any,
    loader: Iterable[Any],
    *,
    score: str = "combined",
    mi_weight: float = 1.0,
    progress: bool | None = None,
    **kwargs: Any,
) -> list[CheckpointScore]:
    """Order teacher checkpoints by an MI-based score (ours), best first; ties keep the given order.

    Args:
        checkpoints: As in :func:`information_plane`.
        loader: ``(images, labels)`` batches of held-out data.
        score: ``"combined"``: ``z(accuracy) + mi_weight * z(I(X; T))``, z-scores across the checkpoints (ReMem's
            Pareto front); ``"mi"``: ``I(X; T)``; ``"conditional_mi"``: ``I(X; T | Y)``; ``"accuracy"``.
        **kwargs: Passed to :func:`teacher_information`.

    Example:
        >>> import timm, torch
        >>> models = {f"ep{i}": timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3)
        ...           for i in range(2)}
        >>> data = [(torch.randn(32, 3, 32, 32), torch.randint(0, 3, (32,)))]
        >>> ranking = rank_checkpoints(models, data, progress=False)
        >>> sorted(r.name for r in ranking), ranking[0].rank
        (['ep0', 'ep1'], 1)
    """
    check_choice("score", score, SCORES)
    check_float("mi_weight", mi_weight)
    points = information_plane(checkpoints, loader, progress=progress, **kwargs)
    needs_labels = score in ("combined", "conditional_mi", "accuracy")
    if needs_labels and any(p.accuracy is None for p in points):
        raise ConfigError(f"score={score!r} needs labels; make the loader yield (images, labels) or use score='mi'.")
    comps: list[dict[str, float]] = [{} for _ in points]
    if score == "combined":
        za, zm = _zscores([p.accuracy for p in points]), _zscores([p.i_xf for p in points])
        values = [a + mi_weight * m for a, m in zip(za, zm, strict=True)]
        comps = [{"z_accuracy": a, "z_mi": m} for a, m in zip(za, zm, strict=True)]
    else:
        key = {"mi": "i_xf", "conditional_mi": "i_xf_given_y", "accuracy": "accuracy"}[score]
        values = [getattr(p, key) for p in points]
    order = sorted(range(len(points)), key=lambda i: -values[i])
    return [
        CheckpointScore(name=points[i].name or f"checkpoint_{i}", score=float(values[i]), rank=r + 1,
                        info=points[i], components=comps[i])
        for r, i in enumerate(order)
    ]
