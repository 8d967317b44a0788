"""Private: the hooks through which a one-pass SAM sees a training loop that only calls ``step()``.

- **roots**: the outermost modules whose forward uses the optimizer's parameters. A root's forward pre-hook perturbs
  in a training forward (training mode, gradients enabled) and restores otherwise; its forward hook restores when
  the forward raised; state-dict hooks on the root and on every module owning a parameter restore before anything
  is read out or loaded in.
- **parameters**: a post-accumulate-grad hook restores each parameter as soon as its gradient is complete.
- **discovery**: given parameters only, a process-wide forward pre-hook finds the roots; it lives until the end of
  the first ``step()`` after a root was found and looks at each module once.

Every hook holds the optimizer weakly and runs eagerly under ``torch.compile`` (dynamo cannot trace the swaps).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["Attachment"]


class _Owner(Protocol):  # what the attachment calls back (OnePassSAM)
    def _on_training_forward(self) -> None: ...
    def _on_other_forward(self) -> None: ...
    def _end_visit(self) -> None: ...
    def restore(self) -> None: ...
    def _on_load(self) -> None: ...
    def _on_grad_ready(self, param: torch.Tensor) -> None: ...


def _is_training_forward(module: nn.Module) -> bool:
    return module.training and torch.is_grad_enabled()


class Attachment:
    """The hooks of one optimizer (held weakly): its roots, its parameters' hooks and, until the roots are known,
    discovery (when no ``model`` was given)."""

    def __init__(self, owner: _Owner, params: Iterable[torch.Tensor], model: nn.Module | None) -> None:
        self._owner = weakref.ref(owner)
        self._params: set[torch.Tensor] = set(params)
        self._handles: list[Any] = []  # every handle but discovery's
        self._hooked_params: set[torch.Tensor] = set()
        self._covered: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # roots and everything inside them
        self._foreign: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # seen, and none of our parameters inside
        self.roots: list[weakref.ReferenceType[nn.Module]] = []
        self._discovery: Any = None
        self._finalizer = weakref.finalize(owner, _remove_handles, self._handles)
        if model is not None:
            self.add_root(model)
        else:
            self._discovery = nn.modules.module.register_module_forward_pre_hook(self._make_discovery_hook())
            self._handles.append(self._discovery)

    @property
    def discovering(self) -> bool:
        """Whether the process-wide discovery hook is still installed."""
        return self._discovery is not None

    def add_params(self, params: Iterable[torch.Tensor]) -> None:
        """Parameters added to the optimizer later (``add_param_group``), or trainable since they were hooked."""
        new = [p for p in params if p not in self._hooked_params]  # every training forward asks: mostly none
        if not new:
            return
        self._params.update(new)
        if self.roots:
            self._hook_params(new)

    def add_root(self, module: nn.Module) -> None:
        """Watch ``module`` as a root: perturb before its training forwards, restore around everything else."""
        if module in self._covered:
            return
        self.roots.append(weakref.ref(module))
        owner = self._owner
        self._handles.append(module.register_forward_pre_hook(_Hook(owner, _before_forward)))
        self._handles.append(module.register_forward_hook(_Hook(owner, _after_forward), always_call=True))
        restore = _Hook(owner, lambda o, *_: o.restore())
        loaded = _Hook(owner, lambda o, *_: o._on_load())
        for sub in module.modules():
            self._covered.add(sub)
            if sub is module or any(p in self._params for p in sub.parameters(recurse=False)):
                # w before anything is read out or loaded in (a load into w + e would be undone by the restore)
                self._handles.append(sub.register_state_dict_pre_hook(restore))
                self._handles.append(sub.register_load_state_dict_pre_hook(restore))
                self._handles.append(sub.register_load_state_dict_post_hook(loaded))
        self._hook_params(self._params)

    def _hook_params(self, params: Iterable[torch.Tensor]) -> None:
        grad_ready = _Hook(self._owner, lambda o, param: o._on_grad_ready(param))
        for p in params:
            if p not in self._hooked_params and p.requires_grad:
                self._hooked_params.add(p)
                self._handles.append(p.register_post_accumulate_grad_hook(grad_ready))

    def end_discovery(self) -> None:
        """Remove the process-wide hook, once a full step has run with the roots known."""
        if self._discovery is not None and self.roots:
            self._discovery.remove()
            self._discovery = None

    def _make_discovery_hook(self) -> Callable[[nn.Module, Any], None]:
        attachment_ref = weakref.ref(self)

        @torch.compiler.disable
        def discover(module: nn.Module, args: Any) -> None:
            attachment = attachment_ref()
            if attachment is None or not _is_training_forward(module):
                return
            if module in attachment._covered or module in attachment._foreign:
                return
            if not any(p in attachment._params for p in module.parameters()):
                attachment._foreign.add(module)
                return
            # The first training forward that reaches our parameters runs here before any of its children, so this
            # is the outermost such module. Its own pre-hook, added now, starts with its next call: act for this one.
            attachment.add_root(module)
            owner = attachment._owner()
            if owner is not None:
                owner._on_training_forward()

        return discover

    def remove(self) -> None:
        """Remove every hook (the optimizer stops watching the loop)."""
        _remove_handles(self._handles)
        self._discovery = None
        self.roots.clear()
        self._hooked_params.clear()
        self._covered = weakref.WeakSet()


class _Hook:
    """Calls ``fn(optimizer, *args)`` while its optimizer lives; a deep-copied (``ModelEmaV3``) or pickled model's
    copies of it are inert, so a copy never acts on the optimizer of the original."""

    __slots__ = ("_owner", "_fn")

    def __init__(self, owner: weakref.ReferenceType | None, fn: Callable[..., None] | None) -> None:
        self._owner, self._fn = owner, fn

    @torch.compiler.disable
    def __call__(self, *args: Any) -> None:
        owner = self._owner() if self._owner is not None else None
        if owner is not None:
            self._fn(owner, *args)

    def __deepcopy__(self, memo: dict) -> _Hook:
        return _Hook(None, None)

    def __reduce__(self) -> tuple:
        return _Hook, (None, None)


def _before_forward(owner: _Owner, module: nn.Module, args: Any) -> None:
    if _is_training_forward(module):
        owner._on_training_forward()
    else:
        owner._on_other_forward()


def _after_forward(owner: _Owner, module: nn.Module, args: Any, output: Any) -> None:
    owner._end_visit()  # an eval / no_grad forward ran at w inside a training step: back to w + e
    if sys.exc_info()[0] is not None:  # the forward raised: w, whatever comes next
        owner.restore()


def _remove_handles(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
