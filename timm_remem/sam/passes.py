"""The pass machinery of a two-pass optimizer: RNG replay, frozen BatchNorm statistics, DDP ``no_sync``.

SAM runs forward and backward twice per step. The second (perturbed) pass should draw the same dropout and
drop-path masks as the first (``capture_rng`` / ``restore_rng``), must not advance the BatchNorm running statistics a
second time (``frozen_running_stats``), and under DDP the first pass skips the gradient all-reduce so that each
replica perturbs by its own gradient (``no_sync``). ``SAM.first_pass`` and ``SAM.second_pass`` are built from these.

When no model is given, the modules concerned (DDP wrappers, BatchNorm layers) are found through a temporary global
forward pre-hook that is removed when the context exits. When a model is given, its BatchNorm-like modules are found
once and remembered (weakly, per model) until its module tree changes (``modules_with_running_stats``).

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
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import torch
from torch import nn

try:
    from torch.nn.parallel import DistributedDataParallel
except ImportError:  # pragma: no cover - builds without torch.distributed
    DistributedDataParallel = None

__all__ = [
    "RNGState",
    "capture_rng",
    "restore_rng",
    "has_running_stats",
    "modules_with_running_stats",
    "no_sync",
    "frozen_running_stats",
]

# The CPU generator state and, when CUDA is initialised, the state of every CUDA generator.
RNGState = tuple[torch.Tensor, list[torch.Tensor] | None]


def capture_rng() -> RNGState:
    """Record the global RNG state (CPU, and every CUDA device once CUDA is initialised).

    Returns:
        The state, for ``restore_rng``.

    Example:
        >>> import torch
        >>> state = capture_rng()
        >>> a = torch.rand(3)
        >>> restore_rng(state)
        >>> torch.equal(torch.rand(3), a)
        True
    """
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return torch.get_rng_state(), cuda


def restore_rng(state: RNGState) -> None:
    """Restore a state from ``capture_rng``, so the next random draws repeat those made after the capture.

    Args:
        state: The value returned by ``capture_rng``.

    Example:
        >>> import torch
        >>> state = capture_rng()
        >>> mask = torch.nn.functional.dropout(torch.ones(6), 0.5)
        >>> restore_rng(state)
        >>> torch.equal(torch.nn.functional.dropout(torch.ones(6), 0.5), mask)
        True
    """
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def has_running_stats(module: nn.Module) -> bool:
    """Whether a module's buffers change in a training-mode forward (BatchNorm-like running statistics).

    Args:
        module: Any module; BatchNorm / InstanceNorm with ``track_running_stats`` and modules with a
            ``running_mean`` or ``running_var`` tensor count.

    Example:
        >>> import torch
        >>> has_running_stats(torch.nn.BatchNorm2d(3)), has_running_stats(torch.nn.LayerNorm(3))
        (True, False)
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.track_running_stats
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
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
    """The modules of one model that may have running statistics, valid while its module tree is unchanged.

    The signature is the identity of every module in the tree and the number of buffers each holds: adding,
    removing or replacing a module anywhere, or registering a buffer, changes it. A module of the scanned tree
    that is garbage-collected marks the scan stale (its id could be reused by a new module).
    """

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

    The walk that finds them is remembered per model (weakly) and redone when the tree changes: a module added,
    removed or replaced anywhere inside, or a buffer registered. Checking costs a walk over ``_modules`` (40 to
    50 us for a ViT-Ti) instead of a ``has_running_stats`` test of every module (about 0.8 ms). Whether each one
    currently tracks statistics (``track_running_stats``, training mode) is for the caller to check.

    Args:
        model: The model.

    Returns:
        The BatchNorm / InstanceNorm modules (whatever their ``track_running_stats``) and the other modules with a
        ``running_mean`` or ``running_var`` tensor, each once.

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
def _global_forward_pre_hook(fn: Callable[[nn.Module, Any], None]) -> Iterator[None]:
    handle = nn.modules.module.register_module_forward_pre_hook(fn)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def no_sync(model: nn.Module | None = None) -> Iterator[None]:
    """Skip DDP's gradient all-reduce for the backward passes inside the context.

    Uses ``model.no_sync()`` when the model has one (DDP, FSDP); otherwise switches off
    ``require_backward_grad_sync`` on every DDP module inside ``model`` (or, with no model, on every DDP module that
    runs a forward inside the context) and switches it back on at exit, also when an exception leaves the context.

    Args:
        model: The (DDP-wrapped) model, or None to find DDP modules through a temporary global forward pre-hook.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)  # not distributed: the context changes nothing
        >>> with no_sync(model):
        ...     model(torch.ones(2, 3)).sum().backward()
        >>> model.weight.grad.shape
        torch.Size([1, 3])
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
        if module.require_backward_grad_sync:
            module.require_backward_grad_sync = False
            switched.append(module)

    try:
        if model is not None:
            for module in model.modules():
                if isinstance(module, DistributedDataParallel):
                    switch(module)
            yield
        else:

            def hook(module: nn.Module, args: Any) -> None:
                if isinstance(module, DistributedDataParallel):
                    switch(module)

            with _global_forward_pre_hook(hook):
                yield
    finally:
        for module in switched:
            module.require_backward_grad_sync = True


def _save_buffers(
    module: nn.Module,
    cache: MutableMapping[nn.Module, list[torch.Tensor]],
    saved: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
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


@contextlib.contextmanager
def frozen_running_stats(
    model: nn.Module | None = None,
    cache: MutableMapping[nn.Module, list[torch.Tensor]] | None = None,
) -> Iterator[None]:
    """Keep the running statistics of BatchNorm-like modules exactly as they are on entry.

    Every module in training mode with running statistics (see ``has_running_stats``) that is inside ``model`` (found
    through ``modules_with_running_stats``, remembered while the module tree is unchanged), or, with no model, that
    runs a forward inside the context, has its buffers (``running_mean``, ``running_var``,
    ``num_batches_tracked``, ...) copied on entry (or at its first forward) and copied back at exit, also when an
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
        _save_buffers(module, cache, saved)

    try:
        with torch.no_grad():
            if model is not None:
                for module in modules_with_running_stats(model):
                    visit(module)
        if model is not None:
            yield
        else:
            with _global_forward_pre_hook(lambda module, args: visit(module)):
                yield
    finally:
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)
