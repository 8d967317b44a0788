"""Finding each block's MLP (or attention) residual branch: :class:`Branch` and :func:`find_branches`.

Candidates are found by name (``mlp``, ``attn`` and aliases); the probe in :mod:`._probe` then places each one.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._peft import base_of, is_tuner_layer, unwrap_peft
from ..errors import ConfigError, UnsupportedModelError
from . import _probe
from .config import check_model
from .layer import ScaledBranch, fold_tensors

__all__ = ["BRANCH_KINDS", "Branch", "check_no_bypass", "check_not_shared", "find_branches"]

#: The values of :attr:`Branch.kind` (where a scale on the branch sits).
BRANCH_KINDS = ("output", "post-norm", "fused-columns")

# Attribute names of modules that compute a block's MLP branch (``mlp2..4`` are CoaT's parallel aliases).
_MLP_NAME = re.compile(r"^(mlp\d*|mlp_channels|mlp_out_proj)$")
# Attribute names of modules that compute a block's token-mixing (attention) branch.
_ATTN_NAME = re.compile(r"^(attn|token_mixer|mlp_tokens|linear_tokens|rnn_tokens|attn_out_proj)$")
# Blocks whose MLP has another name, keyed by (timm module, block class).
_EXTRA_MLP_NAMES = {("timm.models.swiftformer", "Block"): "linear"}
# ConvNeXt-style blocks (the "mlp" is the whole residual branch) that the identity probe cannot see because their
# shortcut changes the shape (first block of a stage).
_WHOLE_BRANCH_BLOCKS = (
    ("timm.models.convnext", "ConvNeXtBlock"), ("timm.models.maxxvit", "ConvNeXtBlock"),
    ("timm.models.edgenext", "ConvBlock"), ("timm.models.edgenext", "SplitTransposeBlock"),
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
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# Blocks with a plain MLP branch, which the probe can place on the meta device (shapes only).
_META_BLOCKS = {
    ("timm.models.vision_transformer", "Block"), ("timm.models.vision_transformer", "ResPostBlock"),
    ("timm.models.beit", "Block"), ("timm.models.eva", "EvaBlock"), ("timm.models.eva", "EvaBlockPostNorm"),
    ("timm.models.cait", "LayerScaleBlock"), ("timm.models.swin_transformer", "SwinTransformerBlock"),
    ("timm.models.swin_transformer_v2", "SwinTransformerV2Block"),
}


@dataclass
class Branch:
    """A residual branch found by :func:`find_branches`.

    Attributes:
        index: Block index, bottom-up in the order the forward pass runs the blocks.
        path: Dotted path of the module whose output is the branch's contribution to the residual add.
        module: That module.
        block_path: Dotted path of the block.
        aliases: Every path under which the module is registered (CoaT registers one Mlp three times).
        columns: ``(start, end)`` input columns of a fused projection that belong to this branch, else ``None``.
        fold_path: Path, relative to ``module``, of the last affine layer the branch output is linear in.
        kind: Where the scale sits, one of :data:`BRANCH_KINDS`: ``"output"`` (default) of ``module``;
            ``"post-norm"``: ``module`` is the norm that follows the branch before the residual add (Swin V2,
            ``vit_*_rpn``); ``"fused-columns"`` (default when ``columns`` is set): input columns of a projection
            attention and MLP share (``ParallelScalingBlock(fuse_out_proj=True)``).

    Example:
        >>> import torch
        >>> Branch(0, "blocks.0.mlp", torch.nn.Linear(4, 4), "blocks.0").kind
        'output'
        >>> Branch(0, "blocks.0.out_proj", torch.nn.Linear(8, 4), "blocks.0", columns=(4, 8)).kind
        'fused-columns'
    """

    index: int
    path: str
    module: nn.Module
    block_path: str
    aliases: tuple[str, ...] = ()
    columns: tuple[int, int] | None = None
    fold_path: str = ""
    kind: str = ""

    def __post_init__(self) -> None:
        if not self.kind:
            self.kind = "fused-columns" if self.columns is not None else "output"
        if self.kind not in BRANCH_KINDS:
            raise ConfigError(f"Branch.kind must be one of {', '.join(map(repr, BRANCH_KINDS))}, got {self.kind!r}.")


def find_branches(model: nn.Module, kind: str = "mlp", *, example_inputs: torch.Tensor | None = None) -> list[Branch]:
    """Find every transformer block's MLP (or attention) residual branch, in forward order.

    Scaling the output of ``branch.module`` (or its ``columns``) by ``c`` scales that branch's contribution to the
    residual stream by ``c`` exactly. The probe runs in eval mode; every submodule's mode is restored.

    Args:
        model: A timm model, reweighted or not, or a peft model of one (paths are those of the timm model inside).
            On the ``meta`` device only ViT, DeiT, BEiT, EVA, CaiT and Swin blocks can be probed.
        kind: ``"mlp"`` or ``"attn"``.
        example_inputs: Probe input (batch 1 is enough); by default one is built from the model's image size.

    Returns:
        Branches ordered by block index; parallel branches of one block share the index.

    Raises:
        UnsupportedModelError: No such branch, with what was looked for and why candidates were rejected.

    Example:
        >>> import timm, timm_remem
        >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
        >>> [b.path for b in timm_remem.reweighting.find_branches(model)][:2]
        ['blocks.0.mlp', 'blocks.1.mlp']
    """
    if kind not in ("mlp", "attn"):
        raise ConfigError(f"find_branches: kind must be 'mlp' or 'attn', got {kind!r}.")
    check_model(model)
    model = unwrap_peft(model)
    check_no_bypass(model)
    candidates = _candidates(model, kind)
    name = type(model).__name__
    looked_for = _READABLE_NAMES[kind]
    if not candidates:
        whole = any((type(m).__module__, type(m).__name__) in _WHOLE_BRANCH_BLOCKS for m in model.modules())
        if kind == "mlp" and whole:
            raise UnsupportedModelError(_whole_branch_message(name, looked_for))
        raise UnsupportedModelError(
            f"{name} has no transformer {kind.upper()} residual branch: no submodule named {looked_for} "
            "inside a block. timm-remem reweights vision transformers (ViT, DeiT, Swin, EVA, CaiT, ...); "
            "convolutional networks have no MLP branch to reweight."
        )
    on_meta = _on_meta(model)
    if on_meta:
        _check_meta_blocks(model, candidates)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        inputs, events, block_spans = _probe.probe_any_size(model, candidates, example_inputs)
        _check_adapters_ran(model, candidates, events)
        branches = _probe.resolve(model, candidates, events, block_spans)
        inner = None if on_meta else _probe.descend_self_residual(model, branches, inputs)
        if inner is not None:
            candidates = inner
            events, block_spans = _probe.probe(model, candidates, inputs)
            branches = _probe.resolve(model, candidates, events, block_spans)
        if kind == "mlp" and not on_meta:
            branches = _probe.drop_whole_branch_blocks(model, branches, inputs, events, block_spans)
    finally:
        for m, mode in modes:  # each submodule as it was (model.train(flag) would reset them all)
            m.training = mode
    if not branches:
        raise UnsupportedModelError(_whole_branch_message(name, looked_for))
    return branches


def check_no_bypass(model: nn.Module) -> None:
    """Refuse a peft layer wrapped around a scaled branch: its adapter update would bypass the factor.

    Raises:
        UnsupportedModelError: Naming the layer and the order that works.
    """
    for path, m in model.named_modules():
        if is_tuner_layer(m) and isinstance(m._modules["base_layer"], ScaledBranch):
            raise UnsupportedModelError(
                f"{path} is a peft {type(m).__name__} around the reweighted layer {path}.base_layer: its adapter "
                "update bypasses the factor, so the outputs are not the reweighted model's. Apply LoRA before "
                f"reweight for this model, or leave {path.rsplit('.', 1)[-1]!r} out of target_modules."
            )


def check_not_shared(model: nn.Module, branches: list[Branch], folded: list[Branch] | None = None) -> None:
    """Refuse a branch that another block shares: its module, or a tensor ``merge`` folds its factor into.

    Modules are checked over ``branches`` (a shared one would miscount the blocks), tensors over ``folded`` (the
    branches that get a factor; default: all). Aliases inside one block (CoaT) are not sharing.

    Raises:
        ConfigError: Naming the shared module or tensor paths and the fix (a copy for each block).
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    for b in branches:
        blocks = list(dict.fromkeys(_block_of(a, modules) or a for a in b.aliases))
        if len(blocks) > 1:
            raise ConfigError(
                f"the MLP branch {b.path} ({type(b.module).__name__}) is one module registered in "
                f"{len(blocks)} blocks ({', '.join(b.aliases)}): it would be counted as one block (so top_k would "
                "count the wrong blocks) and one factor would scale all of them. Give each block its own copy "
                f"before reweighting, e.g. model.get_submodule({b.aliases[1].rpartition('.')[0]!r})."
                f"{b.aliases[1].rpartition('.')[2]} = copy.deepcopy(model.get_submodule({b.aliases[1]!r}))."
            )
    index = _tensor_index(model)
    for b in branches if folded is None else folded:
        try:
            tensors = fold_tensors(b.module, b.columns, b.fold_path, b.path)
        except UnsupportedModelError:
            continue  # merge refuses it anyway; nothing to fold, nothing shared
        for t in tensors:
            holders = {id(m) for m in b.module.modules()
                       if any(x is t for x in itertools.chain(m._parameters.values(), m._buffers.values()))}
            paths = [p for p, other in index.get(_storage_key(t), ()) if _overlap(t, other)]
            own = [p for p in paths if id(modules[p.rpartition(".")[0]]) in holders
                   and any(p.startswith(a + ".") for a in b.aliases)]
            others = [p for p in paths if p not in own]
            if others and own:
                raise ConfigError(
                    f"{own[0]} is also {', '.join(others)} (one tensor shared by two layers): folding the factor "
                    f"of the MLP branch {b.path} into it would also scale {others[0]}, so merge would change what "
                    "the model computes. Give each layer its own copy before reweighting, e.g. "
                    f"model.get_submodule({others[0].rpartition('.')[0]!r}).{others[0].rpartition('.')[2]} = "
                    f"torch.nn.Parameter(model.get_parameter({others[0]!r}).detach().clone())."
                )


def _storage_key(t: torch.Tensor) -> Any:
    """Tensors that may share memory have equal keys (a meta tensor has no memory: only itself)."""
    if t.is_meta:
        return ("id", id(t))
    try:
        return ("storage", t.device, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without a storage
        return ("id", id(t))


def _span(t: torch.Tensor) -> tuple[int, int]:
    if t.is_meta or t.numel() == 0:
        return (0, 0)
    start = t.storage_offset()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return start * t.element_size(), (start + extent) * t.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def _tensor_index(model: nn.Module) -> dict[Any, list[tuple[str, torch.Tensor]]]:
    """Every parameter and buffer of ``model`` under each of its paths, grouped by the memory they live in."""
    index: dict[Any, list[tuple[str, torch.Tensor]]] = {}
    named = itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    for path, t in named:
        index.setdefault(_storage_key(t), []).append((path, t))
    return index


def _check_adapters_ran(model: nn.Module, candidates: list[Branch], events: list) -> None:
    """Refuse a peft layer inside a block that the forward pass never calls (the block reads its weight directly)."""
    called = {id(ev.module) for ev in events}
    modules = dict(model.named_modules())
    for block_path in dict.fromkeys(c.block_path for c in candidates):
        for path, m in modules[block_path].named_modules(prefix=block_path):
            if is_tuner_layer(m) and id(m) not in called:
                owner = modules[path.rsplit(".", 1)[0]]
                raise UnsupportedModelError(
                    f"the peft layer {path} ({type(m).__name__}) never runs in the forward pass: "
                    f"{type(owner).__name__} reads its weight directly, so its LoRA update is ignored in training "
                    "while merge_and_unload() would fold it in (the exported model would differ). Leave "
                    f"{path.rsplit('.', 1)[-1]!r} out of target_modules for this model."
                )


def _on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def _check_meta_blocks(model: nn.Module, candidates: list[Branch]) -> None:
    modules = dict(model.named_modules())
    for c in candidates:
        block = modules[c.block_path]
        if (type(block).__module__, type(block).__name__) not in _META_BLOCKS:
            raise UnsupportedModelError(
                f"{type(model).__name__} is on the meta device and its block {c.block_path} "
                f"({type(block).__name__}) needs the value checks of the probe (self-residual and ConvNeXt-style "
                "MLPs), which meta tensors cannot run. Build the model on a real device (or load its weights first: "
                "load_state_dict(sd, assign=True)), then call reweight."
            )


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
            fused = _fused_out_proj(mod)
            columns = (fused.out_features, fused.in_features) if kind == "mlp" else (0, fused.out_features)
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
    return [b for b in found.values()
            if not any(b.block_path.startswith(other + ".") for other in blocks)
            and not any(o is not b and b.path.startswith(o.path + ".") for o in found.values())]


def _is_fused_parallel(module: nn.Module) -> bool:
    named = any(cls.__name__ in _FUSED_PARALLEL for cls in type(module).__mro__)
    return named and _fused_out_proj(module) is not None


def _fused_out_proj(block: nn.Module) -> nn.Module | None:
    proj = getattr(block, "out_proj", None)
    proj = base_of(proj) if isinstance(proj, nn.Module) else None
    return proj if isinstance(proj, nn.Linear) else None


def _block_of(path: str, modules: dict[str, nn.Module]) -> str | None:
    """Nearest ancestor that is not a plain container (Sequential, ModuleList, ModuleDict)."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:cut])
        if not isinstance(modules[parent], _CONTAINERS):
            return parent
    return None
