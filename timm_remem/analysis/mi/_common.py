"""What every MI estimator shares: the method table, input checks, option resolution, subsampling, and the CPU
worker pool behind the estimators' parallel loops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from ..._validation import check_int
from ...errors import ConfigError

MI_METHODS: tuple[str, ...] = ("gaussian", "ksg", "binning", "renyi")
"""Names accepted by ``method=`` in :func:`estimate_mi` and :class:`MutualInformation`."""

# Work budgets behind ``max_samples="auto"``: the k-NN estimator costs about m^2 * (d_a + d_b + 8) element
# operations, the alpha=2 Renyi estimator about m^2 * (d_a + d_b + 16) (matrix products plus exponentials); these
# budgets keep n=10,000, d=192 per side under two seconds on two (shared) CPU cores and use every sample when d is
# small.
_KSG_BUDGET = 2.0e9
_RENYI_BUDGET = 4.0e9
_RENYI_EIG_SAMPLES = 1000  # alpha != 2 needs an O(m^3) eigendecomposition of three m x m matrices
_CHUNK_ELEMENTS = 1 << 18  # rows per chunk = this / n for the [chunk, n] distance blocks

_OPTIONS: dict[str, dict[str, Any]] = {
    "gaussian": {"ridge": 1e-6},
    "ksg": {"k": 3, "max_samples": "auto", "seed": 0, "noise": 1e-6, "standardize": True, "chunk_size": None},
    "binning": {"bins": 30, "range": None, "correction": None},
    "renyi": {"alpha": 2.0, "sigma": "median", "max_samples": "auto", "seed": 0, "standardize": True,
              "chunk_size": None},
}


def _as_samples(x: Any, name: str, allow_empty: bool = False) -> tuple[torch.Tensor, bool]:
    """Validate one side and return ``(tensor, discrete)``: ``[n, d]`` float or ``[n]`` int64 labels."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ConfigError(
                f"`{name}` must be a torch tensor or NumPy array of shape [n, d] (features) or [n] (integer "
                f"labels); got {type(x).__name__} that torch.as_tensor cannot convert ({err})."
            ) from err
    x = x.detach()
    if x.is_complex():
        raise ConfigError(f"`{name}` is complex ({x.dtype}); pass real features, e.g. torch.view_as_real({name}).")
    if x.ndim not in (1, 2):
        raise ConfigError(
            f"`{name}` must have shape [n, d] (features) or [n] (labels); got shape {tuple(x.shape)}. "
            f"Flatten per-sample features first, e.g. `{name}.flatten(1)`."
        )
    if x.shape[0] == 0 and not allow_empty:
        raise ConfigError(f"`{name}` has no samples (shape {tuple(x.shape)}); pass at least a few rows.")
    if not x.is_floating_point():  # integer or bool: discrete labels
        if x.ndim == 2:
            if x.shape[1] != 1:
                raise ConfigError(
                    f"`{name}` is an integer tensor of shape {tuple(x.shape)}; integer input means [n] class "
                    f"labels. Pass `{name}.float()` for continuous features, or combine the columns into one "
                    f"label per row (e.g. torch.unique({name}, dim=0, return_inverse=True)[1])."
                )
            x = x[:, 0]
        return x.to(torch.int64), True
    if x.ndim == 1:
        x = x[:, None]
    if x.shape[1] == 0:
        raise ConfigError(f"`{name}` has zero feature columns (shape {tuple(x.shape)}); pass at least one.")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise ConfigError(
            f"`{name}` has NaN or inf in {bad.numel()} of {x.shape[0]} rows (first bad row: {int(bad[0])}); drop "
            f"those rows from both inputs (e.g. keep = torch.isfinite({name}).all(1)) or impute them first."
        )
    return x, False


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape[0] != b.shape[0]:
        raise ConfigError(
            f"`a` and `b` must have the same number of samples (rows); got {a.shape[0]} and {b.shape[0]}. "
            "Pair each input with its own feature/label row."
        )


def _resolve_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The method's defaults updated with ``options``; an unknown method or option raises ``ConfigError``."""
    if method not in _OPTIONS:
        raise ConfigError(f"unknown MI method {method!r}; choose one of {list(MI_METHODS)}.")
    allowed = _OPTIONS[method]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"unexpected option(s) {unknown} for method={method!r}; it accepts {sorted(allowed)}.")
    return {**allowed, **options}


def _check_max_samples(value: Any) -> int:
    return check_int("max_samples", value, low=2, hint="pass 'auto', None (every sample) or an integer >= 2")


def _auto_max_samples(method: str, dims: int, alpha: float = 2.0) -> int:
    """The sample count behind ``max_samples="auto"``, one-shot and streaming.

    ``dims``: for ``ksg`` the continuous columns (labels count 0); for ``renyi`` every column, a label side counting 1.
    """
    if method == "ksg":
        return int(math.sqrt(_KSG_BUDGET / (dims + 8)))
    if alpha == 2.0:
        return int(math.sqrt(_RENYI_BUDGET / (dims + 16)))
    return _RENYI_EIG_SAMPLES


def _resolve_max_samples(value: Any, n: int, auto: Callable[[], int]) -> int:
    if value is None:
        return n
    if isinstance(value, str):
        if value != "auto":
            raise ConfigError(f"`max_samples` must be 'auto', None or an integer >= 2; got {value!r}.")
        return min(n, auto())
    return min(n, _check_max_samples(value))


def _subsample(a: torch.Tensor, b: torch.Tensor, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = a.shape[0]
    if m >= n:
        return a, b
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n, generator=gen)[:m].sort().values.to(a.device)
    return a[idx], b[idx]


def _standardize(x: torch.Tensor) -> torch.Tensor:
    """Z-score every column in float64 (constant columns become 0)."""
    x = x.to(torch.float64)
    x = x - x.mean(dim=0)
    std = x.pow(2).mean(dim=0).sqrt()
    return x / torch.where(std > 0, std, torch.ones_like(std))


def _chunk_rows(n: int, chunk_size: Any) -> int:
    if chunk_size is None:
        return max(1, min(n, _CHUNK_ELEMENTS // max(n, 1)))
    return check_int("chunk_size", chunk_size, low=1, hint="or None (automatic)")


_WORKERS: ContextVar[int | None] = ContextVar("_timm_remem_mi_workers", default=None)


@contextmanager
def _cpu_workers() -> Iterator[int]:
    """Single-threaded torch ops inside the block; yields how many worker threads (``torch.get_num_threads()``) to use.

    Why: each intra-op-parallel op ends in a thread barrier, and on a shared, oversubscribed machine those barriers
    made the estimators' many small ops 10-20x slower than one thread; worker threads never wait for each other.
    """
    current = _WORKERS.get()
    if current is not None:  # already inside an estimator call
        yield current
        return
    prev = torch.get_num_threads()
    token = _WORKERS.set(prev)
    if prev > 1:
        torch.set_num_threads(1)
    try:
        yield prev
    finally:
        if prev > 1:
            torch.set_num_threads(prev)
        _WORKERS.reset(token)


def _parallel_map(fn: Callable[..., Any], items: list[tuple[Any, ...]], device: torch.device) -> list[Any]:
    """``[fn(*item) for item in items]``, spread over the worker threads on CPU; results in item order."""
    if device.type != "cpu":
        return [fn(*item) for item in items]
    with _cpu_workers() as workers:
        if workers <= 1 or len(items) <= 1:
            return [fn(*item) for item in items]
        with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
            return list(pool.map(lambda item: fn(*item), items))


def _map_row_blocks(n: int, chunk: int, work: Callable[[int, int], Any], device: torch.device) -> list[Any]:
    """Run ``work(i0, i1)`` over row blocks of ``range(n)`` in parallel; results in block order."""
    return _parallel_map(work, [(i0, min(n, i0 + chunk)) for i0 in range(0, n, chunk)], device)
