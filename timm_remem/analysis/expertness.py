"""MLP "expertness": how selectively each block's MLP neurons fire (all definitions ours; the paper's are not public).

A neuron fires on an input (one token of one image) when its hidden activation, the input of the MLP's last linear
layer, is ``> threshold``; neurons and inputs form a bipartite graph. The statistics (fire rate, class selectivity,
graph density and Gini coefficients) are defined in docs/analysis.md, "MLP expertness".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._validation import check_float
from ..errors import ConfigError, UnsupportedModelError
from ..reweighting import find_branches
from ._common import _check_max_samples, _hard_labels, _input_device, _progress, _split_batch

__all__ = ["BlockExpertness", "mlp_expertness", "neuron_statistics"]


def _gini(values: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Gini coefficient of non-negative values with optional frequency weights, from the sorted values."""
    x = values.double().flatten()
    w = torch.ones_like(x) if weights is None else weights.double().flatten()
    keep = w > 0
    x, w = x[keep], w[keep]
    total_w = w.sum()
    mass = (w * x).sum()
    if x.numel() == 0 or float(mass) <= 0:
        return 0.0
    order = torch.argsort(x)
    x, w = x[order], w[order]
    before = torch.cumsum(w, 0) - w
    return float((w * x * (2 * before + w - total_w)).sum() / (total_w * mass))


@dataclass
class BlockExpertness:
    """Neuron firing statistics of one MLP block (definitions in docs/analysis.md).

    Attributes:
        index: Block index (bottom-up).
        path: Path of the module whose input is the hidden activation.
        fire_rate: ``[H]`` fraction of inputs each neuron fires on.
        selectivity: ``[H]`` class selectivity index, or ``None`` without labels.
        input_degree_hist: ``[H + 1]`` number of inputs on which exactly ``k`` neurons fire.
        num_inputs: Inputs (tokens) seen.
    """

    index: int
    path: str
    fire_rate: torch.Tensor
    selectivity: torch.Tensor | None
    input_degree_hist: torch.Tensor
    num_inputs: int
    num_images: int
    threshold: float

    @property
    def hidden_dim(self) -> int:
        return int(self.fire_rate.numel())

    @property
    def density(self) -> float:
        """Edge density of the neuron-input graph (= mean fire rate)."""
        return float(self.fire_rate.double().mean())

    @property
    def dead_fraction(self) -> float:
        return float((self.fire_rate == 0).double().mean())

    @property
    def neuron_gini(self) -> float:
        return _gini(self.fire_rate)

    @property
    def input_gini(self) -> float:
        k = torch.arange(self.input_degree_hist.numel(), dtype=torch.float64)
        return _gini(k, self.input_degree_hist)

    @property
    def mean_selectivity(self) -> float | None:
        return None if self.selectivity is None else float(self.selectivity.double().mean())

    def summary(self) -> dict[str, Any]:
        """Scalar statistics of the block."""
        return {
            "index": self.index,
            "path": self.path,
            "hidden_dim": self.hidden_dim,
            "density": self.density,
            "dead_fraction": self.dead_fraction,
            "neuron_gini": self.neuron_gini,
            "input_gini": self.input_gini,
            "mean_selectivity": self.mean_selectivity,
            "num_inputs": self.num_inputs,
            "num_images": self.num_images,
            "threshold": self.threshold,
        }

    def to_dict(self, neurons: bool = False) -> dict[str, Any]:
        """JSON-friendly dictionary; ``neurons=True`` adds the per-neuron vectors."""
        out = self.summary()
        if neurons:
            out["fire_rate"] = self.fire_rate.tolist()
            out["selectivity"] = None if self.selectivity is None else self.selectivity.tolist()
            out["input_degree_hist"] = self.input_degree_hist.tolist()
        return out


class _Accumulator:
    """Streaming sums behind one block's :class:`BlockExpertness`."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.fire = None  # [H] float64 firing counts
        self.degree = None  # [H + 1] int64 histogram
        self.class_sum: dict[int, torch.Tensor] = {}  # label -> [H] sum over images of per-image rates
        self.class_n: dict[int, int] = {}
        self.num_inputs = 0
        self.num_images = 0
        self.has_labels: bool | None = None

    def update(self, hidden: torch.Tensor, labels: torch.Tensor | None) -> None:
        """``hidden`` ``[B, T, H]`` (T tokens per image), ``labels`` ``[B]`` or ``None``."""
        b, t, h = hidden.shape
        active = hidden.detach() > self.threshold  # [B, T, H]
        if self.fire is None:
            self.fire = torch.zeros(h, dtype=torch.float64)
            self.degree = torch.zeros(h + 1, dtype=torch.int64)
        elif self.fire.numel() != h:
            raise ConfigError(f"hidden width changed from {self.fire.numel()} to {h} between batches.")
        self.fire += active.sum((0, 1), dtype=torch.float64).cpu()
        self.degree += torch.bincount(active.sum(-1).flatten().cpu(), minlength=h + 1)
        self.num_inputs += b * t
        self.num_images += b
        if self.has_labels is None:
            self.has_labels = labels is not None
        elif self.has_labels != (labels is not None):
            raise ConfigError("some batches carry labels and others do not; make every batch (images, labels).")
        if labels is not None:
            rates = active.sum(1, dtype=torch.float64).cpu() / t  # [B, H]
            lab = labels.view(-1).long().cpu()
            for c in torch.unique(lab).tolist():
                sel = lab == c
                self.class_sum[c] = self.class_sum.get(c, torch.zeros(h, dtype=torch.float64)) + rates[sel].sum(0)
                self.class_n[c] = self.class_n.get(c, 0) + int(sel.sum())

    def compute(self, index: int, path: str) -> BlockExpertness:
        if self.fire is None:
            raise ConfigError("no activations were recorded; pass a non-empty loader.")
        fire_rate = (self.fire / self.num_inputs).float()
        selectivity = None
        if self.has_labels and len(self.class_sum) >= 2:
            means = torch.stack([self.class_sum[c] / self.class_n[c] for c in sorted(self.class_sum)])  # [K, H]
            k = means.shape[0]
            mu_max = means.max(0).values
            mu_rest = (means.sum(0) - mu_max) / (k - 1)
            denom = mu_max + mu_rest
            selectivity = torch.where(denom > 0, (mu_max - mu_rest) / denom.clamp_min(1e-300), 0.0).float()
        return BlockExpertness(
            index=index,
            path=path,
            fire_rate=fire_rate,
            selectivity=selectivity,
            input_degree_hist=self.degree.clone(),
            num_inputs=self.num_inputs,
            num_images=self.num_images,
            threshold=self.threshold,
        )


def _as_tokens(hidden: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Hidden activation -> ``[B, T, H]``."""
    if hidden.dim() < 2:
        raise ConfigError(f"hidden activations must be at least [B, H], got {tuple(hidden.shape)}.")
    x = hidden.movedim(channel_dim, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def neuron_statistics(
    hidden: torch.Tensor, labels: torch.Tensor | None = None, *, threshold: float = 0.0
) -> BlockExpertness:
    """:func:`mlp_expertness`'s statistics of hidden activations you already have (``index`` 0, ``path`` empty).

    Args:
        hidden: ``[n, H]`` (one input per image) or ``[n, T, H]`` (``T`` tokens per image) hidden activations.
        labels: ``[n]`` integer labels of the images, or ``None``.
        threshold: A neuron fires on an input when its value is ``> threshold``.

    Example:
        >>> import torch
        >>> h = torch.tensor([[1.0, -1.0], [2.0, 0.5], [3.0, -2.0], [-1.0, -1.0]])  # 4 inputs, 2 neurons
        >>> neuron_statistics(h).fire_rate.tolist()
        [0.75, 0.25]
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3) or hidden.shape[0] == 0:
        raise ConfigError(
            f"hidden must be a tensor [n, H] or [n, T, H], got "
            f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}."
        )
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != hidden.shape[0]):
        raise ConfigError(f"labels must have shape [{hidden.shape[0]}], got {tuple(labels.shape)}.")
    acc = _Accumulator(float(threshold))
    acc.update(hidden if hidden.dim() == 3 else hidden[:, None, :], labels)
    return acc.compute(0, "")


def _unwrap(module: nn.Module) -> nn.Module:
    while isinstance(getattr(module, "base_layer", None), nn.Module):  # ScaledBranch and similar wrappers
        module = module.base_layer
    return module


def _last_projection(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The last ``nn.Linear`` (or 1x1 ``nn.Conv2d``) registered in ``module``: an MLP's output projection."""
    found = None
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1)):
            found = (name, m)
    return found


def _hidden_site(model: nn.Module, branch: Any) -> tuple[str, nn.Module, int, tuple[int, int] | None]:
    """``(path, module, channel_dim, columns)``: the module whose input is the MLP hidden activation."""
    if getattr(branch, "columns", None) is not None:  # fused attention+MLP projection: the MLP's input columns
        mod = _unwrap(branch.module)
        return branch.path, mod, -1, tuple(branch.columns)
    candidates = [(branch.path, _unwrap(branch.module))]
    # Post-norm blocks report the norm after the MLP: look for the MLP among the block's children.
    block = model.get_submodule(branch.block_path) if getattr(branch, "block_path", "") else None
    if block is not None:
        for name, child in block.named_children():  # direct children only (not e.g. attn.rel_pos.mlp)
            leaf = name.lower()
            if leaf.startswith(("mlp", "ffn", "feed_forward")) or leaf == "ff":
                candidates.append((f"{branch.block_path}.{name}", _unwrap(child)))
    for path, mod in candidates:
        found = _last_projection(mod)  # the module itself counts when it is the projection (mlp_out_proj)
        if found is not None:
            name, proj = found
            return (f"{path}.{name}" if name else path), proj, (1 if isinstance(proj, nn.Conv2d) else -1), None
    raise UnsupportedModelError(
        f"could not find the output projection (a Linear or 1x1 Conv2d, e.g. fc2) of the MLP at {branch.path} in "
        f"{type(model).__name__}; mlp_expertness needs an MLP whose last layer is linear."
    )


@torch.no_grad()
def mlp_expertness(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    threshold: float = 0.0,
    max_samples: int | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> list[BlockExpertness]:
    """Per-block firing statistics of the MLP neurons over a data loader, one :class:`BlockExpertness` per block.

    MLP blocks come from :func:`~timm_remem.reweighting.find_branches`; a pre-hook on each MLP's last linear layer
    records its input. Eval mode under ``no_grad``; hooks removed and mode restored afterwards.

    Args:
        loader: Iterable of ``(images, labels, ...)`` batches (images alone: no selectivity).
        threshold: Firing threshold on the hidden activation.
        max_samples: Use at most this many images.
        device: Device for the inputs (default: the model's); the model is not moved.
        progress: Show a progress bar (None: only on an interactive terminal).

    Raises:
        UnsupportedModelError: The model has no transformer MLP branch.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3)
        >>> data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))]
        >>> blocks = mlp_expertness(model, data, progress=False)
        >>> len(blocks), blocks[0].hidden_dim
        (6, 192)
    """
    threshold = check_float("threshold", threshold, hint="a neuron fires where its hidden value is above it")
    _check_max_samples(max_samples)
    branches = find_branches(model, "mlp")
    sites = [_hidden_site(model, b) for b in branches]
    accs = [_Accumulator(float(threshold)) for _ in sites]
    device = _input_device(model, device)
    current: dict[str, Any] = {"labels": None, "take": None}

    def make_hook(acc: _Accumulator, channel_dim: int, columns: tuple[int, int] | None):
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if columns is not None:
                x = x[..., columns[0] : columns[1]]
            tokens = _as_tokens(x, channel_dim)[: current["take"]]
            acc.update(tokens, current["labels"])

        return hook

    was_training = model.training
    model.eval()
    handles = [
        m.register_forward_pre_hook(make_hook(a, cd, cols))
        for (_, m, cd, cols), a in zip(sites, accs, strict=True)
    ]
    n = 0
    try:
        for batch in _progress(loader, progress, "expertness"):
            images, labels = _split_batch(batch)
            take = images.shape[0] if max_samples is None else min(images.shape[0], max_samples - n)
            if labels is not None:
                labels = _hard_labels(labels).view(-1)[:take]
            current["labels"], current["take"] = labels, take
            model(images[:take].to(device))
            n += take
            if max_samples is not None and n >= max_samples:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise ConfigError("the loader yielded no samples; pass a non-empty loader.")
    return [a.compute(b.index, path) for a, b, (path, *_rest) in zip(accs, branches, sites, strict=True)]
