"""Hand-written reference table: where each timm family's MLP residual branch ends (timm 1.0.31).

This module is data plus small helpers, no tests. It is the independent reference that the reweighting tests
compare against: every entry was written by reading the block's ``forward`` in timm 1.0.31's source
(``timm/models/*.py``), not by running any discovery code.

What counts as an MLP residual branch here: a channel MLP (linear or 1x1-conv layers, possibly with a norm, a
gate or a depthwise conv inside) whose input is the residual stream (optionally through a norm) and whose output,
possibly through LayerScale / DropPath / Dropout or a post-norm, is added back to that stream. Not branches:
MLPs that sit behind a spatial mixer inside the same residual branch (ConvNeXt, EdgeNeXt, InceptionNeXt,
FasterNet, MambaOut), MLPs that are not on the residual stream (``RelPosMlp``, Swin V2 ``cpb_mlp``, Swin V2-CR
``meta_mlp``, ``AttentionPoolLatent``, classifier heads, Qwen3 patch merger, CSATv2's 1-channel gate
transformer), and token-mixing MLPs (Mixer ``mlp_tokens``).

Conventions of a :class:`Case`:

* ``branch_paths[i]`` lists the dotted module paths whose OUTPUT is block ``i``'s MLP contribution to the residual
  add (scaling it by ``c`` scales the branch by ``c``). Blocks are ordered bottom-up in the order the forward pass
  calls them. Parallel MLP branches of one block share one inner list.
* When a per-channel linear op (LayerScale, DropPath, Dropout, Identity) follows the MLP, the path is the MLP
  itself (scaling commutes). When a norm follows it (post-norm / sandwich norm), the path is that norm.
* ``input_column_slices[path] = start``: that path's scaling acts on the module's INPUT columns ``[..., start:]``
  instead of its output (fused attention+MLP output projections).
* Paths are the names ``model.named_modules()`` yields (the first name of a module registered twice).

Example:
    >>> case = get_case("vit")
    >>> model = perturb(create(case), seed=0)
    >>> handles = apply_reference_scaling(model, case, [0.5] * len(case.branch_paths))
    >>> y = model(example_input(case))
    >>> for h in handles:
    ...     h.remove()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "Case",
    "ErrorCase",
    "CASES",
    "ERROR_CASES",
    "get_case",
    "create",
    "example_input",
    "perturb",
    "random_factors",
    "apply_reference_scaling",
    "scale_path",
]


@dataclass
class Case:
    """One small model configuration and where its MLP residual branches end.

    Attributes:
        id: Family name, unique in :data:`CASES`.
        model_name: The timm model name the architecture comes from.
        kwargs: Keyword arguments making it tiny (``pretrained=False`` is always added by :func:`create`).
        input_size: ``(C, H, W)`` of one input image.
        branch_paths: Per block (bottom-up, forward order), the module paths whose output is that block's MLP
            branch as it enters the residual add. Parallel branches of one block share one inner list.
        builder: Callable used instead of ``timm.create_model(model_name, ...)`` where the registered function
            pins the arguments that would make the model small (it is called as ``builder(**kwargs)``).
        input_column_slices: ``path -> start`` for fused projections: scale the input columns ``[..., start:]``.
        inner_paths: TnT only: per block, the inner (pixel-level) MLP branch, kept apart from ``branch_paths``.
        non_branch_paths: MLP-like modules that are NOT branches (``fnmatch`` patterns) and why.
        block_paths: Per block, the block module the branches belong to: the module whose forward performs the
            MLP residual add, except where one block holds several residual wrappers (EfficientViT-MSRA). Defaults
            to the parent of the block's first branch path.
        block_classes: Class names of the modules at ``block_paths``.
        affine_sites: Test aid: ``branch path -> (module to run, module whose input to observe)`` where the block
            output is not affine in the factor (e.g. a main-branch norm after the add); default is
            ``(parent of the path, None)``.
        fold: How a factor folds into the weights for this family.
        note: Anything surprising about the structure.
        judgement: Non-empty when including this family (or its indexing) is a judgement call, with the reason.
        slow: Creation takes several tenths of a second (only fixed-width configurations exist).
    """

    id: str
    model_name: str
    kwargs: dict[str, Any]
    input_size: tuple[int, int, int]
    branch_paths: list[list[str]]
    builder: Callable[..., nn.Module] | None = None
    input_column_slices: dict[str, int] = field(default_factory=dict)
    inner_paths: list[list[str]] = field(default_factory=list)
    non_branch_paths: dict[str, str] = field(default_factory=dict)
    block_paths: list[str] = field(default_factory=list)
    block_classes: tuple[str, ...] = ()
    affine_sites: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    fold: str = ""
    note: str = ""
    judgement: str = ""
    slow: bool = False

    def __post_init__(self) -> None:
        if not self.block_paths:
            self.block_paths = [_parent(paths[0]) for paths in self.branch_paths]
        if len(self.block_paths) != len(self.branch_paths):
            raise ValueError(f"case {self.id!r}: {len(self.block_paths)} block paths for "
                             f"{len(self.branch_paths)} blocks")

    @property
    def all_paths(self) -> list[str]:
        """Every branch path, flattened in block order."""
        return [p for paths in self.branch_paths for p in paths]


@dataclass
class ErrorCase:
    """A model without any transformer MLP residual branch: ``reweight`` must raise ``ValueError``.

    Attributes:
        id: Family name.
        model_name: timm model name.
        kwargs: Keyword arguments making it small.
        input_size: ``(C, H, W)``.
        reason: Why there is no branch (what the error message should convey).
        builder: As in :class:`Case`.
    """

    id: str
    model_name: str
    kwargs: dict[str, Any]
    input_size: tuple[int, int, int]
    reason: str
    builder: Callable[..., nn.Module] | None = None


# ----------------------------------------------------------------------------------------------------------------
# path helpers (pure string formatting; no model is inspected)


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _flat(fmt: str, depth: int) -> list[list[str]]:
    """``[[fmt.format(0)], [fmt.format(1)], ...]`` for a single stack of blocks."""
    return [[fmt.format(i)] for i in range(depth)]


def _staged(fmt: str, depths: Sequence[int]) -> list[list[str]]:
    """One entry per block of a staged model, ``fmt`` using ``{s}`` (stage) and ``{b}`` (block in stage)."""
    return [[fmt.format(s=s, b=b)] for s, depth in enumerate(depths) for b in range(depth)]


def _create_named(name: str, **kwargs: Any) -> nn.Module:
    return timm.create_model(name, pretrained=False, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# builders for families whose registered functions pin depth / width (dict(depths=..., **kwargs) raises on
# override) or take a config object


def _metaformer(**kwargs: Any) -> nn.Module:
    from timm.models.metaformer import MetaFormer

    return MetaFormer(**kwargs)


def _caformer_kwargs() -> dict[str, Any]:
    from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, SepConv

    return dict(depths=(1, 2), dims=(16, 32), token_mixers=[SepConv, Attention],
                norm_layers=[LayerNorm2dNoBias, LayerNormNoBias], num_classes=5)


def _poolformer_kwargs() -> dict[str, Any]:
    from timm.layers import GroupNorm1

    return dict(depths=(1, 2), dims=(16, 32), downsample_norm=None, mlp_act=nn.GELU, mlp_bias=True,
                norm_layers=GroupNorm1, layer_scale_init_values=1e-5, res_scale_init_values=None,
                use_mlp_head=False, num_classes=5)


def _mixer(**kwargs: Any) -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(**kwargs)


def _resmlp(**kwargs: Any) -> nn.Module:
    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

    return MlpMixer(block_layer=ResBlock, norm_layer=Affine, **kwargs)


def _gmlp(**kwargs: Any) -> nn.Module:
    from timm.layers import GatedMlp
    from timm.models.mlp_mixer import MlpMixer, SpatialGatingBlock

    return MlpMixer(block_layer=SpatialGatingBlock, mlp_layer=GatedMlp, **kwargs)


def _sequencer(**kwargs: Any) -> nn.Module:
    from timm.models.sequencer import Sequencer2d

    return Sequencer2d(**kwargs)


def _focalnet(**kwargs: Any) -> nn.Module:
    from timm.models.focalnet import FocalNet

    return FocalNet(**kwargs)


def _gcvit(**kwargs: Any) -> nn.Module:
    from timm.models.gcvit import GlobalContextVit

    return GlobalContextVit(**kwargs)


def _nest(**kwargs: Any) -> nn.Module:
    from timm.models.nest import Nest

    return Nest(**kwargs)


def _volo(**kwargs: Any) -> nn.Module:
    from timm.models.volo import VOLO

    return VOLO(**kwargs)


def _mvitv2(**kwargs: Any) -> nn.Module:
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    cfg = MultiScaleVitCfg(depths=(1, 2), embed_dim=(16, 32), num_heads=(1, 2), use_cls_token=True,
                           expand_attn=False)
    return MultiScaleVit(cfg=cfg, **kwargs)


def _maxxvit(block_type: str, conv: str = "mbconv", **transformer: Any) -> Callable[..., nn.Module]:
    def build(**kwargs: Any) -> nn.Module:
        from timm.models.maxxvit import MaxxVit, MaxxVitCfg, MaxxVitConvCfg, MaxxVitTransformerCfg

        cfg = MaxxVitCfg(
            embed_dim=(16, 32), depths=(1, 1), block_type=(block_type, block_type), stem_width=(8, 16),
            conv_cfg=MaxxVitConvCfg(block_type=conv),
            transformer_cfg=MaxxVitTransformerCfg(dim_head=8, partition_ratio=16, **transformer),
        )
        return MaxxVit(cfg=cfg, **kwargs)

    return build


def _convmixer(**kwargs: Any) -> nn.Module:
    from timm.models.convmixer import ConvMixer

    return ConvMixer(**kwargs)


def _vitamin_kwargs() -> dict[str, Any]:
    from timm.models.vitamin import VitCfg, VitConvCfg

    embed_cfg = VitCfg(embed_dim=(8, 16, 32), depths=(1, 1, 1), stem_width=8, head_type="1d",
                       conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6))
    return dict(img_size=32, embed_cfg=embed_cfg, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def _fused_parallel_block() -> Callable[..., nn.Module]:
    from timm.models.vision_transformer import ParallelScalingBlock

    return partial(ParallelScalingBlock, fuse_out_proj=True)


def _swiglu() -> type[nn.Module]:
    from timm.layers import SwiGLU

    return SwiGLU


_VIT = dict(img_size=32, embed_dim=32, depth=3, num_heads=2, num_classes=5)  # generic tiny ViT overrides
_S32 = (3, 32, 32)
_S64 = (3, 64, 64)

_FOLD_MLP = "fc2.weight and fc2.bias of the MLP *= c"
_FOLD_POSTNORM = "weight and bias of the norm after the MLP *= c (RmsNorm: weight only)"
_HEAD = "classifier head, not on the residual stream"
_IN_BRANCH = "inside the branch: the norm after it ends the branch and is the listed path"

# ----------------------------------------------------------------------------------------------------------------
# the table

CASES: list[Case] = [
    # --- plain ViT and relatives (vision_transformer.py Block: x + drop_path2(ls2(mlp(norm2(x))))) ------------
    Case(
        "vit", "test_vit", dict(img_size=32, depth=3, num_classes=5), _S32,
        _flat("blocks.{}.mlp", 3), block_classes=("Block",), fold=_FOLD_MLP,
    ),
    Case(
        "vit_layerscale", "test_vit2", dict(img_size=32, depth=3, num_classes=5), _S32,
        _flat("blocks.{}.mlp", 3), block_classes=("Block",),
        fold="ls2.gamma *= c (or fc2 of the MLP); LayerScale follows the MLP, so the MLP output is the path",
        note="init_values=1e-5 LayerScale, register token, avg pool: perturb() is needed or the branch is ~0",
    ),
    Case(
        "vit_map", "test_vit3", dict(img_size=32, depth=2, num_classes=5), _S32,
        _flat("blocks.{}.mlp", 2), block_classes=("Block",), fold=_FOLD_MLP,
        non_branch_paths={"attn_pool.mlp": "AttentionPoolLatent's MLP (global_pool='map'): a pooling head, "
                                           "not a block on the residual stream"},
    ),
    Case(
        "vit_swiglu_rmsnorm", "test_vit4", dict(img_size=32, depth=2, num_classes=5, mlp_layer=_swiglu()), _S32,
        _flat("blocks.{}.mlp", 2), block_classes=("Block",), fold="mlp.fc2 (SwiGLU) *= c",
    ),
    Case(
        "vit_rpn", "vit_base_patch16_rpn_224", dict(_VIT), _S32,
        _flat("blocks.{}.norm2", 3), block_classes=("ResPostBlock",), fold=_FOLD_POSTNORM,
        non_branch_paths={"blocks.*.mlp": _IN_BRANCH},
        note="ResPostBlock: x + drop_path2(norm2(mlp(x))): the norm after the MLP undoes any scaling of the MLP",
    ),
    Case(
        "vit_relpos", "test_vit_relpos", dict(img_size=32, depth=2, num_classes=5), _S32,
        _flat("blocks.{}.mlp", 2), block_classes=("RelPosBlock",), fold=_FOLD_MLP,
        non_branch_paths={"blocks.*.attn.rel_pos": "RelPosMlp: relative-position bias generator inside attention"},
    ),
    Case(
        "vit_relpos_rpn", "vit_relpos_small_patch16_rpn_224", dict(_VIT), _S32,
        _flat("blocks.{}.norm2", 3), block_classes=("ResPostRelPosBlock",), fold=_FOLD_POSTNORM,
        non_branch_paths={"blocks.*.attn.rel_pos": "RelPosMlp: relative-position bias generator inside attention",
                          "blocks.*.mlp": _IN_BRANCH},
    ),
    Case(
        "parallel_things", "vit_small_patch16_18x2_224", dict(_VIT, depth=2), _S32,
        [[f"blocks.{i}.ffns.0.mlp", f"blocks.{i}.ffns.1.mlp"] for i in range(2)],
        block_paths=["blocks.0", "blocks.1"], block_classes=("ParallelThingsBlock",),
        affine_sites={f"blocks.{i}.ffns.{j}.mlp": (f"blocks.{i}", None) for i in range(2) for j in range(2)},
        fold="ffns[k].mlp.fc2 (or ffns[k].ls.gamma) *= c for every k",
        note="x + sum_k ffns[k](x): the num_parallel MLPs of one depth are parallel branches sharing one index; "
             "each ffns[k] is a Sequential(norm, mlp, ls, drop_path)",
    ),
    Case(
        "parallel_scaling", "vit_base_patch16_xp_224", dict(_VIT, depth=2), _S32,
        _flat("blocks.{}.mlp_out_proj", 2), block_classes=("ParallelScalingBlock",),
        fold="mlp_out_proj.weight and .bias *= c",
        note="y = attn_out_proj(x_attn) + mlp_out_proj(x_mlp); x + drop_path(ls(y)): fc1 of the MLP is fused "
             "into in_proj with qkv; mlp_act / mlp_drop are parameter-free",
    ),
    Case(
        "parallel_scaling_fused", "vit_base_patch16_xp_224", dict(_VIT, depth=2, block_fn=_fused_parallel_block()),
        _S32, _flat("blocks.{}.out_proj", 2), block_classes=("ParallelScalingBlock",),
        input_column_slices={f"blocks.{i}.out_proj": 32 for i in range(2)},
        fold="out_proj.weight[:, dim:] *= c (the bias is shared with attention and stays)",
        note="fuse_out_proj=True: y = out_proj(cat(x_attn, x_mlp)); the MLP part is input columns [dim:] "
             "(dim=32 here); no module output is the MLP branch alone",
    ),
    Case(
        "diff_parallel_scaling", "vit_dpwee_patch16_reg1_gap_256", dict(_VIT, depth=2), _S32,
        _flat("blocks.{}.out_proj", 2), block_classes=("DiffParallelScalingBlock",),
        input_column_slices={f"blocks.{i}.out_proj": 32 for i in range(2)},
        fold="out_proj.weight[:, dim:] *= c (bias shared with attention)",
        note="always fused: y = out_proj(cat(x_attn, x_mlp)), MLP = input columns [dim:]",
    ),
    Case(
        "deit", "deit_tiny_distilled_patch16_224", dict(_VIT, depth=2), _S32,
        _flat("blocks.{}.mlp", 2), block_classes=("Block",), fold=_FOLD_MLP,
        note="VisionTransformerDistilled: dist token and head_dist, blocks are vit Block",
    ),
    Case(
        "beit", "beit_base_patch16_224", dict(_VIT, depth=2), _S32,
        _flat("blocks.{}.mlp", 2), block_classes=("Block",),
        fold="gamma_2 (a Parameter, not a module) *= c, or mlp.fc2",
        note="beit.Block: x + drop_path2(gamma_2 * mlp(norm2(x))); gamma_2 is a bare Parameter",
    ),
    Case(
        "beit3", "beit3_base_patch16_224", dict(_VIT, depth=2), _S32,
        _flat("blocks.{}.mlp", 2), block_classes=("Block",), fold=_FOLD_MLP,
        note="vit Block with scale_mlp_norm=True: Mlp has a norm before fc2 (fold fc2, after that norm)",
    ),
    Case(
        "eva", "eva02_tiny_patch14_224", dict(_VIT, img_size=28, depth=2), (3, 28, 28),
        _flat("blocks.{}.mlp", 2), block_classes=("EvaBlock",),
        fold="mlp.fc2 (GluMlp / SwiGLU) *= c, or gamma_2 when present",
        note="EvaBlock: x + drop_path2(gamma_2 * mlp(norm2(x))), rope passed as a keyword",
    ),
    Case(
        "eva_postnorm", "eva02_enormous_patch14_clip_224", dict(_VIT, img_size=28, depth=2), (3, 28, 28),
        _flat("blocks.{}.norm2", 2), block_classes=("EvaBlockPostNorm",), fold=_FOLD_POSTNORM,
        non_branch_paths={"blocks.*.mlp": _IN_BRANCH},
        note="EvaBlockPostNorm: x + drop_path2(norm2(mlp(x)))",
    ),
    Case(
        "samvit", "samvit_base_patch16",
        dict(_VIT, depth=2, global_attn_indexes=(1,), window_size=1, neck_chans=16), _S32,
        _flat("blocks.{}.mlp", 2), block_classes=("Block",), fold=_FOLD_MLP,
        note="vision_transformer_sam.Block (windowed + global attention), conv neck after the blocks",
    ),
    Case(
        "deepseek_vit", "deepseek_vit_412m", dict(_VIT, img_size=28, depth=2), (3, 28, 28),
        _flat("encoder.blocks.{}.mlp", 2), block_classes=("DeepseekVitBlock",), fold="mlp.fc2 (GluMlp) *= c",
    ),
    Case(
        "qwen3_vit", "qwen3_vit_88m_merge", dict(_VIT, depth=2, pos_embed_grid_size=4), _S32,
        _flat("encoder.blocks.{}.mlp", 2), block_classes=("EvaBlock",), fold=_FOLD_MLP,
        non_branch_paths={"encoder.merger": "Qwen3VitPatchMerger: projector after the blocks, not residual"},
    ),
    Case(
        "gemma4", "gemma4_vit_167m",
        dict(img_size=48, embed_dim=32, depth=2, num_heads=2, head_dim=16, intermediate_size=64,
             position_embedding_size=64, num_classes=5), (3, 48, 48),
        _flat("encoder.blocks.{}.norm4", 2), block_classes=("Gemma4Block",),
        fold="norm4.weight *= c (RmsNorm, no bias)", non_branch_paths={"encoder.blocks.*.mlp": _IN_BRANCH},
        note="sandwich norm: residual + drop_path(norm4(mlp(norm3(x)))); one drop_path shared with attention",
    ),
    Case(
        "naflexvit", "naflexvit_base_patch16_gap", dict(_VIT, depth=2), _S32,
        _flat("blocks.{}.mlp", 2), block_classes=("Block",), fold=_FOLD_MLP,
    ),
    Case(
        "vitamin", "vitamin_small_224", _vitamin_kwargs(), _S32,
        _flat("blocks.{}.mlp", 2), block_classes=("Block",), fold="mlp.w2 (GeGluMlp) *= c",
        note="MbConvLNBlock conv stem (patch_embed.backbone) has no MLP branch; the ViT blocks use GeGluMlp",
    ),
    # --- hierarchical windowed / pyramid transformers --------------------------------------------------------
    Case(
        "swin", "swin_tiny_patch4_window7_224",
        dict(img_size=32, embed_dim=16, depths=(2, 1), num_heads=(1, 2), window_size=4, num_classes=5), _S32,
        _staged("layers.{s}.blocks.{b}.mlp", (2, 1)), block_classes=("SwinTransformerBlock",), fold=_FOLD_MLP,
    ),
    Case(
        "swinv2", "swinv2_tiny_window8_256",
        dict(img_size=32, embed_dim=16, depths=(2, 1), num_heads=(1, 2), window_size=4, num_classes=5), _S32,
        _staged("layers.{s}.blocks.{b}.norm2", (2, 1)), block_classes=("SwinTransformerV2Block",),
        fold=_FOLD_POSTNORM,
        non_branch_paths={"layers.*.attn.cpb_mlp": "continuous position bias MLP inside attention",
                          "layers.*.mlp": _IN_BRANCH},
        note="res-post-norm: x + drop_path2(norm2(mlp(x)))",
    ),
    Case(
        "swinv2_cr", "swinv2_cr_tiny_224",
        dict(img_size=(32, 32), embed_dim=16, depths=(2, 1), num_heads=(1, 2), window_size=4, num_classes=5), _S32,
        _staged("stages.{s}.blocks.{b}.norm2", (2, 1)), block_classes=("SwinTransformerV2CrBlock",),
        affine_sites={p: (_parent(p), _parent(p) + ".norm3")
                      for p in ("stages.0.blocks.0.norm2", "stages.0.blocks.1.norm2", "stages.1.blocks.0.norm2")},
        fold=_FOLD_POSTNORM,
        non_branch_paths={"stages.*.attn.meta_mlp": "log-spaced position bias MLP inside attention",
                          "stages.*.blocks.*.mlp": _IN_BRANCH},
        note="x + drop_path2(norm2(mlp(x))), then x = norm3(x) on the main branch (extra_norm; the last block "
             "of the last stage uses it as the final norm), so the block output itself is not affine in c",
    ),
    Case(
        "pvt_v2", "pvt_v2_b0",
        dict(depths=(1, 2), embed_dims=(16, 32), num_heads=(1, 2), sr_ratios=(2, 1), mlp_ratios=(2, 2),
             num_classes=5), _S32,
        _staged("stages.{s}.blocks.{b}.mlp", (1, 2)), block_classes=("Block",),
        fold="mlp.fc2 (MlpWithDepthwiseConv) *= c",
        note="the block calls mlp(norm2(x), feat_size): a wrapper must pass the extra argument through",
    ),
    Case(
        "pvt_v2_linear", "pvt_v2_b2_li",
        dict(depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 2), sr_ratios=(2, 1), mlp_ratios=(2, 2),
             num_classes=5), _S32,
        _staged("stages.{s}.blocks.{b}.mlp", (1, 1)), block_classes=("Block",),
        fold="mlp.fc2 (MlpWithDepthwiseConv with extra ReLU) *= c",
    ),
    Case(
        "twins_pcpvt", "twins_pcpvt_small",
        dict(img_size=32, embed_dims=(16, 32), num_heads=(1, 2), mlp_ratios=(2, 2), depths=(2, 1),
             sr_ratios=(2, 1), num_classes=5), _S32,
        _staged("blocks.{s}.{b}.mlp", (2, 1)), block_classes=("Block",), fold=_FOLD_MLP,
        note="blocks is a ModuleList of stages; PosConv (pos_block) runs after the first block of each stage",
    ),
    Case(
        "twins_svt", "twins_svt_small",
        dict(img_size=32, embed_dims=(16, 32), num_heads=(1, 2), mlp_ratios=(2, 2), depths=(2, 2), wss=(4, 4),
             sr_ratios=(2, 1), num_classes=5), _S32,
        _staged("blocks.{s}.{b}.mlp", (2, 2)), block_classes=("Block",), fold=_FOLD_MLP,
        note="alternating LocallyGroupedAttn / GlobalSubSampleAttn blocks",
    ),
    Case(
        "pit", "pit_ti_224",
        dict(img_size=32, patch_size=8, stride=4, base_dims=(8, 8), depth=(2, 1), heads=(2, 4), num_classes=5),
        _S32, _staged("transformers.{s}.blocks.{b}.mlp", (2, 1)), block_classes=("Block",), fold=_FOLD_MLP,
    ),
    Case(
        "nest", "nest_tiny",
        dict(img_size=32, patch_size=4, num_levels=2, embed_dims=(16, 32), num_heads=(1, 2), depths=(2, 1),
             num_classes=5), _S32,
        _staged("levels.{s}.transformer_encoder.{b}.mlp", (2, 1)), builder=_nest,
        block_classes=("TransformerLayer",), fold=_FOLD_MLP,
    ),
    Case(
        "crossvit", "crossvit_tiny_240",
        dict(img_size=(32, 32), patch_size=(8, 16), embed_dim=(16, 32), depth=((1, 1, 1), (1, 2, 0)),
             num_heads=(2, 2), mlp_ratio=(2, 2, 1), num_classes=5), _S32,
        [["blocks.0.blocks.0.0.mlp"], ["blocks.0.blocks.1.0.mlp"],
         ["blocks.1.blocks.0.0.mlp"], ["blocks.1.blocks.1.0.mlp"], ["blocks.1.blocks.1.1.mlp"]],
        block_classes=("Block",), fold=_FOLD_MLP,
        judgement="the two scale branches are independent streams; blocks are indexed in call order (all "
                  "branch-0 blocks of a MultiScaleBlock, then branch 1), not by depth within a branch",
        note="CrossAttentionBlock fusion blocks have no MLP",
    ),
    Case(
        "davit", "davit_tiny",
        dict(embed_dims=(16, 32), depths=(1, 1), num_heads=(1, 2), window_size=4, num_classes=5), _S32,
        [["stages.0.blocks.0.0.mlp"], ["stages.0.blocks.0.1.mlp"],
         ["stages.1.blocks.0.0.mlp"], ["stages.1.blocks.0.1.mlp"]],
        block_classes=("SpatialBlock", "ChannelBlock"), fold=_FOLD_MLP,
        non_branch_paths={"head": _HEAD},
        note="each stages.s.blocks.b is Sequential(SpatialBlock, ChannelBlock): two transformer blocks; "
             "mlp is None when ffn=False",
    ),
    Case(
        "focalnet", "focalnet_tiny_srf",
        dict(embed_dim=16, depths=(1, 1), focal_levels=(2, 2), focal_windows=(3, 3), layerscale_value=1e-4,
             num_classes=5), _S32,
        _staged("layers.{s}.blocks.{b}.mlp", (1, 1)), builder=_focalnet, block_classes=("FocalNetBlock",),
        fold=_FOLD_MLP + " (or ls2.gamma)",
        note="pre-norm: norm2_post is Identity, so scaling norm2_post is equivalent to scaling mlp",
    ),
    Case(
        "focalnet_postnorm", "focalnet_tiny_srf",
        dict(embed_dim=16, depths=(1, 1), focal_levels=(2, 2), focal_windows=(3, 3), use_post_norm=True,
             layerscale_value=1e-4, num_classes=5), _S32,
        _staged("layers.{s}.blocks.{b}.norm2_post", (1, 1)), builder=_focalnet, block_classes=("FocalNetBlock",),
        fold=_FOLD_POSTNORM + " (LayerNorm2d), or ls2.gamma", non_branch_paths={"layers.*.mlp": _IN_BRANCH},
        note="use_post_norm=True: x + drop_path2(ls2(norm2_post(mlp(norm2(x))))), norm2 is Identity",
    ),
    Case(
        "gcvit", "gcvit_xxtiny",
        dict(img_size=64, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=(4, 4), num_classes=5), _S64,
        _staged("stages.{s}.blocks.{b}.mlp", (1, 1)), builder=_gcvit, block_classes=("GlobalContextVitBlock",),
        fold=_FOLD_MLP,
        note="the global-query FeatureBlock / MbConvBlock modules have no MLP branch",
    ),
    Case(
        "hiera", "hiera_tiny_224",
        dict(img_size=(32, 32), embed_dim=16, stages=(1, 2), q_pool=1, mask_unit_size=(2, 2),
             mask_unit_attn=(True, False), num_classes=5), _S32,
        _flat("blocks.{}.mlp", 3), block_classes=("HieraBlock",), fold=_FOLD_MLP,
        non_branch_paths={"head": _HEAD},
        note="q-pooling block changes dim; the attention residual is a projection but the MLP add is plain",
    ),
    Case(
        "sam2_hiera", "sam2_hiera_tiny",
        dict(embed_dim=16, stages=(1, 2), q_pool=1, window_spec=(4, 2), global_att_blocks=(2,),
             global_pos_size=(8, 8), num_classes=5), _S32,
        _flat("blocks.{}.mlp", 3), block_classes=("MultiScaleBlock",), fold=_FOLD_MLP,
        non_branch_paths={"head": _HEAD},
    ),
    Case(
        "mvitv2", "mvitv2_tiny", dict(img_size=(32, 32), num_classes=5), _S32,
        _staged("stages.{s}.blocks.{b}.mlp", (1, 2)), builder=_mvitv2, block_classes=("MultiScaleBlock",),
        fold=_FOLD_MLP,
        non_branch_paths={"stages.*.shortcut_proj_mlp": "Linear projecting the residual shortcut of the MLP add "
                                                        "at a dim change; the shortcut, not the branch"},
        note="expand_attn=False: at a dim change the MLP shortcut is shortcut_proj_mlp(norm2(x)), not x; the "
             "branch is still the mlp output. Blocks return (x, feat_size)",
    ),
    Case(
        "tiny_vit", "tiny_vit_5m_224",
        dict(embed_dims=(16, 32, 48), depths=(1, 1, 1), num_heads=(1, 2, 3), window_sizes=(4, 4, 2),
             num_classes=5), _S64,
        [["stages.1.blocks.0.mlp"], ["stages.2.blocks.0.mlp"]], block_classes=("TinyVitBlock",),
        fold="mlp.fc2 (NormMlp) *= c", non_branch_paths={"head": _HEAD},
        note="stage 0 is a ConvLayer of MBConv blocks (no MLP branch); a local_conv sits on the residual stream "
             "between attention and MLP",
    ),
    Case(
        "visformer", "visformer_tiny",
        dict(img_size=32, init_channels=8, embed_dim=48, depth=(1, 1, 1), num_heads=2, num_classes=5), _S32,
        [["stage1.0.mlp"], ["stage2.0.mlp"], ["stage3.0.mlp"]], block_classes=("Block",),
        fold="mlp.conv3 (SpatialMlp) *= c",
        judgement="stage1 blocks have attention disabled (attn_stage='011') and a grouped 3x3 conv inside "
                  "SpatialMlp; x + mlp(norm2(x)) is still an MLP residual branch on the stream, so it counts",
    ),
    Case(
        "nextvit", "nextvit_small", dict(depths=(1, 1, 5, 1), num_classes=5), _S32,
        _staged("stages.{s}.blocks.{b}.mlp", (1, 1, 5, 1)), block_classes=("NextConvBlock", "NextTransformerBlock"),
        fold="mlp.fc2 (ConvMlp) *= c",
        note="NextTransformerBlock concatenates the MHCA output channels before norm2 + mlp; widths are fixed "
             "(96..1024), depths[2] must be a multiple of 5",
        slow=True,
    ),
    # --- class-attention / token-only heads -------------------------------------------------------------------
    Case(
        "cait", "cait_xxs24_224", dict(_VIT, depth=2, depth_token_only=2), _S32,
        _flat("blocks.{}.mlp", 2) + _flat("blocks_token_only.{}.mlp", 2),
        block_classes=("LayerScaleBlock", "LayerScaleBlockClassAttn"),
        fold="gamma_2 (bare Parameter) *= c, or mlp.fc2",
        note="order: blocks, then blocks_token_only (class-attention on the cls token); one drop_path module is "
             "shared by attention and MLP",
    ),
    Case(
        "xcit", "xcit_nano_12_p16_224", dict(_VIT, depth=2, cls_attn_layers=2), _S32,
        _flat("blocks.{}.mlp", 2) + _flat("cls_attn_blocks.{}.mlp", 2),
        block_classes=("XCABlock", "ClassAttentionBlock"),
        fold="gamma2 *= c (a Parameter, or the plain float 1.0 when eta=None: then fold mlp.fc2)",
        note="XCABlock runs attn, local_mp (LPI) then mlp. ClassAttentionBlock only runs the MLP on the cls "
             "token: x_res + drop_path2(cat(gamma2 * mlp(cls), x[:, 1:])), so patch tokens are doubled "
             "regardless of the factor",
    ),
    Case(
        "volo", "volo_d1_224",
        dict(layers=(1, 1), img_size=32, patch_size=8, stem_hidden_dim=16, embed_dims=(16, 32), num_heads=(1, 2),
             downsamples=(True, False), outlook_attention=(True, False), post_layers=("ca",), num_classes=5), _S32,
        [["network.0.0.mlp"], ["network.2.0.mlp"], ["post_network.0.mlp"]], builder=_volo,
        block_classes=("Outlooker", "Transformer", "ClassBlock"), fold=_FOLD_MLP,
        note="network = [Outlooker stage, Downsample, Transformer stage]; then post_network class blocks",
    ),
    # --- serial / parallel multi-scale ------------------------------------------------------------------------
    Case(
        "coat_lite", "coat_lite_mini",
        dict(img_size=32, embed_dims=[16, 16, 16, 16], serial_depths=[1, 1, 1, 1], num_heads=2,
             crpe_window={3: 2}, mlp_ratios=[2, 2, 2, 2], num_classes=5), _S32,
        [[f"serial_blocks{s}.0.mlp"] for s in range(1, 5)], block_classes=("SerialBlock",), fold=_FOLD_MLP,
        note="one drop_path shared by attention and MLP; cpe / crpe modules are shared across a stage",
    ),
    Case(
        "coat", "coat_tiny",
        dict(img_size=64, embed_dims=[16, 16, 16, 16], serial_depths=[1, 1, 1, 1], parallel_depth=2, num_heads=2,
             crpe_window={3: 2}, mlp_ratios=[2, 2, 2, 2], num_classes=5), _S64,
        [[f"serial_blocks{s}.0.mlp"] for s in range(1, 5)]
        + [[f"parallel_blocks.{i}.mlp2"] for i in range(2)],
        block_classes=("SerialBlock", "ParallelBlock"), fold=_FOLD_MLP + " (once: mlp2 is mlp3 is mlp4)",
        note="ParallelBlock: self.mlp2 = self.mlp3 = self.mlp4 is ONE Mlp applied to x2, x3 and x4; "
             "named_modules() lists it once as mlp2. A hook on it fires three times per block; wrapping only "
             "the mlp2 attribute would leave mlp3 / mlp4 unscaled. Serial blocks run before parallel blocks",
    ),
    # --- MetaFormer family and conv-hybrids with a separate channel-MLP residual --------------------------------
    Case(
        "caformer", "caformer_s18", _caformer_kwargs(), _S32,
        _staged("stages.{s}.blocks.{b}.mlp", (1, 2)), builder=_metaformer, block_classes=("MetaFormerBlock",),
        fold=_FOLD_MLP + " (or layer_scale2.scale)",
        non_branch_paths={"head": "MlpHead classifier head"},
        note="res_scale2(x) + layer_scale2(drop_path2(mlp(norm2(x)))); SepConv stage then Attention stage",
    ),
    Case(
        "poolformer", "poolformer_s12", _poolformer_kwargs(), _S32,
        _staged("stages.{s}.blocks.{b}.mlp", (1, 2)), builder=_metaformer, block_classes=("MetaFormerBlock",),
        fold="layer_scale2.scale *= c (or mlp.fc2)",
        note="pooling token mixer; LayerScale 1e-5",
    ),
    Case(
        "efficientformer", "efficientformer_l1",
        dict(depths=(1, 1, 1, 2), embed_dims=(8, 8, 16, 16), num_vit=1, img_size=224, num_classes=5),
        (3, 224, 224),
        _staged("stages.{s}.blocks.{b}.mlp", (1, 1, 1, 1)) + [["stages.3.blocks.2.mlp"]],
        block_classes=("MetaBlock2d", "MetaBlock1d"),
        fold="MetaBlock2d: ConvMlpWithNorm ends in BatchNorm (mlp.norm2): scale its affine weight and bias, "
             "or ls2.gamma; MetaBlock1d: mlp.fc2 or ls2.gamma",
        note="stages.3.blocks = [MetaBlock2d, Flat, MetaBlock1d]: index 1 is the Flat reshaper; Attention has a "
             "fixed 7x7 resolution so the input must be 224",
    ),
    Case(
        "efficientformer_v2", "efficientformerv2_s0",
        dict(depths=(1, 1, 1, 2), embed_dims=(16, 16, 32, 32), num_vit=1, img_size=64, num_classes=5), _S64,
        _staged("stages.{s}.blocks.{b}.mlp", (1, 1, 1, 2)), block_classes=("EfficientFormerV2Block",),
        fold="mlp.fc2 is ConvNorm ending in BatchNorm: scale mlp.fc2.bn affine weight and bias, or ls2.gamma",
        judgement="blocks without attention (token_mixer None, all but the last of stage 3) are "
                  "x + ls2(mlp(x)) with a depthwise conv inside the MLP; counted as MLP branches",
    ),
    Case(
        "fastvit", "fastvit_sa12", dict(layers=(1, 1, 1, 1), embed_dims=(16, 16, 32, 32), num_classes=5), _S32,
        _staged("stages.{s}.blocks.{b}.mlp", (1, 1, 1, 1)), block_classes=("RepMixerBlock", "AttentionBlock"),
        fold="mlp.fc2 (ConvMlp) *= c, or layer_scale / layer_scale_2",
        judgement="RepMixer token mixer (conv, own residual) + ConvMlp (starts with a depthwise 7x7 conv) "
                  "branch: MetaFormer layout, counted",
    ),
    Case(
        "repvit", "repvit_m0_9", dict(embed_dim=(16, 32), depth=(1, 1), num_classes=5), _S32,
        [["stages.0.blocks.0.channel_mixer"], ["stages.1.downsample.pre_block.channel_mixer"],
         ["stages.1.downsample.ffn"], ["stages.1.blocks.0.channel_mixer"]],
        block_classes=("RepViTBlock", "RepVitDownsample"),
        fold="conv2 of RepVitMlp is ConvNorm(bn_weight_init=0): scale its BatchNorm affine weight and bias",
        judgement="a convnet with a MetaFormer layout (RepVggDw token mixer, then identity + channel_mixer(x)); "
                  "RepVitDownsample ends with its own residual FFN after the strided conv",
    ),
    Case(
        "shvit", "shvit_s1",
        dict(embed_dim=(16, 32, 48), depth=(1, 1, 1), partial_dim=(4, 8, 12), types=("i", "s", "s"),
             num_classes=5), _S64,
        [["stages.0.blocks.0.ffn.m"], ["stages.1.downsample.1.m"], ["stages.1.downsample.4.m"],
         ["stages.1.blocks.0.ffn.m"], ["stages.2.downsample.1.m"], ["stages.2.downsample.4.m"],
         ["stages.2.blocks.0.ffn.m"]],
        block_classes=("Residual",), fold="ffn.pw2.bn (bn_weight_init=0) affine weight and bias *= c",
        judgement="every Residual(FFN) counts, including the two around each PatchMerging (downsample.1 and "
                  "downsample.4); each is its own index; BasicBlock of type 'i' has no attention (dwconv mixer)",
    ),
    Case(
        "iformer", "iformer_t",
        dict(dims=(8, 16, 32, 32), depths=(1, 1, 3, 4), attn_groups=(0, 0, 1, 1),
             attn_head_dim_reduction=(0, 0, 2, 2), num_classes=5), _S64,
        [["stages.2.blocks.2.mixer.module"], ["stages.3.blocks.2.mixer.module"]],
        block_classes=("Residual",), fold="mixer.gamma (when layer scale is on) or the last ConvNorm's BN *= c",
        judgement="the FFN is its own module in the stage Sequential (RepCPE, SHMABlock, FFN); ConvBlock "
                  "(dwconv + pointwise MLP in one residual) is ConvNeXt-style and not counted",
        note="Residual: x + gamma * drop_path(module(x)), gamma None at layer_scale_init_value=0",
    ),
    Case(
        "swiftformer", "swiftformer_xs",
        dict(layers=(2, 1), embed_dims=(16, 32), downsamples=(False, True), num_classes=5), _S32,
        [["stages.0.blocks.1.linear"], ["stages.1.blocks.0.linear"]], block_classes=("Block",),
        fold="linear.fc2 (swiftformer Mlp, BN inside before fc1) *= c, or layer_scale_2",
        note="the MLP is called `linear`; ConvEncoder blocks (all but the last of a stage) are ConvNeXt-style "
             "and not counted",
    ),
    Case(
        "efficientvit_msra", "efficientvit_m0",
        dict(img_size=32, embed_dim=(16, 32), key_dim=(4, 4), depth=(1, 1), num_heads=(2, 2), window_size=(4, 4),
             down_ops=(("", 1), ("subsample", 2)), num_classes=5), _S32,
        [["stages.0.blocks.0.ffn0.m", "stages.0.blocks.0.ffn1.m"], ["stages.1.downsample.res1.1.m"],
         ["stages.1.downsample.res2.1.m"], ["stages.1.blocks.0.ffn0.m", "stages.1.blocks.0.ffn1.m"]],
        block_paths=["stages.0.blocks.0", "stages.1.downsample.res1.1", "stages.1.downsample.res2.1",
                     "stages.1.blocks.0"],
        block_classes=("EfficientVitBlock", "ResidualDrop"),
        fold="ConvMlp.pw2 is ConvNorm(bn_weight_init=0): scale its BN affine weight and bias",
        judgement="EfficientVitBlock is dw0, ffn0, attention, dw1, ffn1 (two FFNs in series): both share the "
                  "block's index; the ResidualDrop(ConvMlp) around each stage's PatchMerging get their own",
    ),
    Case(
        "efficientvim", "efficientvim_m1",
        dict(embed_dim=(16, 32, 48), depths=(1, 1, 1), state_dim=(8, 8, 4), num_classes=5), _S64,
        _staged("stages.{s}.blocks.{b}.ffn", (1, 1, 1)), block_classes=("EfficientViMBlock",),
        fold="ffn.fc2 (ConvLayer2d, BN with bn_weight_init=0) affine weight and bias *= c",
        judgement="the FFN residual is x + drop_path(a * (ffn(x) - x)) = (1 - a) x + a ffn(x) with "
                  "a = sigmoid(alpha[3]); scaling ffn's output scales the MLP term a * ffn(x), which is the "
                  "reading used here (alpha is a shared 4 x dim Parameter, not a module)",
        note="an HSM-SSD (Mamba-like) mixer, not attention; blocks return (x, h)",
    ),
    Case(
        "lowformer", "lowformer_b0",
        dict(width_list=(8, 8, 16, 16, 32), depth_list=(0, 1, 1, 1, 1), head_widths=(32, 32), num_classes=5),
        _S32, [["stages.2.1.mlp.main"], ["stages.3.1.mlp.main"]],
        block_paths=["stages.2.1.mlp", "stages.3.1.mlp"], block_classes=("ResidualBlock",),
        fold="the last 1x1 conv of mlp.main (index 3) weight and bias *= c",
        judgement="LowFormerBlock = attn, mlp, local MBConv, each a ResidualBlock; the MLP is "
                  "ResidualBlock(Sequential(GroupNorm1, conv1x1, GELU, conv1x1, Dropout)) and the add happens in "
                  "that ResidualBlock, before the local MBConv",
    ),
    Case(
        "cpubone", "cpubone_nano",
        dict(width_list=(8, 8, 16, 16, 32), depth_list=(0, 1, 1, 1, 1), head_widths=(32, 32), num_classes=5),
        _S32, [["stages.2.1.total.0.1.main"], ["stages.3.1.total.0.1.main"]],
        block_paths=["stages.2.1.total.0.1", "stages.3.1.total.0.1"], block_classes=("ResidualBlock",),
        fold="the last 1x1 conv of main (index 3) weight and bias *= c",
        judgement="CPUBoneBlock.total = Sequential(Sequential(attn ResidualBlock, MLP ResidualBlock), local "
                  "ResidualBlock); the MLP has no module name containing 'mlp'",
    ),
    Case(
        "csatv2", "csatv2",
        dict(dims=(8, 16, 32, 32), depths=(1, 1, 2, 2), transformer_depths=(0, 0, 1, 1), num_classes=5), _S64,
        [["stages.2.2.mlp"], ["stages.3.2.mlp"]], block_classes=("TransformerBlock",),
        fold=_FOLD_MLP + " (or ls2)",
        non_branch_paths={"stages.*.attn.attn.mlp": "SpatialTransformerBlock: a 1-channel transformer that "
                                                    "computes the spatial-attention gate of a ConvNeXt-style "
                                                    "Block; not on the model's residual stream",
                          "head": _HEAD},
        judgement="only the stage-3/4 TransformerBlocks count; the gate transformer inside each conv Block has a "
                  "residual MLP of its own (width 1) that a structural probe would also find",
    ),
    # --- all-MLP / RNN mixers (mlp_channels) --------------------------------------------------------------------
    Case(
        "mixer", "mixer_s32_224", dict(img_size=32, patch_size=8, num_blocks=3, embed_dim=32, num_classes=5), _S32,
        _flat("blocks.{}.mlp_channels", 3), builder=_mixer, block_classes=("MixerBlock",), fold=_FOLD_MLP,
        non_branch_paths={"blocks.*.mlp_tokens": "token-mixing MLP: the block's token mixer, not its channel MLP"},
        note="one drop_path shared by the token and channel branches",
    ),
    Case(
        "resmlp", "resmlp_12_224", dict(img_size=32, patch_size=8, num_blocks=3, embed_dim=32, mlp_ratio=4,
                                        num_classes=5), _S32,
        _flat("blocks.{}.mlp_channels", 3), builder=_resmlp, block_classes=("ResBlock",),
        fold="ls2 (bare Parameter) *= c, or mlp_channels.fc2",
        note="x + drop_path(ls2 * mlp_channels(norm2(x))), Affine norms; token mixer is linear_tokens",
    ),
    Case(
        "gmlp", "gmlp_ti16_224", dict(img_size=32, patch_size=8, num_blocks=3, embed_dim=32, mlp_ratio=6,
                                      num_classes=5), _S32,
        _flat("blocks.{}.mlp_channels", 3), builder=_gmlp, block_classes=("SpatialGatingBlock",),
        fold="mlp_channels.fc2 (GatedMlp) *= c",
        note="the block's only branch: x + drop_path(mlp_channels(norm(x))), the spatial gating unit sits "
             "inside the GatedMlp",
    ),
    Case(
        "sequencer", "sequencer2d_s",
        dict(img_size=32, layers=(1, 2), patch_sizes=(4, 2), embed_dims=(16, 32), hidden_sizes=(8, 16),
             mlp_ratios=(2, 2), num_classes=5), _S32,
        _staged("stages.{s}.blocks.{b}.mlp_channels", (1, 2)), builder=_sequencer,
        block_classes=("Sequencer2dBlock",), fold=_FOLD_MLP,
        note="BiLSTM token mixer (rnn_tokens); one drop_path shared by both branches",
    ),
    # --- transformer blocks inside convnet scaffolds -------------------------------------------------------------
    Case(
        "levit", "levit_128s", dict(img_size=32, embed_dim=(32, 48), key_dim=8, depth=(1, 2), num_heads=(2, 3),
                                    num_classes=5), _S32,
        [["stages.0.blocks.0.mlp"], ["stages.1.downsample.mlp"], ["stages.1.blocks.0.mlp"],
         ["stages.1.blocks.1.mlp"]],
        block_classes=("LevitBlock", "LevitDownsample"),
        fold="LevitMlp ends in ln2 = LinearNorm (Linear + BatchNorm1d, bn_weight_init=0): scale ln2.bn affine "
             "weight and bias, not ln2.linear",
        note="LevitDownsample: attn_downsample (no residual) then x + drop_path(mlp(x)): its own block, between "
             "the stages' blocks",
    ),
    Case(
        "levit_conv", "levit_conv_128s",
        dict(img_size=32, embed_dim=(32, 48), key_dim=8, depth=(1, 1), num_heads=(2, 3), num_classes=5), _S32,
        [["stages.0.blocks.0.mlp"], ["stages.1.downsample.mlp"], ["stages.1.blocks.0.mlp"]],
        block_classes=("LevitBlock", "LevitDownsample"),
        fold="ln2 = ConvNorm (1x1 conv + BatchNorm2d): scale ln2.bn affine weight and bias",
    ),
    Case(
        "mobilevit", "mobilevit_xxs", dict(num_classes=5), _S64,
        [[f"stages.{s}.1.transformer.{b}.mlp"] for s, d in ((2, 2), (3, 4), (4, 3)) for b in range(d)],
        block_classes=("Block",), fold=_FOLD_MLP,
        note="ByobNet; each MobileVitBlock holds a Sequential `transformer` of vit Blocks",
    ),
    Case(
        "mobilevitv2", "mobilevitv2_050", dict(num_classes=5), _S64,
        [[f"stages.{s}.1.transformer.{b}.mlp"] for s, d in ((2, 2), (3, 4), (4, 3)) for b in range(d)],
        block_classes=("LinearTransformerBlock",), fold="mlp.fc2 (ConvMlp) *= c",
    ),
    Case(
        "maxvit", "test_maxvit", dict(img_size=64, num_classes=5), _S64,
        [[f"stages.{s}.blocks.0.{part}.mlp"] for s in range(4) for part in ("attn_block", "attn_grid")],
        block_classes=("PartitionAttentionCl",), fold=_FOLD_MLP,
        note="MaxxVitBlock = MbConv, window attention block, grid attention block: the two attention parts are "
             "separate transformer blocks with their own MLPs",
    ),
    Case(
        "maxvit_nchw", "maxvit_tiny_tf_224", dict(img_size=64, num_classes=5), _S64,
        [[f"stages.{s}.blocks.0.attn_grid.mlp"] for s in range(2)],
        builder=_maxxvit("M", no_block_attn=True, use_nchw_attn=True), block_classes=("PartitionAttention2d",),
        fold="mlp.fc2 (ConvMlp) *= c",
        note="use_nchw_attn=True and no_block_attn=True (grid attention only)",
    ),
    Case(
        "maxxvit", "maxxvit_rmlp_nano_rw_256", dict(img_size=64, num_classes=5), _S64,
        [[f"stages.{s}.blocks.0.{part}.mlp"] for s in range(2) for part in ("attn_block", "attn_grid")],
        builder=_maxxvit("M", conv="convnext", rel_pos_type="mlp"), block_classes=("PartitionAttentionCl",),
        fold=_FOLD_MLP,
        non_branch_paths={"stages.*.blocks.*.conv.mlp": "ConvNeXtBlock: the MLP follows the dwconv inside one "
                                                        "residual branch",
                          "stages.*.attn.rel_pos": "RelPosMlp inside attention"},
    ),
    Case(
        "maxvit_parallel", "maxvit_tiny_pm_256", dict(img_size=64, num_classes=5), _S64,
        [[f"stages.{s}.blocks.0.attn.mlp"] for s in range(2)], builder=_maxxvit("PM"),
        block_classes=("ParallelPartitionAttention",), fold=_FOLD_MLP,
        note="ParallelMaxxVitBlock: window and grid attention in parallel, one MLP",
    ),
    Case(
        "coatnet", "test_coatnet", dict(img_size=64, num_classes=5), _S64,
        [["stages.2.blocks.0.mlp"], ["stages.2.blocks.1.mlp"], ["stages.3.blocks.0.mlp"]],
        block_classes=("TransformerBlock2d",), fold="mlp.fc2 (ConvMlp) *= c",
        note="stages 0-1 are MbConvBlocks",
    ),
    Case(
        "convit", "convit_tiny", dict(_VIT, depth=3, local_up_to_layer=2), _S32,
        _flat("blocks.{}.mlp", 3), block_classes=("Block",), fold=_FOLD_MLP,
        note="GPSA blocks then MHSA blocks; one drop_path shared by both branches",
    ),
    Case(
        "tnt", "tnt_s_patch16_224",
        dict(img_size=32, embed_dim=32, inner_dim=8, depth=2, num_heads_outer=2, num_heads_inner=2, num_classes=5),
        _S32, _flat("blocks.{}.mlp", 2), inner_paths=_flat("blocks.{}.mlp_in", 2), block_classes=("Block",),
        fold=_FOLD_MLP + " (outer); mlp_in.fc2 for the inner branch",
        note="each Block runs an inner transformer on pixel embeddings (attn_in, mlp_in) and an outer one on "
             "patch embeddings (attn_out, mlp). branch_paths holds the outer (patch-level) MLP, the block's "
             "transformer MLP in the ViT sense; inner_paths holds mlp_in, a second residual MLP on the "
             "pixel-level stream whose output reaches the patch stream only through proj. One drop_path is "
             "shared by all four branches. Blocks return (pixel_embed, patch_embed)",
    ),
]

# ----------------------------------------------------------------------------------------------------------------
# models without any transformer MLP residual branch: reweight must raise ValueError

ERROR_CASES: list[ErrorCase] = [
    ErrorCase("resnet", "test_resnet", dict(num_classes=5), _S32, "a convnet: bottleneck residual blocks only"),
    ErrorCase("convnext", "test_convnext", dict(num_classes=5), _S32,
              "ConvNeXtBlock: the MLP follows the 7x7 dwconv inside one residual branch"),
    ErrorCase("edgenext", "edgenext_xx_small", dict(num_classes=5), _S32,
              "ConvBlock and SplitTransposeBlock put conv / XCA and the MLP in one residual branch"),
    ErrorCase("inception_next", "inception_next_atto", dict(num_classes=5), _S32,
              "MetaNeXtBlock: token mixer, norm and MLP in one residual branch"),
    ErrorCase("mambaout", "test_mambaout", dict(num_classes=5), _S32, "GatedConvBlock: a single gated conv branch"),
    ErrorCase("fasternet", "fasternet_t0", dict(num_classes=5), _S32,
              "MLPBlock: partial conv then MLP in one residual branch"),
    ErrorCase("efficientnet", "test_efficientnet", dict(num_classes=5), _S32, "inverted-residual convnet"),
    ErrorCase("mobilenetv3", "mobilenetv3_small_050", dict(num_classes=5), _S32, "inverted-residual convnet"),
    ErrorCase("starnet", "starnet_s050", dict(num_classes=5), _S32, "star-operation conv blocks"),
    ErrorCase("byobnet", "test_byobnet", dict(num_classes=5), _S32, "configurable convnet"),
    ErrorCase("nfnet", "test_nfnet", dict(num_classes=5), _S32, "normalizer-free convnet"),
    ErrorCase("convmixer", "convmixer_768_32", dict(dim=16, depth=2, kernel_size=3, patch_size=4, num_classes=5),
              _S32, "residual only around the depthwise conv; the pointwise conv is not residual",
              builder=_convmixer),
    ErrorCase("efficientvit_mit", "efficientvit_b0", dict(num_classes=5), _S32,
              "EfficientVitBlock = LiteMLA attention + MBConv local module; a transformer with no MLP"),
    ErrorCase("vit_depth0", "test_vit", dict(img_size=32, depth=0, num_classes=5), _S32,
              "a ViT with zero blocks: nothing to reweight"),
]

_BY_ID = {c.id: c for c in CASES}
if len(_BY_ID) != len(CASES):
    raise RuntimeError("duplicate case ids in CASES")


def get_case(case_id: str) -> Case:
    """Return the case with this id.

    Args:
        case_id: A :attr:`Case.id`.

    Returns:
        The case.

    Example:
        >>> get_case("swinv2").branch_paths[0]
        ['layers.0.blocks.0.norm2']
    """
    try:
        return _BY_ID[case_id]
    except KeyError:
        raise KeyError(f"no case {case_id!r}; known: {sorted(_BY_ID)}") from None


# ----------------------------------------------------------------------------------------------------------------
# helpers


def create(case: Case | ErrorCase, seed: int = 0) -> nn.Module:
    """Build the case's model (``pretrained=False``, eval mode) with a seeded init, leaving the global RNG alone.

    Args:
        case: A table entry.
        seed: Seed of the weight initialisation.

    Returns:
        The model in eval mode.

    Example:
        >>> model = create(get_case("vit"))
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if case.builder is not None:
            model = case.builder(**case.kwargs)
        else:
            model = _create_named(case.model_name, **case.kwargs)
    return model.eval()


def example_input(case: Case | ErrorCase, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A deterministic random input batch of the case's ``input_size``.

    Example:
        >>> example_input(get_case("vit")).shape
        torch.Size([2, 3, 32, 32])
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *case.input_size), generator=gen)


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomise every constant-valued parameter and BatchNorm running statistic, in place.

    timm initialises many tensors to constants that would make reweighting checks vacuous: LayerScale gammas at
    1e-5, zero-initialised BatchNorm weights at the end of MLPs (LeViT, RepViT, EfficientViT), zero heads, norm
    affines at 1 / 0, BatchNorm running stats at 0 / 1 (which would hide a fold on the wrong side of a BN).
    Rules, applied to floating parameters whose elements are all equal (single-element tensors included):

    * matrices (two or more dimensions) whose entries are all below 1e-3 in magnitude, constant or not (heads
      scaled by ``head_init_scale=0.001``): -> N(0, 1/sqrt(fan_in)).
    * value 0: names ending in ``weight`` with one dimension (norm scales) -> U(0.5, 1.5); other 1-D / scalar
      tensors (biases, zero gates) -> N(0, 0.1); tensors with two or more dimensions -> N(0, 1/sqrt(fan_in)).
    * 0 < |value| < 0.01 (LayerScale-style inits): -> U(0.2, 1.0) with the value's sign.
    * otherwise: value * U(0.5, 1.5) elementwise.

    BatchNorm buffers: running_mean -> N(0, 0.1), running_var -> U(0.5, 1.5). Non-constant tensors are untouched.

    Args:
        model: Model to modify.
        seed: Seed of the generator.

    Returns:
        The same model.

    Example:
        >>> model = perturb(create(get_case("levit")), seed=1)
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return torch.rand(t.shape, generator=gen, dtype=torch.float32) * (high - low) + low

    def normal(t: torch.Tensor, std: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=torch.float32) * std

    for name, param in model.named_parameters():
        if not param.is_floating_point() or param.numel() == 0:
            continue
        flat = param.detach().reshape(-1)
        if param.dim() >= 2 and float(flat.abs().max()) < 1e-3:
            # near-zero matrices (heads scaled by head_init_scale=0.001 in EVA, BEiT, Hiera) count as zero
            fan_in = max(1, param.numel() // param.shape[0])
            param.copy_(normal(param, 1.0 / math.sqrt(fan_in)).to(param.dtype))
            continue
        if not bool((flat == flat[0]).all()):
            continue
        value = float(flat[0])
        if value == 0.0:
            if param.dim() <= 1 and name.endswith("weight"):
                new = uniform(param, 0.5, 1.5)
            elif param.dim() <= 1:
                new = normal(param, 0.1)
            else:
                fan_in = max(1, param.numel() // param.shape[0])
                new = normal(param, 1.0 / math.sqrt(fan_in))
        elif abs(value) < 0.01:
            new = uniform(param, 0.2, 1.0) * math.copysign(1.0, value)
        else:
            new = uniform(param, 0.5, 1.5) * value
        param.copy_(new.to(param.dtype))
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats and module.running_mean is not None:
            module.running_mean.copy_(normal(module.running_mean, 0.1).to(module.running_mean.dtype))
            module.running_var.copy_(uniform(module.running_var, 0.5, 1.5).to(module.running_var.dtype))
    return model


def random_factors(case: Case, seed: int = 0, low: float = 0.3, high: float = 0.9) -> list[float]:
    """One random factor per block, in ``[low, high)``, away from 1 so checks can fail.

    Example:
        >>> len(random_factors(get_case("cait"))) == len(get_case("cait").branch_paths)
        True
    """
    gen = torch.Generator().manual_seed(seed)
    return [low + (high - low) * float(v) for v in torch.rand(len(case.branch_paths), generator=gen)]


def scale_path(model: nn.Module, path: str, factor: float, column_start: int | None = None) -> Any:
    """Scale one module's output (or its input columns ``[..., column_start:]``) by ``factor`` with a hook.

    Args:
        model: The model.
        path: Dotted module path.
        factor: Multiplier.
        column_start: If given, scale these input columns of the module instead of its output.

    Returns:
        The hook handle (call ``.remove()``).

    Example:
        >>> model = create(get_case("vit"))
        >>> handle = scale_path(model, "blocks.0.mlp", 0.5)
        >>> handle.remove()
    """
    module = model.get_submodule(path)
    c = float(factor)
    if column_start is None:
        def scale_output(_mod: nn.Module, _args: tuple, output: Any) -> Any:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"{path} returned {type(output).__name__}, expected a tensor")
            return output * c

        return module.register_forward_hook(scale_output)

    start = int(column_start)

    def scale_columns(_mod: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (torch.cat([x[..., :start], x[..., start:] * c], dim=-1), *args[1:])

    return module.register_forward_pre_hook(scale_columns)


def apply_reference_scaling(
        model: nn.Module,
        case: Case,
        factors: Sequence[float],
        *,
        inner_factors: Sequence[float] | None = None,
) -> list[Any]:
    """Install hooks that scale block ``i``'s MLP branch by ``factors[i]``: the reference implementation.

    Every path of ``case.branch_paths[i]`` gets a forward hook multiplying its output by ``factors[i]``, or, for
    paths in ``case.input_column_slices``, a forward pre-hook multiplying input columns ``[..., start:]``. A module
    listed under several names (CoaT's shared ``mlp2 = mlp3 = mlp4``) is hooked once; its hook fires on every call.

    Args:
        model: A model built from ``case`` (see :func:`create`).
        case: The table entry.
        factors: One factor per block, ``len(case.branch_paths)`` of them.
        inner_factors: Optional factors for ``case.inner_paths`` (TnT's inner MLP), one per block.

    Returns:
        The hook handles; call ``.remove()`` on each to restore the model.

    Raises:
        ValueError: ``factors`` (or ``inner_factors``) has the wrong length, or one module would get two
            different factors.

    Example:
        >>> case = get_case("swinv2")
        >>> model = create(case)
        >>> handles = apply_reference_scaling(model, case, random_factors(case))
        >>> _ = model(example_input(case))
        >>> for h in handles:
        ...     h.remove()
    """
    groups: list[tuple[list[str], float]] = []
    if len(factors) != len(case.branch_paths):
        raise ValueError(f"case {case.id!r} has {len(case.branch_paths)} blocks, got {len(factors)} factors")
    groups += [(paths, float(f)) for paths, f in zip(case.branch_paths, factors, strict=True)]
    if inner_factors is not None:
        if len(inner_factors) != len(case.inner_paths):
            raise ValueError(f"case {case.id!r} has {len(case.inner_paths)} inner branches, "
                             f"got {len(inner_factors)} inner factors")
        groups += [(paths, float(f)) for paths, f in zip(case.inner_paths, inner_factors, strict=True)]
    seen: dict[int, tuple[str, float]] = {}
    handles = []
    try:
        for paths, c in groups:
            for path in paths:
                module = model.get_submodule(path)
                if id(module) in seen:
                    other, other_c = seen[id(module)]
                    if other_c != c:
                        raise ValueError(f"{path} is the same module as {other} but gets factor {c} != {other_c}")
                    continue
                seen[id(module)] = (path, c)
                handles.append(scale_path(model, path, c, case.input_column_slices.get(path)))
    except Exception:
        for h in handles:
            h.remove()
        raise
    return handles
