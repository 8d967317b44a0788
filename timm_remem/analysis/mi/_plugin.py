"""Count tables and the plug-in MI of discrete cells (labels, or continuous columns cut into equal-width bins)."""

from __future__ import annotations

from typing import Any

import torch

from ..._validation import check_int
from ...errors import ConfigError


def _entropy_from_counts(counts: torch.Tensor) -> torch.Tensor:
    c = counts.to(torch.float64)
    c = c[c > 0]
    n = c.sum()
    return torch.log(n) - (c * torch.log(c)).sum() / n


def _plugin_from_table(rows: torch.Tensor, counts: torch.Tensor, d_a: int, correction: Any = None) -> float:
    """Plug-in MI of a joint count table: ``rows`` are distinct joint cells ``[m, d_a + d_b]``, ``counts`` ``[m]``."""
    _, inv_a = torch.unique(rows[:, :d_a], dim=0, return_inverse=True)
    _, inv_b = torch.unique(rows[:, d_a:], dim=0, return_inverse=True)
    counts = counts.to(torch.float64)
    c_a = torch.zeros(int(inv_a.max()) + 1, dtype=torch.float64, device=counts.device).index_add_(0, inv_a, counts)
    c_b = torch.zeros(int(inv_b.max()) + 1, dtype=torch.float64, device=counts.device).index_add_(0, inv_b, counts)
    mi = _entropy_from_counts(c_a) + _entropy_from_counts(c_b) - _entropy_from_counts(counts)
    if correction == "miller-madow":
        n = counts.sum()
        mi = mi + ((c_a.numel() - 1) + (c_b.numel() - 1) - (counts.numel() - 1)) / (2.0 * n)
    return float(mi)


def _table(rows: torch.Tensor, counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rows of ``rows`` and their (weighted) counts."""
    uniq, inv = torch.unique(rows, dim=0, return_inverse=True)
    weights = torch.ones(rows.shape[0], dtype=torch.int64, device=rows.device) if counts is None else counts
    out = torch.zeros(uniq.shape[0], dtype=torch.int64, device=rows.device).index_add_(0, inv, weights)
    return uniq, out


def _plugin_discrete(a: torch.Tensor, b: torch.Tensor, correction: Any = None) -> float:
    rows, counts = _table(torch.stack([a, b], dim=1))
    return _plugin_from_table(rows, counts, 1, correction)


def _bin_edges(x: torch.Tensor, range_: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension ``(low, high)``: from ``range_`` = (low, high) for every column, or the data min/max."""
    if range_ is None:
        return x.min(dim=0).values.to(torch.float64), x.max(dim=0).values.to(torch.float64)
    try:
        low, high = (float(v) for v in range_)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"`range` must be None or a pair (low, high) of floats; got {range_!r}.") from err
    if not high > low:
        raise ConfigError(f"`range` must satisfy low < high; got {range_!r}.")
    d = x.shape[1]
    return (torch.full((d,), low, dtype=torch.float64, device=x.device),
            torch.full((d,), high, dtype=torch.float64, device=x.device))


def _bin_codes(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bins: int) -> torch.Tensor:
    """Equal-width bin index of every entry (int64 ``[n, d]``); values outside ``[low, high]`` go to the end bins."""
    width = (high - low) / bins
    width = torch.where(width > 0, width, torch.ones_like(width))
    idx = torch.floor((x.to(torch.float64) - low) / width)
    return idx.clamp_(0, bins - 1).to(torch.int64)


def _check_binning(opts: dict[str, Any]) -> int:
    bins = check_int("bins", opts["bins"], low=1, hint="the number of equal-width bins per dimension")
    if opts["correction"] not in (None, "miller-madow"):
        raise ConfigError(f"`correction` must be None or 'miller-madow'; got {opts['correction']!r}.")
    return bins


def _joint_codes(a: torch.Tensor, b: torch.Tensor, da: bool, db: bool, edges: list[Any], bins: int) -> torch.Tensor:
    cols = []
    for x, disc, edge in ((a, da, edges[0]), (b, db, edges[1])):
        cols.append(x[:, None] if disc else _bin_codes(x, edge[0], edge[1], bins))
    return torch.cat(cols, dim=1)

