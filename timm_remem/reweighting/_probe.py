"""The forward-pass probe behind :func:`~timm_remem.reweighting.find_branches` (private to the room).

One eval-mode pass at batch 1 follows the MLP's output to the residual add; a normalisation layer on the way
(post-norm blocks: Swin V2, ``vit_*_rpn``, EVA post-norm) would undo a scale on the MLP, so the branch moves after it.
Two more passes zero a branch: an "mlp" that then returns its input holds its own residual (the branch moves to the
child computing the main path); a block that then becomes the identity is ConvNeXt-style (dropped). No pass touches
the global RNG.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._models import _cfg, _cfg_input_size, model_input_size
from .._peft import is_tuner_layer
from ..errors import UnsupportedModelError
from .layer import is_foldable, is_norm

if TYPE_CHECKING:
    from .branches import Branch

__all__ = ["descend_self_residual", "drop_whole_branch_blocks", "probe", "probe_any_size", "probe_inputs", "resolve"]

# Layers that are per-channel linear, so a scale commutes with them (the path from an MLP to its residual add).
_TRANSPARENT = re.compile(r"^(Identity|Dropout\w*|DropPath\w*|\w*LayerScale\w*|Scale\w*)$")


@dataclass
class Event:
    """One module call seen by the probe: the module, its tensor arguments and its output."""

    module: nn.Module
    tensors: tuple[torch.Tensor, ...]
    output: Any


def probe(model: nn.Module, candidates: list[Branch], inputs: torch.Tensor):
    """Run one forward with hooks on every block and its descendants; return the events and block spans."""
    modules = dict(model.named_modules())
    events: list[Event] = []
    spans: dict[str, list[int]] = {}
    handles = []
    hooked: set[int] = set()

    def record(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        tensors = tuple(t for t in itertools.chain(args, kwargs.values()) if isinstance(t, torch.Tensor))
        events.append(Event(mod, tensors, output))

    def span_hooks(block_path: str):
        def pre(*_: Any) -> None:
            spans.setdefault(block_path, [len(events), -1])

        def post(*_: Any) -> None:
            if spans[block_path][1] < 0:
                spans[block_path][1] = len(events)

        return pre, post

    try:
        for block_path in dict.fromkeys(c.block_path for c in candidates):
            block = modules[block_path]
            pre, post = span_hooks(block_path)
            handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
            for sub in block.modules():
                if sub is not block and id(sub) not in hooked:
                    hooked.add(id(sub))
                    handles.append(sub.register_forward_hook(record, with_kwargs=True))
        with torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
    return events, spans


def probe_any_size(model: nn.Module, candidates: list[Branch], example_inputs: torch.Tensor | None):
    """Probe with the model's own image size; models that do not record it are tried at common sizes."""
    first = probe_inputs(model, example_inputs)
    if example_inputs is not None:
        return (first, *probe(model, candidates, first))
    own = tuple(first.shape[1:])
    cfg_size = _cfg_input_size(_cfg(model))
    chans = dict.fromkeys((first.shape[1], int(cfg_size[0]) if cfg_size else 3, 3))
    sides = (first.shape[2], 224, 256, 384, 192, 160, 128, 112, 96, 64, 56, 32, 28)
    tried = list(dict.fromkeys([own, *((c, side, side) for c, side in itertools.product(chans, sides))]))
    failure = None
    for size in tried:
        inputs = first if size == own else torch.randn((1, *size), generator=torch.Generator().manual_seed(0)).to(first)
        try:
            return (inputs, *probe(model, candidates, inputs))
        except Exception as error:  # noqa: BLE001 - wrong guess of the input size; try the next one
            failure = failure if failure is not None else error
    raise UnsupportedModelError(
        f"could not run {type(model).__name__} to find its blocks (tried input sizes {tried}; first error: "
        f"{type(failure).__name__}: {failure}). Pass example_inputs=torch.randn(1, C, H, W) with the size the "
        "model expects."
    ) from failure


def resolve(model: nn.Module, candidates: list[Branch], events: list[Event], spans: dict[str, list[int]]):
    """Order blocks by first call, and move each branch to the post-norm that follows its MLP, if any."""
    ran = [c for c in candidates if c.block_path in spans and spans[c.block_path][1] >= 0]
    order = sorted(dict.fromkeys(c.block_path for c in ran), key=lambda p: spans[p][0])
    index = {p: i for i, p in enumerate(order)}
    paths: dict[int, list[str]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(mod), []).append(path)
    branches = []
    for cand in ran:
        start, end = spans[cand.block_path]
        calls = [i for i in range(start, end) if events[i].module is cand.module]
        if not calls:
            continue
        inside = {id(m) for m in cand.module.modules()}
        target = cand.module
        if cand.columns is None:
            targets = {id(t): t for t in (follow_to_post_norm(events, i, end, inside, cand.module) for i in calls)}
            if len(targets) > 1:
                raise UnsupportedModelError(
                    f"{type(model).__name__}: the branch {cand.path} is followed by different normalisation "
                    "layers on different calls; timm-remem cannot place one scale for it."
                )
            target = next(iter(targets.values()))
        fold_path = fold_path_of(target, events, calls[0]) if target is cand.module else ""
        target_paths = tuple(paths[id(target)])
        branches.append(
            dataclasses.replace(cand, index=index[cand.block_path], path=target_paths[0], module=target,
                                aliases=target_paths, fold_path=fold_path,
                                kind=cand.kind if target is cand.module else "post-norm")
        )
    branches.sort(key=lambda b: (b.index, spans[b.block_path][0]))
    return branches


def follow_to_post_norm(events: list[Event], call: int, end: int, inside: set[int], mlp: nn.Module) -> nn.Module:
    """Follow the MLP's output through the modules that consume it; return the last normalisation on the way."""
    tracked = {id(events[call].output)}
    keep = [events[call].output]  # keep tensors alive so their ids stay unique
    target = mlp
    for ev in events[call + 1:end]:
        if id(ev.module) in inside or not any(id(t) in tracked for t in ev.tensors):
            continue
        if not (is_norm(ev.module) or _TRANSPARENT.match(type(ev.module).__name__)):
            continue  # a layer that is not per-channel linear: the branch ended before it (residual add)
        if isinstance(ev.output, torch.Tensor):
            tracked.add(id(ev.output))
            keep.append(ev.output)
        if is_norm(ev.module):
            target = ev.module
    return target


def fold_path_of(module: nn.Module, events: list[Event], call: int) -> str:
    """Path (relative to ``module``) of the last parameterised leaf that ran inside it: the layer to fold into."""
    if is_foldable(module) and not list(module.children()):
        return ""
    names = {id(m): n for n, m in module.named_modules()}
    last = ""
    for ev in reversed(events[:call]):
        if id(ev.module) not in names:
            break
        leaf = not list(ev.module.children())
        if leaf and any(True for _ in ev.module.parameters(recurse=False)):
            last = names[id(ev.module)]
            break
    return outer_tuner_layer(module, last)


def outer_tuner_layer(module: nn.Module, path: str) -> str:
    """``path``, or the outermost peft layer above it (``fc2`` for ``fc2.lora_B.default``): the layer to fold into."""
    parts = path.split(".") if path else []
    for cut in range(1, len(parts) + 1):
        if is_tuner_layer(module.get_submodule(".".join(parts[:cut]))):
            return ".".join(parts[:cut])
    return path


def descend_self_residual(model: nn.Module, branches: list[Branch], inputs: torch.Tensor) -> list[Branch] | None:
    """Replace an "mlp" that adds its own input (``x + main(x)``, e.g. LowFormer) by the child computing ``main``.

    Zeroing the branch's last affine layer turns such a module into the identity, which a real MLP never is.
    Returns the new candidate list, or ``None`` when no branch holds its own residual.
    """
    io: dict[int, tuple] = {}
    handles = []
    probed = [b for b in branches if b.columns is None and b.fold_path]
    try:
        for b in probed:
            handles.append(b.module.get_submodule(b.fold_path).register_forward_hook(lambda m, a, out: out * 0))
            handles.append(b.module.register_forward_hook(recorder(io, id(b.module))))
        if not handles:
            return None
        with torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
    changed = False
    result = []
    for b in branches:
        args, out = io.get(id(b.module), ((), None))
        if b in probed and same_tensor(args, out):
            child = b.fold_path.split(".")[0]
            b = dataclasses.replace(b, index=-1, path=f"{b.path}.{child}", module=b.module.get_submodule(child),
                                    aliases=tuple(f"{a}.{child}" for a in b.aliases), columns=None, fold_path="",
                                    kind="output")
            changed = True
        result.append(b)
    return result if changed else None


def recorder(io: dict[Any, tuple], key: Any) -> Callable[..., None]:
    """A forward hook keeping the ``(args, output)`` of the first call in ``io[key]``."""
    def hook(module: nn.Module, args: tuple, out: Any) -> None:
        io.setdefault(key, (args, out))  # returns None so the output is untouched

    return hook


def same_tensor(args: tuple, out: Any) -> bool:
    first = args[0] if args else None
    return (
        isinstance(out, torch.Tensor) and isinstance(first, torch.Tensor)
        and out.shape == first.shape and torch.equal(out, first)
    )


def drop_whole_branch_blocks(model, branches, inputs, events, spans) -> list[Branch]:
    """Drop blocks where the MLP is the whole residual branch (zeroing it turns the block into the identity)."""
    modules = dict(model.named_modules())
    blocks = {b.block_path: modules[b.block_path] for b in branches}
    io: dict[str, tuple] = {}
    handles = []

    def zero(branch: Branch):
        if branch.columns is None:
            return branch.module.register_forward_hook(lambda m, a, out: out * 0)
        start, stop = branch.columns

        def pre(m: nn.Module, args: tuple) -> tuple:
            x = args[0].clone()
            x[..., start:stop] = 0
            return (x, *args[1:])

        return branch.module.register_forward_pre_hook(pre)

    # Zero-initialised layers (Swin V2's post-norms, LayerScale at 0) would make other branches vanish too and
    # fake an identity block: jitter every parameterised leaf outside the MLP branches.
    gen = torch.Generator().manual_seed(1)
    in_branch = {id(m) for b in branches for m in b.module.modules()}

    def jitter(m: nn.Module, args: tuple, out: Any) -> Any:
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            return out + torch.randn(out.shape, generator=gen).to(out)
        return out

    try:
        handles += [zero(b) for b in branches]
        handles += [blk.register_forward_hook(recorder(io, p)) for p, blk in blocks.items()]
        for blk in blocks.values():
            for m in blk.modules():
                if id(m) not in in_branch and not list(m.children()) and any(True for _ in m.parameters(False)):
                    handles.append(m.register_forward_hook(jitter))
        with torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
    keep = []
    for b in branches:
        args, out = io.get(b.block_path, ((), None))
        if same_tensor(args, out) and mixer_in_series(b, events, spans):
            continue
        keep.append(b)
    # Re-number the blocks that remain.
    order = {p: i for i, p in enumerate(dict.fromkeys(b.block_path for b in keep))}
    for b in keep:
        b.index = order[b.block_path]
    return keep


def mixer_in_series(branch: Branch, events: list[Event], spans: dict[str, list[int]]) -> bool:
    """True when a parameterised non-normalisation layer outside the branch ran in the block before the MLP."""
    start, end = spans[branch.block_path]
    inside = {id(m) for m in branch.module.modules()}
    for ev in events[start:end]:
        if id(ev.module) in inside:
            return False
        leaf = not list(ev.module.children())
        if leaf and not is_norm(ev.module) and any(True for _ in ev.module.parameters(recurse=False)):
            return True
    return False


def probe_inputs(model: nn.Module, example_inputs: torch.Tensor | None) -> torch.Tensor:
    """``example_inputs`` on the model's device, else seeded noise of the model's input size and dtype."""
    ref = next((t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()), None)
    device, dtype = (ref.device, ref.dtype) if ref is not None else (torch.device("cpu"), torch.float32)
    if example_inputs is not None:
        return example_inputs.to(device)
    gen = torch.Generator().manual_seed(0)  # never touch the global RNG
    return torch.randn((1, *model_input_size(model)), generator=gen).to(device=device, dtype=dtype)

