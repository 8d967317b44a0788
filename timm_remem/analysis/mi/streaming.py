"""The streaming estimator :class:`MutualInformation` (the functional twin is
:func:`~timm_remem.analysis.mi.estimate_mi`)."""

from __future__ import annotations

from typing import Any

import torch

from ...errors import ConfigError
from . import ksg, renyi
from ._common import _as_samples, _auto_max_samples, _check_max_samples, _check_pair, _cpu_workers, _resolve_options
from ._moments import _check_gaussian_n, _gaussian_from_moments, _Moments
from ._plugin import _bin_edges, _check_binning, _joint_codes, _plugin_from_table, _table

__all__ = ["MutualInformation"]


class MutualInformation:
    """Streaming mutual information in nats: ``update(a, b)`` per batch, ``compute()``, ``reset()``.

    ``gaussian`` streams exact float64 moments and ``binning`` exact cell counts (bin edges fixed at the first
    ``update`` unless ``range`` is given); ``ksg`` and ``renyi`` keep a uniform reservoir sample (algorithm R) and
    run the one-shot estimator on it.

    Args:
        method: One of ``MI_METHODS``.
        max_samples: Reservoir size for ``ksg``/``renyi``: an int, ``"auto"`` (the one-shot rule for the dimensions
            of the first batch) or None (keep all). Must stay ``"auto"``/None for ``gaussian`` and ``binning``.
        seed: Seed of the reservoir, the subsample and the jitter.
        **options: The method's options as in :func:`estimate_mi`.

    Example:
        >>> import torch
        >>> from timm_remem.analysis.mi import MutualInformation, estimate_mi
        >>> x = torch.randn(1000, 3)
        >>> y = x + torch.randn(1000, 3)
        >>> metric = MutualInformation(method="gaussian")
        >>> for i in range(0, 1000, 250):
        ...     metric.update(x[i:i + 250], y[i:i + 250])
        >>> abs(metric.compute() - estimate_mi(x, y, method="gaussian")) < 1e-9
        True
    """

    def __init__(self, method: str = "ksg", *, max_samples: int | str | None = "auto", seed: int = 0,
                 **options: Any) -> None:
        for name in ("max_samples", "seed"):
            if name in options:
                raise ConfigError(f"pass `{name}` as its own keyword argument, not inside the options.")
        sampled = method in ("ksg", "renyi")
        extra = {"max_samples": max_samples, "seed": seed} if sampled else {}
        self._opts = _resolve_options(method, {**options, **extra})
        if not sampled and max_samples not in ("auto", None):
            raise ConfigError(
                f"method={method!r} streams exactly and keeps no samples; leave `max_samples` at 'auto' (got "
                f"{max_samples!r}). It applies to 'ksg' and 'renyi'."
            )
        if sampled and max_samples is not None and not isinstance(max_samples, str):
            _check_max_samples(max_samples)
        if method == "binning":
            _check_binning(self._opts)
            _bin_edges(torch.zeros(1, 1), self._opts["range"])  # checks ``range`` now, not at the first update
        self.method = method
        self.max_samples = max_samples
        self.seed = int(seed)
        self.reset()

    def reset(self) -> None:
        """Forget every sample seen (the configuration is kept)."""
        self._n = 0
        self._layout: tuple[Any, ...] | None = None  # (discrete_a, discrete_b, d_a, d_b)
        self._moments: _Moments | None = None
        self._edges: list[Any] | None = None
        self._tables: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_rows = 0
        self._res_a: torch.Tensor | None = None
        self._res_b: torch.Tensor | None = None
        self._capacity: int | None = None
        self._gen = torch.Generator().manual_seed(self.seed + 2)

    @property
    def num_samples(self) -> int:
        """Number of rows passed to ``update`` since the last ``reset``."""
        return self._n

    def _check_layout(self, a: torch.Tensor, da: bool, b: torch.Tensor, db: bool) -> tuple[Any, ...]:
        layout = (da, db, 0 if da else a.shape[1], 0 if db else b.shape[1])
        if self._layout is not None and layout != self._layout:
            def describe(lay: tuple[Any, ...], i: int) -> str:
                return "labels" if lay[i] else f"{lay[i + 2]} float features"

            raise ConfigError(
                f"update() got a: {describe(layout, 0)}, b: {describe(layout, 1)}, but earlier batches had "
                f"a: {describe(self._layout, 0)}, b: {describe(self._layout, 1)}; every batch must have the same "
                "columns and dtypes (call reset() to start over)."
            )
        return layout

    def update(self, a: Any, b: Any) -> None:
        """Add a batch of paired samples (shapes and dtypes as in :func:`estimate_mi`; an empty batch is ignored)."""
        with _cpu_workers():
            self._update(a, b)

    def _update(self, a: Any, b: Any) -> None:
        a_t, da = _as_samples(a, "a", allow_empty=True)
        b_t, db = _as_samples(b, "b", allow_empty=True)
        _check_pair(a_t, b_t)
        if a_t.shape[0] == 0:  # an empty last batch is harmless
            return
        a_t, b_t = a_t.cpu(), b_t.cpu()
        layout = self._check_layout(a_t, da, b_t, db)
        first = self._layout is None
        self._layout = layout
        if self.method in ("ksg", "renyi"):
            self._reservoir_update(a_t, b_t, first)
        elif (da and db) or self.method == "binning":
            self._table_update(a_t, b_t, da, db, first)
        else:
            if first:
                self._moments = _Moments()
            if da or db:
                x, labels = (b_t, a_t) if da else (a_t, b_t)
                self._moments.update(x, labels)
            else:
                self._moments.update(torch.cat([a_t.to(torch.float64), b_t.to(torch.float64)], dim=1))
        self._n += a_t.shape[0]

    def _table_update(self, a: torch.Tensor, b: torch.Tensor, da: bool, db: bool, first: bool) -> None:
        bins = self._opts.get("bins", 1)
        if first:
            rng = self._opts.get("range")
            self._edges = [None if d else _bin_edges(x, rng) for x, d in ((a, da), (b, db))]
        rows = torch.stack([a, b], dim=1) if (da and db) else _joint_codes(a, b, da, db, self._edges, bins)
        self._tables.append(_table(rows))
        self._pending_rows += self._tables[-1][0].shape[0]
        if len(self._tables) > 1 and self._pending_rows > max(2 * self._tables[0][0].shape[0], 1 << 16):
            self._merge_tables()

    def _merge_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self._tables) > 1:
            rows = torch.cat([t[0] for t in self._tables])
            counts = torch.cat([t[1] for t in self._tables])
            self._tables = [_table(rows, counts)]
        self._pending_rows = self._tables[0][0].shape[0]
        return self._tables[0]

    def _reservoir_update(self, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
        if first:
            da, db, d_a, d_b = self._layout
            if self.max_samples is None:
                self._capacity = None
            elif self.max_samples == "auto":  # labels count 0 columns for ksg, 1 for renyi (as one-shot)
                dims = d_a + d_b if self.method == "ksg" else d_a + d_b + da + db
                self._capacity = _auto_max_samples(self.method, dims, float(self._opts.get("alpha", 2.0)))
            else:
                self._capacity = int(self.max_samples)
        cap = self._capacity
        nb = a.shape[0]
        held = 0 if self._res_a is None else self._res_a.shape[0]
        fill = nb if cap is None else max(0, min(nb, cap - held))
        if fill:
            self._res_a = a[:fill].clone() if self._res_a is None else torch.cat([self._res_a, a[:fill]])
            self._res_b = b[:fill].clone() if self._res_b is None else torch.cat([self._res_b, b[:fill]])
        if fill == nb:
            return
        # Algorithm R: the t-th item (0-based) replaces slot j ~ U{0..t} when j < capacity.
        t = torch.arange(self._n + fill, self._n + nb, dtype=torch.float64)
        j = torch.floor(torch.rand(t.shape, generator=self._gen, dtype=torch.float64) * (t + 1)).to(torch.int64)
        accept = j < cap
        slots = j[accept]
        src = torch.arange(fill, nb)[accept]
        if slots.numel():
            uniq, inv = torch.unique(slots, return_inverse=True)
            last = torch.full((uniq.numel(),), -1, dtype=torch.int64).scatter_reduce_(0, inv, src, "amax")
            self._res_a[uniq] = a[last]
            self._res_b[uniq] = b[last]

    def compute(self) -> float:
        """Return the MI estimate (nats) for everything seen since the last ``reset``."""
        with _cpu_workers():
            return self._compute()

    def _compute(self) -> float:
        if self._n == 0:
            raise ConfigError("MutualInformation.compute() called before any update(a, b); add data first.")
        da, db, d_a, d_b = self._layout
        if self.method in ("ksg", "renyi"):
            opts = dict(self._opts)
            opts["max_samples"] = None
            estimator = ksg.estimate if self.method == "ksg" else renyi.estimate
            return estimator(self._res_a, self._res_b, da, db, opts)
        if self._tables:
            rows, counts = self._merge_tables()
            correction = self._opts.get("correction")
            if self.method == "binning" and not (da and db) and int(counts.sum()) < 2:
                raise ConfigError(f"method='binning' needs at least 2 samples; got n={int(counts.sum())}.")
            return _plugin_from_table(rows, counts, 1 if da else d_a, correction)
        mom = self._moments
        if da or db:
            n_classes = int(mom.labels.numel())
            _check_gaussian_n(mom.n, d_b if da else d_a, None, n_classes)
            return _gaussian_from_moments(mom, None, float(self._opts["ridge"]))
        _check_gaussian_n(mom.n, d_a, d_b)
        return _gaussian_from_moments(mom, d_a, float(self._opts["ridge"]))

    def __repr__(self) -> str:
        return f"MutualInformation(method={self.method!r}, max_samples={self.max_samples!r}, n={self._n})"
