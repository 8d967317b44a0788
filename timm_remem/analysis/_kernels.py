"""Vectorised per-token kernels behind the layer dynamics: the channel spectrum, and the histogram entropy of every
token counted in one pass (never a Python loop over tokens), with scratch buffers reused across same-shaped blocks.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


def _tokens(features: torch.Tensor, ws: _Workspace | None = None) -> torch.Tensor:
    """``[B, C, *spatial]`` -> contiguous float ``[N, C]``, one row per token (in ``ws``'s buffer when given)."""
    x = features.detach()
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    c = x.shape[1]
    cl = x.movedim(1, -1)
    if ws is None:
        return cl.reshape(-1, c).to(dtype).contiguous()
    buf = ws.get("tokens", (x.numel() // c, c), dtype, x.device)
    buf.view(cl.shape).copy_(cl)
    return buf


def _spectrum_tokens(x: torch.Tensor) -> torch.Tensor:
    """Mean ``|FFT| / C`` along the channel axis of ``[N, C]`` tokens -> ``[C]``.

    A real input's spectrum is symmetric (``|X_k| = |X_{C-k}|``): ``rfft`` computes half, the rest is mirrored.
    """
    n, c = x.shape
    spec = torch.fft.rfft(x, dim=-1)
    parts = torch.view_as_real(spec)
    mag = torch.hypot(parts[..., 0], parts[..., 1])  # |X_k|; about 2x faster than complex abs() on CPU
    # Sum over tokens as a matrix-vector product: BLAS-fast, float32 with blocked (accurate) accumulation.
    half = (torch.ones(1, n, dtype=mag.dtype, device=mag.device) @ mag).squeeze(0) / (n * c)
    return torch.cat([half, half[1 : (c + 1) // 2].flip(0)])


def _entropy_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of each row of a ``[N, bins]`` count matrix."""
    counts = counts.to(torch.float64)
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    plogp = torch.where(counts > 0, p * torch.log2(torch.where(counts > 0, p, 1.0)), 0.0)
    return -plogp.sum(-1)


def _plogp_table(c: int, device: torch.device) -> torch.Tensor:
    """``g[k] = -(k / c) * log2(k / c)`` for ``k = 0..c`` (``g[0] = 0``): entropy terms of integer counts."""
    k = torch.arange(c + 1, dtype=torch.float64, device=device)
    p = k / c
    return torch.where(k > 0, -p * torch.log2(torch.where(k > 0, p, 1.0)), 0.0)


class _Workspace:
    """Reusable scratch buffers, so that a model's many same-shaped blocks do not re-allocate (page faults)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, tuple[int, ...], torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        k = (key, tuple(shape), dtype, device)
        buf = self._bufs.get(k)
        if buf is None:
            buf = self._bufs[k] = torch.empty(shape, dtype=dtype, device=device)
        return buf


def _token_entropy_tokens(
    x: torch.Tensor,
    lo: float,
    hi: float,
    bins: int,
    ws: _Workspace | None = None,
    *,
    covered: bool = False,
    reduction: str = "none",
) -> torch.Tensor:
    """Entropy (bits) of ``[N, C]`` tokens with a ``bins``-bin histogram over ``[lo, hi]``: ``[N]`` or their mean.

    ``covered=True`` promises every value lies in ``[lo, hi]``; otherwise out-of-range values are ignored, as
    ``torch.histc`` does.
    """
    ws = ws or _Workspace()
    n, c = x.shape
    if not hi > lo:  # constant data: histc widens the range; every value lands in one bin, entropy 0
        hi = lo + 1.0
    lo_t = torch.tensor(lo, dtype=x.dtype, device=x.device)
    width = torch.tensor(hi, dtype=x.dtype, device=x.device) - lo_t
    # Same arithmetic and rounding as torch.histc: (x - lo) * bins / (hi - lo), truncated.
    pos = ws.get("pos", (n, c), x.dtype, x.device)
    torch.sub(x, lo_t, out=pos)
    pos.mul_(bins).div_(width)
    if covered:
        # Every value is in range: truncate, count each token's bins with one scatter_add into a [N, bins + 1]
        # matrix, then fold column ``bins`` (the values equal to ``hi``) into the last bin, as histc does.
        idx = ws.get("idx64", (n, c), torch.int64, x.device)
        idx.copy_(pos)
        ones = torch.ones((), dtype=torch.int32, device=x.device).expand(n, c)
        counts = torch.zeros(n, bins + 1, dtype=torch.int32, device=x.device).scatter_add_(1, idx, ones)
        counts[:, bins - 1] += counts[:, bins]
        counts = counts[:, :bins]
    else:
        # Flat indices token * (bins + 1) + bin counted in one bincount; the extra column (index ``bins``)
        # collects out-of-range values and is dropped.
        stride = bins + 1
        if n * stride >= 2**31:
            raise ConfigError(f"too many tokens ({n}) for one call; pass fewer images at a time.")
        outside = (pos < 0) | (pos > bins)
        idx = ws.get("idx", (n, c), torch.int32, x.device)
        idx.copy_(pos.clamp_(0, bins - 1))  # clamp before the cast so huge values cannot overflow int32
        idx.masked_fill_(outside, bins)
        idx.add_(torch.arange(0, n * stride, stride, dtype=torch.int32, device=x.device).unsqueeze(1))
        counts = torch.bincount(idx.view(-1), minlength=n * stride).view(n, stride)[:, :bins]
        ent = _entropy_from_counts(counts)
        return (ent.mean() if reduction == "mean" else ent).to(x.dtype)
    # Every row sums to C, so each entropy term -p log2 p depends only on the integer count: look it up.
    terms = _plogp_table(c, x.device)[counts.long()]
    if reduction == "mean":
        return (terms.sum() / n).to(x.dtype)
    return terms.sum(-1).to(x.dtype)
