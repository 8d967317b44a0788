"""The pass machinery of SAM's two passes: RNG replay, frozen BatchNorm statistics, DDP ``no_sync``.

The perturbed pass draws the same dropout masks as the first (``capture_rng`` / ``restore_rng``), leaves the
BatchNorm running statistics as they were (``frozen_running_stats``), and under DDP the first pass skips the
gradient all-reduce (``no_sync``). Without a model, the modules concerned are found through a temporary global
forward pre-hook.

Example:
    >>> import torch
    >>> from timm_remem.sam.passes import capture_rng, frozen_running_stats, restore_rng
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5))
    >>> x = torch.randn(8, 4)
    >>> state = capture_rng()
    >>> first = model(x)
    >>> restore_rng(state)
    >>> with frozen_running_stats(model):
    ...     second = model(x)
    >>> torch.equal(first, second), int(model[1].num_batches_tracked)
    (True, 1)
"""

from __future__ import annotations

import contextlib
import functools
import operator
import weakref
from collections.abc import Iterator, MutableMapping
from typing import Any

import torch
from torch import nn

try:
    from torch.nn.parallel import DistributedDataParallel
except ImportError:  # pragma: no cover - builds without torch.distributed
    DistributedDataParallel = None

__all__ = ["RNGState", "capture_rng", "restore_rng", "has_running_stats", "modules_with_running_stats", "no_sync",
           "frozen_running_stats"]

# The CPU generator state and, when CUDA is initialised, the state of every CUDA generator.
RNGState = tuple[torch.Tensor, list[torch.Tensor] | None]


def capture_rng() -> RNGState:
    """Record the global RNG state (CPU, and every CUDA device once CUDA is initialised) for ``restore_rng``."""
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return torch.get_rng_state(), cuda


def restore_rng(state: RNGState) -> None:
    """Restore a state from ``capture_rng``, so the next random draws repeat those made after the capture."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def has_running_stats(module: nn.Module) -> bool:
    """Whether a module's buffers change in a training-mode forward: BatchNorm / InstanceNorm with
    ``track_running_stats``, or a ``running_mean`` / ``running_var`` tensor.

    Example:
        >>> import torch
        >>> has_running_stats(torch.nn.BatchNorm2d(3)), has_running_stats(torch.nn.LayerNorm(3))
        (True, False)
    """
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return module.track_running_stats
    return isinstance(getattr(module, "running_mean", None), torch.Tensor) or isinstance(
        getattr(module, "running_var", None), torch.Tensor
    )


def _may_have_running_stats(module: nn.Module) -> bool:
    # Norm layers qualify whatever their track_running_stats is today (checked again at each use).
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return True
    return has_running_stats(module)


_NOT_NONE = functools.partial(operator.is_not, None)
_BUFFERS = operator.attrgetter("_buffers")


def _tree(model: nn.Module) -> list[nn.Module]:
    """Every module inside ``model`` (itself first), breadth-first; a shared module once per place it appears, its
    children once (so that a module graph with a cycle ends, as in ``model.modules()``)."""
    out = [model]
    expanded: set[int] = set()
    for module in out:  # the list grows as it is walked
        children = module._modules
        if children and id(module) not in expanded:
            expanded.add(id(module))
            out.extend(filter(_NOT_NONE, children.values()))
    return out


class _Scan:
    """The modules of one model that may have running statistics, valid while its module tree is unchanged: the
    signature (every module's identity and buffer count) is the same and no module of the tree was collected."""

    __slots__ = ("signature", "valid", "_refs", "_found")

    def __init__(self, tree: list[nn.Module], signature: tuple[Any, ...]) -> None:
        self.signature = signature
        self.valid = True
        self._refs = [weakref.ref(m, self._stale) for m in tree]
        unique = {id(m): m for m in tree}.values()
        self._found = [weakref.ref(m) for m in unique if _may_have_running_stats(m)]

    def _stale(self, _ref: Any) -> None:
        self.valid = False

    def modules(self) -> list[nn.Module]:
        return [m for ref in self._found if (m := ref()) is not None]


# One scan per model, held weakly: a model that is collected takes its scan with it.
_SCANS: weakref.WeakKeyDictionary[nn.Module, _Scan] = weakref.WeakKeyDictionary()


def modules_with_running_stats(model: nn.Module) -> list[nn.Module]:
    """The modules inside ``model`` that may have running statistics (BatchNorm-like), found once per module tree.

    The walk is remembered per model (weakly) and redone when a module is added, removed or replaced anywhere
    inside, or a buffer registered: checking costs a walk over ``_modules`` (40 to 50 us for a ViT-Ti) instead of a
    ``has_running_stats`` test of every module (about 0.8 ms). Whether each one tracks statistics now
    (``track_running_stats``, training mode) is for the caller to check.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        >>> [type(m).__name__ for m in modules_with_running_stats(model)]
        ['BatchNorm1d']
        >>> _ = model.append(torch.nn.BatchNorm1d(4))  # the tree changed: found again
        >>> len(modules_with_running_stats(model))
        2
    """
    tree = _tree(model)
    signature = (tuple(map(id, tree)), tuple(map(len, map(_BUFFERS, tree))))
    try:
        scan = _SCANS.get(model)
    except TypeError:  # a model class that is not hashable: no cache
        return _Scan(tree, signature).modules()
    if scan is None or not scan.valid or scan.signature != signature:
        scan = _Scan(tree, signature)
        _SCANS[model] = scan
    return scan.modules()


@contextlib.contextmanager
def no_sync(model: nn.Module | None = None) -> Iterator[None]:
    """Skip DDP's gradient all-reduce for the backward passes inside the context.

    Uses ``model.no_sync()`` when the model has one (DDP, FSDP); otherwise switches off
    ``require_backward_grad_sync`` on every DDP module inside ``model`` (or, with no model, on every DDP module that
    runs a forward inside the context) until the context exits.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)  # not distributed: the context changes nothing
        >>> with no_sync(model):
        ...     model(torch.ones(2, 3)).sum().backward()
    """
    if model is not None:
        model_no_sync = getattr(model, "no_sync", None)
        if callable(model_no_sync):
            with model_no_sync():
                yield
            return
    if DistributedDataParallel is None:  # pragma: no cover - builds without torch.distributed
        yield
        return
    switched: list[nn.Module] = []

    def switch(module: nn.Module) -> None:
        if isinstance(module, DistributedDataParallel) and module.require_backward_grad_sync:
            module.require_backward_grad_sync = False
            switched.append(module)

    try:
        if model is not None:
            for module in model.modules():
                switch(module)
            yield
        else:
            with nn.modules.module.register_module_forward_pre_hook(lambda module, args: switch(module)):
                yield
    finally:
        for module in switched:
            module.require_backward_grad_sync = True

@contextlib.contextmanager
def frozen_running_stats(
    model: nn.Module | None = None,
    cache: MutableMapping[nn.Module, list[torch.Tensor]] | None = None,
) -> Iterator[None]:
    """Keep the running statistics of BatchNorm-like modules exactly as they are on entry.

    The buffers of every module in training mode with running statistics inside ``model`` (or, with no model, that
    runs a forward inside the context) are copied on entry (or at its first forward) and back at exit, also when an
    exception leaves the context. The forward itself still normalises with the batch statistics.

    Args:
        model: The model, or None to find the modules through a temporary global forward pre-hook (pass the model
            with ``torch.compile``, whose graphs do not call module hooks).
        cache: Copies kept between calls, keyed by module (weakly, if it is a ``weakref.WeakKeyDictionary``), so that
            nothing is allocated after the first call. None: fresh copies each call.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> with frozen_running_stats(bn):
        ...     _ = bn(torch.randn(4, 2))
        >>> bn.running_mean.tolist(), int(bn.num_batches_tracked)
        ([0.0, 0.0], 0)
    """
    cache = weakref.WeakKeyDictionary() if cache is None else cache
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen: set[int] = set()

    def visit(module: nn.Module) -> None:
        if id(module) in seen or not module.training or not has_running_stats(module):
            return
        seen.add(id(module))
        buffers = list(module.buffers(recurse=False))
        copies = cache.get(module)
        if copies is None or len(copies) != len(buffers) or any(
            (c.shape, c.dtype, c.device) != (b.shape, b.dtype, b.device) for c, b in zip(copies, buffers, strict=True)
        ):
            copies = [torch.empty_like(b) for b in buffers]
            cache[module] = copies
        for buf, copy in zip(buffers, copies, strict=True):
            copy.copy_(buf)
            saved.append((buf, copy))

    try:
        if model is not None:
            with torch.no_grad():
                for module in modules_with_running_stats(model):
                    visit(module)
            yield
        else:
            with nn.modules.module.register_module_forward_pre_hook(lambda module, args: visit(module)):
                yield
    finally:
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)
