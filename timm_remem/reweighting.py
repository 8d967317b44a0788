"""Layer-wise reweighting of the MLP residual branches of timm vision transformers (ReMem, lever 2).

``reweight`` wraps, in place, the module whose output is each block's MLP contribution to the residual stream in
a :class:`ScaledBranch` that multiplies it by a factor; top blocks get the smallest factors. Attention is never
touched. The change is exactly reversible: ``unreweight`` puts the original modules back, ``merge`` folds the
factors into the weights and leaves a plain timm model.

Where the branch ends is found by a probe: one eval-mode forward pass at batch 1 with hooks on every block's
children, following the tensor the MLP returns through the modules that consume it before the residual add. A
normalisation layer on that path (post-norm and sandwich-norm blocks: Swin V2, ``vit_*_rpn``, EVA post-norm,
Gemma4, FocalNet post-norm) would undo a scale placed on the MLP output, so the scale goes after it instead.
Blocks whose "mlp" is the whole residual branch (ConvNeXt-style: a convolutional token mixer and the MLP in
series) are recognised by a second probe (zeroing the MLP turns the block into the identity) and are not
transformer MLP branches.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, NotReweightedError, UnsupportedModelError

__all__ = [
    "Branch",
    "ReweightConfig",
    "ScaledBranch",
    "find_branches",
    "get_reweight_config",
    "get_scales",
    "is_reweighted",
    "merge",
    "reweight",
    "unreweight",
]

# Attribute names of modules that compute a block's MLP branch (``mlp2..4`` are CoaT's parallel aliases).
_MLP_NAME = re.compile(r"^(mlp\d*|mlp_channels|mlp_out_proj)$")
# Attribute names of modules that compute a block's token-mixing (attention) branch.
_ATTN_NAME = re.compile(r"^(attn|token_mixer|mlp_tokens|linear_tokens|rnn_tokens|attn_out_proj)$")
# Blocks whose MLP has another name, keyed by (timm module, block class).
_EXTRA_MLP_NAMES = {("timm.models.swiftformer", "Block"): "linear"}
# ConvNeXt-style blocks (the "mlp" is the whole residual branch) that the identity probe cannot see because their
# shortcut changes the shape (first block of a stage).
_WHOLE_BRANCH_BLOCKS = (
    ("timm.models.convnext", "ConvNeXtBlock"),
    ("timm.models.maxxvit", "ConvNeXtBlock"),
    ("timm.models.edgenext", "ConvBlock"),
    ("timm.models.edgenext", "SplitTransposeBlock"),
    ("timm.models.inception_next", "MetaNeXtBlock"),
)
_READABLE_NAMES = {
    "mlp": "mlp / mlp<N> / mlp_channels / mlp_out_proj",
    "attn": "attn / token_mixer / mlp_tokens / linear_tokens / rnn_tokens / attn_out_proj",
}
# Owners of a module called "mlp" that is not a block's residual MLP branch.
_NOT_A_BLOCK = ("AttentionPoolLatent", "AttentionPool2d", "RelPosMlp", "MlpClassifierHead")
# Parallel blocks whose attention and MLP share one fused output projection.
_FUSED_PARALLEL = ("ParallelScalingBlock", "DiffParallelScalingBlock")
# Layers that are per-channel linear, so a scale commutes with them (the path from an MLP to its residual add).
_TRANSPARENT = re.compile(r"^(Identity|Dropout\w*|DropPath\w*|\w*LayerScale\w*|Scale\w*)$")
_NORM_NAME = re.compile(r"Norm(\d?d|1)?$")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_SCHEDULES = ("exponential", "constant")


# --------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ReweightConfig:
    """What ``reweight`` did to a model; stored on it as ``model.remem_config``.

    Attributes:
        alpha: The MLP weight (``None`` for a custom schedule).
        schedule: ``"exponential"``, ``"constant"`` or ``"custom"``.
        top_k: Number of reweighted blocks counted from the top (``None``: all).
        learnable: Whether the factors are trainable parameters.
        factors: Factor of each reweighted block, bottom-up (length ``top_k`` or the number of blocks).
        num_blocks: Number of blocks with an MLP branch.
        merged: ``True`` once ``merge`` folded the factors into the weights.
        version: timm-remem version that wrote this config.
    """

    alpha: float | None = 0.85
    schedule: str = "exponential"
    top_k: int | None = None
    learnable: bool = False
    factors: list[float] = field(default_factory=list)
    num_blocks: int = 0
    merged: bool = False
    version: str = ""

    def __post_init__(self) -> None:
        if self.schedule not in (*_SCHEDULES, "custom"):
            raise ConfigError(
                f"ReweightConfig.schedule must be one of {(*_SCHEDULES, 'custom')}, got {self.schedule!r}."
            )
        if self.alpha is not None:
            _check_factor("alpha", self.alpha, allow_zero=False)
        for i, f in enumerate(self.factors):
            _check_factor(f"factors[{i}]", f, allow_zero=True)
        self.factors = [float(f) for f in self.factors]
        if not self.version:
            from . import __version__

            self.version = __version__

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-ready dict with sorted keys."""
        return dict(sorted(dataclasses.asdict(self).items()))

    def to_json(self) -> str:
        """Return the config as sorted, indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReweightConfig:
        """Build a config from a dict, dropping unknown keys with a warning (newer versions may add keys)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"ReweightConfig: ignoring unknown keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------------------------------------------
# The wrapper module


class ScaledBranch(nn.Module):
    """Multiplies a residual branch by a scalar factor ``remem_scale``.

    It replaces the module whose output is the branch's contribution to the residual add (``base_layer``) and
    calls it with whatever arguments the block passes. For a fused projection shared by attention and MLP
    (``ParallelScalingBlock(fuse_out_proj=True)``) it scales the MLP's input columns ``[start, end)`` instead.

    The wrapper is invisible in ``state_dict()``: ``base_layer``'s keys keep their original names and the factor
    adds one key, ``<path>.remem_scale``. A checkpoint without that key (a plain timm checkpoint) loads too and
    keeps the current factor.

    Args:
        base_layer: The wrapped module.
        scale: Initial factor.
        learnable: Make the factor an ``nn.Parameter`` (otherwise a buffer).
        columns: ``(start, end)`` input columns to scale instead of the output, or ``None``.
        fold_path: Path, relative to ``base_layer``, of the affine layer ``merge`` folds the factor into
            (``""``: ``base_layer`` itself).
        index: Block index, bottom-up in forward order.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        scale: float,
        learnable: bool = False,
        columns: tuple[int, int] | None = None,
        fold_path: str = "",
        index: int = 0,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        value = torch.tensor(float(scale), dtype=torch.float32, device=_device_of(base_layer))
        if learnable:
            self.remem_scale = nn.Parameter(value)
        else:
            self.register_buffer("remem_scale", value)
        self.columns = columns
        self.fold_path = fold_path
        self.index = index

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.columns is None:
            out = self.base_layer(*args, **kwargs)
            if not torch.is_grad_enabled() and isinstance(out, torch.Tensor) and _fresh(out, args):
                return out.mul_(self.remem_scale)  # inference: no autograd graph, save an activation-sized copy
            return out * self.remem_scale
        x, *rest = args
        start, end = self.columns
        ones = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
        mult = torch.cat([ones[:start], (ones[start:end] * self.remem_scale).to(x.dtype), ones[end:]])
        return self.base_layer(x * mult, *rest, **kwargs)

    def extra_repr(self) -> str:
        where = "output" if self.columns is None else f"input columns [{self.columns[0]}:{self.columns[1]}]"
        learnable = isinstance(self.remem_scale, nn.Parameter)
        return f"scale={float(self.remem_scale):.6g}, on={where}, learnable={learnable}"

    # State dict: keep the wrapped module's keys at their original names.
    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        if args:  # positional (destination, prefix, keep_vars), deprecated in torch but still accepted there
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if destination is None:
            destination = OrderedDict()
            destination._metadata = OrderedDict()  # type: ignore[attr-defined]
        self.base_layer.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        self._save_to_state_dict(destination, prefix, keep_vars)
        return destination

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        own = prefix + "remem_scale"
        base = prefix + "base_layer."
        for key in [k for k in state_dict if k.startswith(prefix) and k != own and not k.startswith(base)]:
            state_dict[base + key[len(prefix):]] = state_dict.pop(key)
        if own not in state_dict:  # a plain timm checkpoint: keep the current factor
            state_dict[own] = self.remem_scale.detach().clone()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @torch.no_grad()
    def fold(self) -> None:
        """Multiply the wrapped weights by the factor (in fp32, then cast back), exactly as the forward would."""
        c = self.remem_scale.detach().double()
        if self.columns is not None:
            start, end = self.columns
            w = self.base_layer.weight
            w[:, start:end] = (w[:, start:end].double() * c).to(w.dtype)
            return
        target = self._fold_target()
        for name in ("weight", "bias"):
            t = getattr(target, name, None)
            if isinstance(t, torch.Tensor):
                t.copy_((t.double() * c).to(t.dtype))

    def _fold_target(self) -> nn.Module:
        target = self.base_layer.get_submodule(self.fold_path) if self.fold_path else self.base_layer
        if not _is_foldable(target):
            raise UnsupportedModelError(
                f"cannot fold the factor of {type(self.base_layer).__name__} into its last layer "
                f"{type(target).__name__} ({self.fold_path or 'itself'}): it has no affine weight. "
                "Keep the model unmerged (it still runs and saves), or call timm_remem.unreweight(model)."
            )
        return target


def _fresh(out: torch.Tensor, args: tuple) -> bool:
    """Whether ``out`` owns its memory (no view, shares nothing with an input), so it may be scaled in place."""
    if out._base is not None or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    ptr = out.untyped_storage().data_ptr()
    return not any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == ptr for a in args)


# --------------------------------------------------------------------------------------------------------------
# Discovery


@dataclass
class Branch:
    """A residual branch found by :func:`find_branches`.

    Attributes:
        index: Block index, bottom-up in the order the forward pass runs the blocks.
        path: Dotted path of the module whose output is the branch's contribution to the residual add
            (for a fused projection: the projection, with ``columns``).
        module: That module.
        block_path: Dotted path of the block.
        aliases: Every path under which the module is registered (CoaT registers one Mlp three times).
        columns: ``(start, end)`` input columns of a fused projection that belong to this branch, else ``None``.
        fold_path: Path, relative to ``module``, of the last affine layer the branch output is linear in.
    """

    index: int
    path: str
    module: nn.Module
    block_path: str
    aliases: tuple[str, ...] = ()
    columns: tuple[int, int] | None = None
    fold_path: str = ""


@dataclass
class _Event:
    module: nn.Module
    tensors: tuple[torch.Tensor, ...]
    output: Any


def find_branches(model: nn.Module, kind: str = "mlp", *, example_inputs: torch.Tensor | None = None) -> list[Branch]:
    """Find every transformer block's MLP (or attention) residual branch, in forward order.

    Scaling the output of ``branch.module`` by ``c`` (for ``branch.columns``: scaling those input columns) scales
    that branch's contribution to the residual stream by ``c`` exactly; use it with forward hooks for ablations.

    Args:
        model: A timm model (works on reweighted models too: wrappers are reported at their paths).
        kind: ``"mlp"`` or ``"attn"``.
        example_inputs: Probe input (batch 1 is enough); by default one is built from the model's image size.

    Returns:
        Branches ordered by block index; parallel branches of one block share the index.

    Raises:
        UnsupportedModelError: No such branch, with what was looked for and why candidates were rejected.

    Example:
        >>> import timm, timm_remem
        >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
        >>> [b.path for b in timm_remem.find_branches(model)][:2]
        ['blocks.0.mlp', 'blocks.1.mlp']
    """
    if kind not in ("mlp", "attn"):
        raise ConfigError(f"find_branches: kind must be 'mlp' or 'attn', got {kind!r}.")
    _check_module(model)
    candidates = _candidates(model, kind)
    name = type(model).__name__
    looked_for = _READABLE_NAMES[kind]
    whole = [m for m in model.modules() if (type(m).__module__, type(m).__name__) in _WHOLE_BRANCH_BLOCKS]
    if not candidates and whole and kind == "mlp":
        raise UnsupportedModelError(_whole_branch_message(name, looked_for))
    if not candidates:
        raise UnsupportedModelError(
            f"{name} has no transformer {kind.upper()} residual branch: no submodule named {looked_for} "
            "inside a block. timm-remem reweights vision transformers (ViT, DeiT, Swin, EVA, CaiT, ...); "
            "convolutional networks have no MLP branch to reweight."
        )
    was_training = model.training
    model.eval()
    try:
        inputs, events, block_spans = _probe_any_size(model, candidates, example_inputs)
        branches = _resolve(model, candidates, events, block_spans)
        inner = _descend_self_residual(model, branches, inputs)
        if inner is not None:
            candidates = inner
            events, block_spans = _probe(model, candidates, inputs)
            branches = _resolve(model, candidates, events, block_spans)
        if kind == "mlp":
            branches = _drop_whole_branch_blocks(model, branches, inputs, events, block_spans)
    finally:
        model.train(was_training)
    if not branches:
        raise UnsupportedModelError(_whole_branch_message(name, looked_for))
    return branches


def _whole_branch_message(name: str, looked_for: str) -> str:
    return (
        f"{name} has no transformer MLP residual branch: every block's {looked_for} module is the whole "
        "residual branch, in series with a convolutional token mixer (ConvNeXt-style block), so scaling it is "
        "not ReMem's MLP reweighting. Use a vision transformer teacher."
    )


def _candidates(model: nn.Module, kind: str) -> list[Branch]:
    """Modules named like an MLP/attention branch, grouped with their block; index filled in by the probe."""
    pattern = _MLP_NAME if kind == "mlp" else _ATTN_NAME
    modules = dict(model.named_modules(remove_duplicate=False))
    aliases: dict[int, list[str]] = {}
    for path, mod in modules.items():
        aliases.setdefault(id(mod), []).append(path)
    found: dict[int, Branch] = {}
    for path, mod in modules.items():
        if path and _is_fused_parallel(mod):
            proj = mod.out_proj  # the Linear, or its ScaledBranch on a reweighted model
            dim = _fused_out_proj(mod).out_features
            columns = (dim, _fused_out_proj(mod).in_features) if kind == "mlp" else (0, dim)
            key = id(proj) * 2 + (kind == "mlp")
            found[key] = Branch(-1, f"{path}.out_proj", proj, path, tuple(aliases[id(proj)]), columns)
    for path, mod in modules.items():
        leaf = path.rsplit(".", 1)[-1]
        if not path or not isinstance(mod, nn.Module) or id(mod) in found:
            continue
        block_path = _block_of(path, modules)
        if block_path is None or type(modules[block_path]).__name__ in _NOT_A_BLOCK:
            continue
        block_key = (type(modules[block_path]).__module__, type(modules[block_path]).__name__)
        extra = kind == "mlp" and _EXTRA_MLP_NAMES.get(block_key) == leaf and "." not in path[len(block_path) + 1:]
        if not (pattern.match(leaf) or extra):
            continue
        if kind == "mlp" and block_key in _WHOLE_BRANCH_BLOCKS:
            continue
        if _is_fused_parallel(modules[block_path]):
            continue
        found[id(mod)] = Branch(-1, path, mod, block_path, tuple(aliases[id(mod)]))
    # A candidate inside another candidate's block (RelPosMlp's mlp inside attention) is not a block branch.
    blocks = {b.block_path for b in found.values()}
    return [
        b
        for b in found.values()
        if not any(b.block_path != other and b.block_path.startswith(other + ".") for other in blocks)
        and not _inside_another(b, found.values())
    ]


def _inside_another(branch: Branch, others: Any) -> bool:
    return any(o is not branch and branch.path.startswith(o.path + ".") for o in others)


def _is_fused_parallel(module: nn.Module) -> bool:
    named = any(cls.__name__ in _FUSED_PARALLEL for cls in type(module).__mro__)
    return named and _fused_out_proj(module) is not None


def _fused_out_proj(block: nn.Module) -> nn.Module | None:
    proj = getattr(block, "out_proj", None)
    if isinstance(proj, ScaledBranch):
        proj = proj.base_layer
    return proj if isinstance(proj, nn.Linear) else None


def _block_of(path: str, modules: dict[str, nn.Module]) -> str | None:
    """Nearest ancestor that is not a plain container (Sequential, ModuleList, ModuleDict)."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:cut])
        if not isinstance(modules[parent], _CONTAINERS):
            return parent
    return None


def _probe(model: nn.Module, candidates: list[Branch], inputs: torch.Tensor):
    """Run one forward with hooks on every block and its descendants; return the events and block spans."""
    modules = dict(model.named_modules())
    events: list[_Event] = []
    spans: dict[str, list[int]] = {}
    handles = []
    hooked: set[int] = set()

    def record(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        tensors = tuple(t for t in itertools.chain(args, kwargs.values()) if isinstance(t, torch.Tensor))
        events.append(_Event(mod, tensors, output))

    def span_hooks(block_path: str):
        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            spans.setdefault(block_path, [len(events), -1])

        def post(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if spans[block_path][1] < 0:
                spans[block_path][1] = len(events)

        return pre, post

    try:
        for block_path in dict.fromkeys(c.block_path for c in candidates):
            block = modules[block_path]
            pre, post = span_hooks(block_path)
            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(block.register_forward_hook(post, with_kwargs=True))
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


def _probe_any_size(model: nn.Module, candidates: list[Branch], example_inputs: torch.Tensor | None):
    """Probe with the model's own image size; models that do not record it are tried at common sizes."""
    first = _probe_inputs(model, example_inputs)
    if example_inputs is not None:
        return (first, *_probe(model, candidates, first))
    tried = [tuple(first.shape[1:])]
    try:
        return (first, *_probe(model, candidates, first))
    except Exception as error:  # noqa: BLE001 - wrong guess of the input size; try others below
        failure = error
    chans = dict.fromkeys((first.shape[1], _cfg_chans(_cfg(model)), 3))
    sides = (first.shape[2], 224, 256, 384, 192, 160, 128, 112, 96, 64, 56, 32, 28)
    for c, side in itertools.product(chans, sides):
        size = (c, side, side)
        if size in tried:
            continue
        tried.append(size)
        inputs = torch.randn((1, *size), generator=torch.Generator().manual_seed(0)).to(first)
        try:
            return (inputs, *_probe(model, candidates, inputs))
        except Exception:  # noqa: BLE001
            continue
    raise UnsupportedModelError(
        f"could not run {type(model).__name__} to find its blocks (tried input sizes {tried}; first error: "
        f"{type(failure).__name__}: {failure}). Pass example_inputs=torch.randn(1, C, H, W) with the size the "
        "model expects."
    ) from failure


def _resolve(model: nn.Module, candidates: list[Branch], events: list[_Event], spans: dict[str, list[int]]):
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
            targets = {id(_follow_to_post_norm(events, i, end, inside, cand.module)) for i in calls}
            if len(targets) > 1:
                raise UnsupportedModelError(
                    f"{type(model).__name__}: the branch {cand.path} is followed by different normalisation "
                    "layers on different calls; timm-remem cannot place one scale for it."
                )
            target = _follow_to_post_norm(events, calls[0], end, inside, cand.module)
        fold_path = _fold_path(target, events, calls[0]) if target is cand.module else ""
        target_paths = tuple(paths[id(target)])
        branches.append(
            Branch(index[cand.block_path], target_paths[0], target, cand.block_path, target_paths, cand.columns,
                   fold_path)
        )
    branches.sort(key=lambda b: (b.index, spans[b.block_path][0]))
    return branches


def _follow_to_post_norm(events: list[_Event], call: int, end: int, inside: set[int], mlp: nn.Module) -> nn.Module:
    """Follow the MLP's output through the modules that consume it; return the last normalisation on the way."""
    tracked = {id(events[call].output)}
    keep = [events[call].output]  # keep tensors alive so their ids stay unique
    target = mlp
    for ev in events[call + 1:end]:
        if id(ev.module) in inside or not any(id(t) in tracked for t in ev.tensors):
            continue
        if not (_is_norm(ev.module) or _TRANSPARENT.match(type(ev.module).__name__)):
            continue  # a layer that is not per-channel linear: the branch ended before it (residual add)
        if isinstance(ev.output, torch.Tensor):
            tracked.add(id(ev.output))
            keep.append(ev.output)
        if _is_norm(ev.module):
            target = ev.module
    return target


def _fold_path(module: nn.Module, events: list[_Event], call: int) -> str:
    """Path (relative to ``module``) of the last parameterised leaf that ran inside it: the layer to fold into."""
    if _is_foldable(module) and not list(module.children()):
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
    return last


def _descend_self_residual(model: nn.Module, branches: list[Branch], inputs: torch.Tensor) -> list[Branch] | None:
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
            handles.append(b.module.register_forward_hook(_recorder(io)))
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
        if b in probed and _same_tensor(args, out):
            child = b.fold_path.split(".")[0]
            b = Branch(-1, f"{b.path}.{child}", b.module.get_submodule(child), b.block_path,
                       tuple(f"{a}.{child}" for a in b.aliases))
            changed = True
        result.append(b)
    return result if changed else None


def _recorder(io: dict[int, tuple]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple, out: Any) -> None:
        io.setdefault(id(module), (args, out))  # first call only; returns None so the output is untouched

    return hook


def _same_tensor(args: tuple, out: Any) -> bool:
    first = args[0] if args else None
    return (
        isinstance(out, torch.Tensor) and isinstance(first, torch.Tensor)
        and out.shape == first.shape and torch.equal(out, first)
    )


def _drop_whole_branch_blocks(model, branches, inputs, events, spans) -> list[Branch]:
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

    def record(path: str):
        def hook(m: nn.Module, args: tuple, out: Any) -> None:
            io.setdefault(path, (args, out))

        return hook

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
        handles += [blk.register_forward_hook(record(p)) for p, blk in blocks.items()]
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
        if _same_tensor(args, out) and _mixer_in_series(b, events, spans):
            continue
        keep.append(b)
    # Re-number the blocks that remain.
    order = {p: i for i, p in enumerate(dict.fromkeys(b.block_path for b in keep))}
    for b in keep:
        b.index = order[b.block_path]
    return keep


def _mixer_in_series(branch: Branch, events: list[_Event], spans: dict[str, list[int]]) -> bool:
    """True when a parameterised non-normalisation layer outside the branch ran in the block before the MLP."""
    start, end = spans[branch.block_path]
    inside = {id(m) for m in branch.module.modules()}
    for ev in events[start:end]:
        if id(ev.module) in inside:
            return False
        leaf = not list(ev.module.children())
        if leaf and not _is_norm(ev.module) and any(True for _ in ev.module.parameters(recurse=False)):
            return True
    return False


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, ScaledBranch):
        module = module.base_layer
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)
    return isinstance(module, norms) or _NORM_NAME.search(type(module).__name__) is not None


def _is_foldable(module: nn.Module) -> bool:
    """A layer whose output is linear in (weight, bias) jointly, so scaling both scales the output."""
    linear = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and (isinstance(module, linear) or _is_norm(module))


def _device_of(module: nn.Module) -> torch.device:
    t = next(itertools.chain(module.parameters(), module.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def _probe_inputs(model: nn.Module, example_inputs: torch.Tensor | None) -> torch.Tensor:
    ref = next((t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else torch.float32
    if example_inputs is not None:
        return example_inputs.to(device)
    size = _input_size(model)
    gen = torch.Generator().manual_seed(0)  # never touch the global RNG
    return torch.randn((1, *size), generator=gen).to(device=device, dtype=dtype)


def _cfg(model: nn.Module) -> Any:
    return getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}


def _input_size(model: nn.Module) -> tuple[int, int, int]:
    """Best guess of (C, H, W): the patch embedding's image size and input channels, else the pretrained cfg."""
    cfg = _cfg(model)
    chans = getattr(model, "in_chans", None)
    chans = chans if isinstance(chans, int) and not isinstance(chans, bool) else None
    for mod in model.modules():
        img = getattr(mod, "img_size", None)
        if isinstance(img, int) and not isinstance(img, bool):
            img = (img, img)
        if isinstance(img, (tuple, list)) and len(img) == 2 and all(isinstance(v, int) for v in img):
            if chans is None:
                conv = next((m for m in mod.modules() if isinstance(m, nn.Conv2d)), None)
                chans = conv.in_channels if conv is not None else None
            return (chans or _cfg_chans(cfg), int(img[0]), int(img[1]))
    size = cfg.get("input_size") if isinstance(cfg, dict) else getattr(cfg, "input_size", None)
    if chans is None:
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        chans = conv.in_channels if conv is not None else None
    if size:
        return (chans or int(size[0]), int(size[1]), int(size[2]))
    return (chans or 3, 224, 224)


def _cfg_chans(cfg: Any) -> int:
    size = cfg.get("input_size") if isinstance(cfg, dict) else getattr(cfg, "input_size", None)
    return int(size[0]) if size else 3


# --------------------------------------------------------------------------------------------------------------
# Public API


def reweight(
    model: nn.Module,
    alpha: float = 0.85,
    *,
    schedule: str | Sequence[float] | Callable[[int, int], float] = "exponential",
    learnable: bool = False,
    top_k: int | None = None,
    example_inputs: torch.Tensor | None = None,
) -> nn.Module:
    """Scale each transformer block's MLP residual branch, top blocks most (in place).

    Blocks are counted bottom-up in the order the forward pass runs them (across all stages of hierarchical
    models). With ``top_k=k`` only the top ``k`` blocks are reweighted; the ``i``-th of those from the bottom
    (``i = 0..k-1``) gets ``alpha ** (i + 1)`` under ``schedule="exponential"`` (so the top block gets
    ``alpha ** k``), ``alpha`` under ``"constant"``, ``schedule[i]`` for a sequence of ``k`` floats, or
    ``schedule(i, k)`` for a callable. Blocks outside the set are left alone (factor 1). This exponential default
    is ours: ReMem's exact per-block schedule is not public.

    Calling it again on a reweighted model replaces the factors (it never stacks them).

    Args:
        model: A timm vision transformer (any family with a transformer MLP branch).
        alpha: The MLP weight, a finite number > 0 (typically 0.8-0.9).
        schedule: ``"exponential"``, ``"constant"``, a sequence of ``k`` factors, or ``callable(i, k)``.
        learnable: Make each factor a trainable scalar ``nn.Parameter`` (else a buffer).
        top_k: Number of top blocks to reweight (default: all).
        example_inputs: Input for the structure probe (default: built from the model's image size).

    Returns:
        The same model, with its MLP branches wrapped in :class:`ScaledBranch`.

    Raises:
        ConfigError: Bad ``alpha``, ``schedule``, ``top_k`` or ``learnable``.
        UnsupportedModelError: The model has no transformer MLP branch.

    Example:
        >>> import timm, timm_remem
        >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
        >>> _ = timm_remem.reweight(model, alpha=0.5, top_k=2)
        >>> timm_remem.get_scales(model)
        {'blocks.4.mlp': 0.5, 'blocks.5.mlp': 0.25}
    """
    _check_module(model)
    custom = not isinstance(schedule, str)
    if not custom and schedule not in _SCHEDULES:
        raise ConfigError(
            f"unknown schedule {schedule!r}: use 'exponential', 'constant', a sequence of factors (one per "
            "reweighted block, bottom-up) or a callable (i, k) -> factor."
        )
    if not custom:
        _check_factor("alpha", alpha, allow_zero=False)
    if not isinstance(learnable, bool):
        raise ConfigError(f"learnable must be True or False, got {learnable!r}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise ConfigError(f"top_k must be a positive int or None (all blocks), got {top_k!r}.")
    if custom and not callable(schedule) and not isinstance(schedule, Sequence):
        raise ConfigError(f"schedule must be a string, a sequence of floats or a callable, got {schedule!r}.")

    # Validate against the block count before touching anything (a reweighted model keeps its factors on error).
    branches = find_branches(model, "mlp", example_inputs=example_inputs)
    num_blocks = branches[-1].index + 1
    k = num_blocks if top_k is None else top_k
    if not 1 <= k <= num_blocks:
        raise ConfigError(
            f"top_k={top_k} is out of range: {type(model).__name__} has {num_blocks} blocks with an MLP branch; "
            f"use 1 <= top_k <= {num_blocks}, or top_k=None for all."
        )
    factors = _factors(alpha, schedule, k)
    if is_reweighted(model):
        unreweight(model)
        branches = find_branches(model, "mlp", example_inputs=example_inputs)
    first = num_blocks - k
    for b in branches:
        if b.index < first:
            continue
        wrapper = ScaledBranch(b.module, factors[b.index - first], learnable, b.columns, b.fold_path, b.index)
        for alias in b.aliases:
            _set_submodule(model, alias, wrapper)
    model.remem_config = ReweightConfig(
        alpha=None if custom else float(alpha),
        schedule="custom" if custom else schedule,
        top_k=top_k,
        learnable=learnable,
        factors=factors,
        num_blocks=num_blocks,
    )
    return model


def _factors(alpha: float, schedule: Any, k: int) -> list[float]:
    if schedule == "exponential":
        return [float(alpha) ** (i + 1) for i in range(k)]
    if schedule == "constant":
        return [float(alpha)] * k
    if callable(schedule):
        values = [schedule(i, k) for i in range(k)]
        for i, v in enumerate(values):
            _check_factor(f"schedule({i}, {k})", v, allow_zero=True)
        return [float(v) for v in values]
    values = list(schedule)
    if len(values) != k:
        raise ConfigError(
            f"schedule has {len(values)} factors but {k} blocks are reweighted: give one factor per reweighted "
            f"block, bottom-up (or change top_k to {len(values)})."
        )
    for i, v in enumerate(values):
        _check_factor(f"schedule[{i}]", v, allow_zero=True)
    return [float(v) for v in values]


def _check_factor(name: str, value: Any, *, allow_zero: bool) -> None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a real number, got {value!r} ({type(value).__name__}).")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(
            f"{name} must be a finite number {bound}, got {value!r}; ReMem uses factors in (0, 1], e.g. alpha=0.85."
        )


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _wrappers(model: nn.Module) -> list[tuple[str, ScaledBranch]]:
    return [(p, m) for p, m in model.named_modules(remove_duplicate=False) if isinstance(m, ScaledBranch)]


def is_reweighted(model: nn.Module) -> bool:
    """Whether ``model`` holds any :class:`ScaledBranch` wrapper."""
    return any(isinstance(m, ScaledBranch) for m in model.modules())


def _check_module(model: Any) -> None:
    if not isinstance(model, nn.Module):
        hint = " Create it first: timm.create_model(name, pretrained=...)." if isinstance(model, str) else ""
        raise ConfigError(f"expected a torch.nn.Module (a timm model), got {type(model).__name__} {model!r:.60}.{hint}")


def _require_wrappers(model: nn.Module, action: str) -> list[tuple[str, ScaledBranch]]:
    _check_module(model)
    found = _wrappers(model)
    if found:
        return found
    config = get_reweight_config(model)
    hint = (
        " It was already merged: its factors are in the weights."
        if config is not None and config.merged
        else " Call timm_remem.reweight(model, alpha=...) first."
    )
    raise NotReweightedError(f"cannot {action} {type(model).__name__}: it is not reweighted.{hint}")


def merge(model: nn.Module) -> nn.Module:
    """Fold the factors into the weights exactly and remove every wrapper (in place).

    The result is a plain timm model: its ``state_dict()`` loads with ``strict=True`` into
    ``timm.create_model(same name and kwargs)`` and reproduces the reweighted outputs. Folding is done in fp32
    (fp64 for the product) and cast back, so fp16/bf16 models merge as exactly as their dtype allows. The
    reweighting settings stay readable through :func:`get_reweight_config` (with ``merged=True``).

    Raises:
        NotReweightedError: The model holds no wrapper (never reweighted, or merged already).
        UnsupportedModelError: A branch ends in a layer without an affine weight; nothing was changed.

    Example:
        >>> import timm, timm_remem, torch
        >>> model = timm_remem.reweight(timm.create_model("test_vit", pretrained=False, img_size=32), alpha=0.8)
        >>> x = torch.randn(1, 3, 32, 32)
        >>> y = model.eval()(x)
        >>> plain = timm_remem.merge(model)
        >>> torch.allclose(plain(x), y, atol=1e-5)
        True
    """
    found = _require_wrappers(model, "merge")
    unique = list({id(w): w for _, w in found}.values())
    for w in unique:  # check everything before changing anything
        if w.columns is None:
            w._fold_target()
    current = {w.index: float(w.remem_scale.detach()) for w in unique}  # learnable factors may have trained
    for w in unique:
        w.fold()
    for path, w in found:
        _set_submodule(model, path, w.base_layer)
    config = get_reweight_config(model)
    if config is not None:
        config.merged = True
        config.factors = [current[i] for i in sorted(current)]
    return model


def unreweight(model: nn.Module) -> nn.Module:
    """Remove every wrapper without folding: the original model back, bit for bit (in place).

    Raises:
        NotReweightedError: The model holds no wrapper.

    Example:
        >>> import timm, timm_remem
        >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
        >>> timm_remem.unreweight(timm_remem.reweight(model)) is model
        True
    """
    found = _require_wrappers(model, "unreweight")
    for path, w in found:
        _set_submodule(model, path, w.base_layer)
    if "remem_config" in model.__dict__:
        del model.__dict__["remem_config"]
    return model


def get_scales(model: nn.Module) -> dict[str, float]:
    """Return ``{branch path: current factor}`` for every reweighted branch, in forward order.

    Example:
        >>> import timm, timm_remem
        >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
        >>> timm_remem.get_scales(timm_remem.reweight(model, alpha=0.5, schedule="constant", top_k=2))
        {'blocks.4.mlp': 0.5, 'blocks.5.mlp': 0.5}
    """
    found = sorted(enumerate(_wrappers(model)), key=lambda t: (t[1][1].index, t[0]))
    return {path: float(w.remem_scale.detach()) for _, (path, w) in found}


def get_reweight_config(model: nn.Module) -> ReweightConfig | None:
    """Return the :class:`ReweightConfig` that ``reweight`` stored on ``model``, or ``None``."""
    config = model.__dict__.get("remem_config")
    return config if isinstance(config, ReweightConfig) else None
