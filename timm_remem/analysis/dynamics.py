"""Layer dynamics (*Distillation Dynamics*, arXiv 2511.06848): channel spectrum, token entropy, activation and
gradient magnitude per block, from the raw ``[B, C, H, W]`` block outputs of timm's ``forward_intermediates``.

The pure functions work on any ``[B, C, *spatial]`` tensor. Definitions: docs/analysis.md, "Layer dynamics".
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.models._features import feature_take_indices
from torch import nn

from .._models import model_device
from .._validation import check_choice, check_int
from ..errors import ConfigError, UnsupportedModelError
from ._kernels import _spectrum_tokens, _token_entropy_tokens, _tokens, _Workspace

__all__ = [
    "LayerDynamics",
    "activation_magnitude",
    "channel_spectrum",
    "frequency_intensity",
    "layer_dynamics",
    "token_entropy",
]

ENTROPY_RANGES = ("global", "layer")


def _check_features(features: torch.Tensor, name: str = "features") -> None:
    if not isinstance(features, torch.Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor of shape [B, C, H, W], got {type(features).__name__}.")
    if features.dim() < 2 or features.shape[1] < 1 or features.numel() == 0:
        raise ConfigError(
            f"{name} must have shape [B, C, *spatial] with C >= 1 and at least one element, got "
            f"{tuple(features.shape)}; pass a block output in NCHW layout (forward_intermediates(output_fmt='NCHW'))."
        )
    if features.is_floating_point() and not bool(torch.isfinite(features).all()):
        raise ConfigError(
            f"{name} contains NaN or infinite values; check the model's numerics (fp16 overflow?) before measuring."
        )


def channel_spectrum(features: torch.Tensor) -> torch.Tensor:
    """``|FFT(x)| / C`` of every token's channel vector ``x``, averaged over tokens: ``[B, C, *spatial] -> [C]``.

    The FFT runs along the channel axis; bin 0 of the float32 result is the DC term.

    Example:
        >>> import torch
        >>> x = torch.ones(2, 4, 3, 3)          # every token's channel vector is constant
        >>> channel_spectrum(x).tolist()        # all energy at DC: |sum of 4 ones| / 4 = 1
        [1.0, 0.0, 0.0, 0.0]
    """
    _check_features(features)
    return _spectrum_tokens(_tokens(features))


def frequency_intensity(spectrum: torch.Tensor) -> torch.Tensor:
    """Mean of a channel spectrum over frequency: ``[..., C] -> [...]`` (a ``[L, C]`` spectrum gives ``[L]``).

    Example:
        >>> import torch
        >>> frequency_intensity(torch.tensor([[1.0, 0.0, 0.0, 1.0]])).tolist()
        [0.5]
    """
    if not isinstance(spectrum, torch.Tensor) or spectrum.dim() < 1 or spectrum.shape[-1] == 0:
        raise ConfigError(f"spectrum must be a non-empty tensor of shape [..., C], got {spectrum!r:.80}.")
    return spectrum.mean(-1)


def token_entropy(
    features: torch.Tensor,
    *,
    bins: int = 100,
    value_range: tuple[float, float] | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Shannon entropy (bits) of each token's ``C`` channel values, from a ``bins``-bin ``torch.histc``-style histogram.

    Args:
        features: Block output ``[B, C, *spatial]``.
        bins: Histogram bins (the paper uses 100).
        value_range: ``(min, max)`` of the histogram (values outside are ignored); default the tensor's own min and
            max. Share one range across blocks to compare them on one scale.
        reduction: ``"mean"`` (a 0-dim tensor) or ``"none"`` (``[B, *spatial]``).

    Example:
        >>> import torch
        >>> x = torch.tensor([0.0, 1.0, 0.0, 1.0]).view(1, 4, 1, 1)  # two values, equally often
        >>> float(token_entropy(x))
        1.0
    """
    _check_features(features)
    bins = check_int("bins", bins, low=1, hint="the paper uses bins=100")
    check_choice("reduction", reduction, ("mean", "none"))
    x = _tokens(features)
    if value_range is None:
        lo_t, hi_t = torch.aminmax(x)
        lo, hi, covered = float(lo_t), float(hi_t), True
    else:
        try:
            lo, hi = (float(v) for v in value_range)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"value_range must be a pair (min, max) of floats, got {value_range!r}.") from err
        if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
            raise ConfigError(f"value_range must be finite with min <= max, got {value_range!r}.")
        covered = False
    ent = _token_entropy_tokens(x, lo, hi, bins, covered=covered, reduction=reduction)
    if reduction == "mean":
        return ent
    return ent.view(features.shape[0], *features.shape[2:])


def activation_magnitude(features: torch.Tensor) -> torch.Tensor:
    """Mean absolute value of a block output (0-dim tensor).

    Example:
        >>> import torch
        >>> float(activation_magnitude(torch.tensor([[-1.0, 3.0]])))
        2.0
    """
    _check_features(features)
    x = features.detach().float()
    return torch.linalg.vector_norm(x, ord=1) / x.numel()


@dataclass
class LayerDynamics:
    """Per-block measurements of one batch: one entry per block in ``indices`` (bottom-up).

    Attributes:
        spectra: Channel spectrum ``[C_l]`` of each block (widths differ across stages of hierarchical models).
        intensity: ``[L]`` mean of each spectrum over frequency.
        entropy: ``[L]`` mean token entropy in bits.
        magnitude: ``[L]`` mean ``|activation|``.
        gradient: ``[L]`` mean ``|gradient|`` of the target logit w.r.t. the block output, or ``None``.
        value_ranges: The ``(min, max)`` histogram range of each block.
    """

    indices: list[int]
    spectra: list[torch.Tensor]
    intensity: torch.Tensor
    entropy: torch.Tensor
    magnitude: torch.Tensor
    gradient: torch.Tensor | None = None
    bins: int = 100
    entropy_range: str = "global"
    value_ranges: list[tuple[float, float]] = field(default_factory=list)

    @property
    def spectrum(self) -> torch.Tensor:
        """The ``[L, C]`` spectrum matrix (all blocks must have the same width; otherwise use ``spectra``)."""
        widths = sorted({int(s.numel()) for s in self.spectra})
        if len(widths) != 1:
            raise UnsupportedModelError(
                f"blocks have different widths {widths}, so the spectra do not stack into one [L, C] matrix; "
                "use LayerDynamics.spectra (one tensor per block) for hierarchical models."
            )
        return torch.stack(self.spectra)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dictionary (lists of floats)."""
        return {
            "indices": list(self.indices),
            "spectrum": [s.tolist() for s in self.spectra],
            "intensity": self.intensity.tolist(),
            "entropy": self.entropy.tolist(),
            "magnitude": self.magnitude.tolist(),
            "gradient": None if self.gradient is None else self.gradient.tolist(),
            "bins": self.bins,
            "entropy_range": self.entropy_range,
            "value_ranges": [list(r) for r in self.value_ranges],
        }


def _supports_kwarg(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _feature_modules(model: nn.Module, indices: Any) -> list[nn.Module]:
    """The modules whose outputs ``forward_intermediates`` returns for ``indices``, from ``model.feature_info``."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, (list, tuple)) or not info or not all(isinstance(d, dict) and "module" in d for d in info):
        raise UnsupportedModelError(
            f"gradient=True needs model.feature_info (a list of dicts naming each feature module) to locate the "
            f"block outputs, and {type(model).__name__} has none; pass gradient=False."
        )
    take, _ = feature_take_indices(len(info), indices)
    return [model.get_submodule(info[i]["module"]) for i in sorted(set(take))]


def _target_logits(logits: torch.Tensor, target: int | torch.Tensor | None) -> torch.Tensor:
    b, k = logits.shape
    if target is None:
        tgt = logits.detach().argmax(-1)
    elif isinstance(target, int) and not isinstance(target, bool):
        if not 0 <= target < k:
            raise ConfigError(f"target class {target} is out of range for a model with {k} classes (0..{k - 1}).")
        tgt = torch.full((b,), target, dtype=torch.long, device=logits.device)
    elif isinstance(target, torch.Tensor) and target.shape == (b,) and not target.is_floating_point():
        tgt = target.to(device=logits.device, dtype=torch.long)
        if bool((tgt < 0).any()) or bool((tgt >= k).any()):
            raise ConfigError(f"target labels must lie in 0..{k - 1}, got values {tgt.min()}..{tgt.max()}.")
    else:
        raise ConfigError(
            f"target must be None (predicted class), an int class index or an integer tensor of shape [{b}], "
            f"got {target!r:.80}."
        )
    return logits.gather(1, tgt.unsqueeze(1)).sum()


def _measure(
    feats: list[torch.Tensor], layers: list[int], bins: int, entropy_range: str, name: str = "the model"
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[tuple[float, float]]]:
    """Spectrum, mean token entropy and magnitude of each ``[B, C, H, W]`` block output."""
    ranges = [tuple(float(v) for v in torch.aminmax(f.detach())) for f in feats]
    bad = [i for i, (lo, hi) in zip(layers, ranges, strict=True) if not (math.isfinite(lo) and math.isfinite(hi))]
    if bad:
        raise ConfigError(
            f"blocks {bad} of {name} produced NaN or infinite activations on these images; check the inputs "
            "(normalised?) and the model's precision (fp16 overflow?) before measuring."
        )
    if entropy_range == "global":
        glob = (min(r[0] for r in ranges), max(r[1] for r in ranges))
        ranges = [glob] * len(feats)
    ws = _Workspace()  # one set of scratch buffers for all blocks
    spectra, entropy, magnitude = [], [], []
    for f, (lo, hi) in zip(feats, ranges, strict=True):
        x = _tokens(f, ws)
        spectra.append(_spectrum_tokens(x))
        entropy.append(_token_entropy_tokens(x, lo, hi, bins, ws, covered=True, reduction="mean"))
        magnitude.append(torch.linalg.vector_norm(x, ord=1) / x.numel())
    return spectra, entropy, magnitude, ranges


def layer_dynamics(
    model: nn.Module,
    images: torch.Tensor,
    *,
    indices: int | Sequence[int] | None = None,
    bins: int = 100,
    entropy_range: str = "global",
    gradient: bool = False,
    target: int | torch.Tensor | None = None,
) -> LayerDynamics:
    """Spectrum, token entropy, activation (and gradient) magnitude of every block on a batch.

    Runs ``model.forward_intermediates(images, output_fmt="NCHW", norm=False)`` in eval mode (mode restored).

    Args:
        images: Input batch ``[B, 3, H, W]``, already normalised for the model.
        indices: Blocks to measure (timm convention: ``None`` all, ``n`` the last n, a list of indices).
        entropy_range: ``"global"`` (one min/max over all measured blocks, the paper's choice) or ``"layer"``.
        gradient: Also measure the gradient magnitude (one backward pass; needs ``model.feature_info``).
        target: The class whose logit is back-propagated for ``gradient``: ``None`` (each image's predicted class),
            an int, or ``[B]`` labels.

    Raises:
        UnsupportedModelError: The model has no ``forward_intermediates``.
        ConfigError: Bad ``images``, ``bins``, ``entropy_range`` or ``target``.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
        >>> dyn = layer_dynamics(model, torch.randn(2, 3, 32, 32))
        >>> dyn.spectrum.shape, dyn.entropy.shape
        (torch.Size([6, 64]), torch.Size([6]))
    """
    if not callable(getattr(model, "forward_intermediates", None)):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no forward_intermediates(), which layer_dynamics needs to read each "
            "block's output. Use a timm model that implements it (ViT/DeiT/CaiT/EVA/Swin/ConvNeXt/ResNet and most "
            "others in timm >= 1.0), or collect [B, C, H, W] block outputs yourself and call channel_spectrum, "
            "token_entropy and activation_magnitude on them."
        )
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ConfigError(
            f"images must be a float tensor [B, 3, H, W], got "
            f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}."
        )
    check_choice("entropy_range", entropy_range, ENTROPY_RANGES)
    bins = check_int("bins", bins, low=1, hint="the paper uses bins=100")

    fi = model.forward_intermediates
    kwargs: dict[str, Any] = {"indices": indices, "norm": False, "intermediates_only": not gradient}
    if _supports_kwarg(fi, "output_fmt"):
        kwargs["output_fmt"] = "NCHW"
    images = images.to(model_device(model))
    was_training = model.training
    model.eval()
    captured: list[list[torch.Tensor]] = []
    handles = []
    try:
        if gradient:
            modules = _feature_modules(model, indices)
            for m in modules:
                store: list[torch.Tensor] = []
                captured.append(store)
                handles.append(m.register_forward_hook(lambda _m, _i, out, store=store: store.append(out)))
            with torch.enable_grad():
                final, feats = fi(images, **kwargs)
                logits = model.forward_head(final)
                if not all(len(s) >= 1 and isinstance(s[0], torch.Tensor) for s in captured):
                    raise UnsupportedModelError(
                        f"could not capture the block outputs of {type(model).__name__} for gradient=True (its "
                        "feature_info modules were not called with a tensor output); pass gradient=False."
                    )
                outs = [s[0] for s in captured]
                grads = torch.autograd.grad(_target_logits(logits, target), outs, allow_unused=True)
        else:
            with torch.no_grad():
                feats = fi(images, **kwargs)
            outs, grads = [], []
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    feats = [f[0] if isinstance(f, (tuple, list)) else f for f in feats]
    for i, f in enumerate(feats):
        if not isinstance(f, torch.Tensor) or f.dim() != 4:
            raise UnsupportedModelError(
                f"{type(model).__name__}.forward_intermediates returned a {getattr(f, 'shape', type(f))} output for "
                f"block {i}, not a [B, C, H, W] map; layer_dynamics needs spatial (NCHW) block outputs."
            )
    try:
        n_blocks = len(getattr(model, "feature_info", None) or feats)
        take = sorted(set(feature_take_indices(n_blocks, indices)[0]))
    except Exception:  # noqa: BLE001 - a model whose indices cannot be resolved: number them in order
        take = []
    if len(take) != len(feats):
        take = list(range(len(feats)))

    spectra, entropy, magnitude, ranges = _measure(feats, take, bins, entropy_range, type(model).__name__)
    intensity = torch.stack([sp.mean() for sp in spectra])

    grad_mag = None
    if gradient:
        grad_mag = torch.stack(
            [_patch_gradient_magnitude(g, o, f, model) for g, o, f in zip(grads, outs, feats, strict=True)]
        ).detach()
    return LayerDynamics(
        indices=take,
        spectra=[s.cpu() for s in spectra],
        intensity=intensity.cpu(),
        entropy=torch.stack(entropy).cpu(),
        magnitude=torch.stack(magnitude).cpu(),
        gradient=None if grad_mag is None else grad_mag.cpu(),
        bins=bins,
        entropy_range=entropy_range,
        value_ranges=[(float(lo), float(hi)) for lo, hi in ranges],
    )


def _patch_gradient_magnitude(
    grad: torch.Tensor | None, out: torch.Tensor, feat: torch.Tensor, model: nn.Module
) -> torch.Tensor:
    """Mean ``|grad|`` over the patch tokens of a hooked block output that corresponds to ``feat`` ``[B, C, H, W]``."""
    if grad is None:  # block after the head's input (cannot happen for forward-order blocks); no gradient flows
        return torch.zeros((), dtype=torch.float32, device=feat.device)
    b, c, h, w = feat.shape
    if out.numel() == feat.numel():
        g, o = grad, out
    elif out.dim() == 3 and out.shape[0] == b and out.shape[-1] == c and out.shape[1] > h * w:
        # [B, prefix + H*W, C] tokens: timm puts class/register/distillation tokens first.
        g, o = grad[:, -h * w :], out[:, -h * w :]
    else:
        raise UnsupportedModelError(
            f"the output of a feature module of {type(model).__name__} has shape {tuple(out.shape)}, which does not "
            f"match its intermediate {tuple(feat.shape)}; gradient magnitude is not supported here, pass "
            "gradient=False."
        )
    ref = float(feat.detach().float().abs().mean())
    got = float(o.detach().float().abs().mean())
    if not math.isclose(got, ref, rel_tol=1e-4, abs_tol=1e-6):
        raise UnsupportedModelError(
            f"{type(model).__name__}.feature_info names modules whose outputs differ from forward_intermediates "
            f"(mean |x| {got:.6g} vs {ref:.6g}); gradient magnitude is not supported here, pass gradient=False."
        )
    return g.detach().float().abs().mean()
