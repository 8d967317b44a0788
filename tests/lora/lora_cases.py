"""Tiny models of three transformer families for the LoRA tests (data only, no tests).

Each entry: timm model name, the kwargs that make it tiny, the input size, and its block Linear layers named as the
family's timm source names them (read from timm 1.0.31's ``vision_transformer.py``, ``swin_transformer.py`` and
``eva.py``), written out by hand: the independent reference for what LoRA should adapt.
"""

from __future__ import annotations

import timm
import torch

FAMILIES = {
    # name: (timm model, kwargs, input size, depth, prefix of block i)
    "vit": ("vit_small_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                          num_classes=5), 32),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, embed_dim=16, depths=(2, 1), num_heads=(1, 2),
                                                  window_size=4, num_classes=5), 32),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28, embed_dim=32, depth=2, num_heads=2, num_classes=5), 28),
}
# The block paths of each family (bottom-up) and the classifier path.
BLOCKS = {
    "vit": ["blocks.0", "blocks.1"],
    "swin": ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0"],
    "eva02": ["blocks.0", "blocks.1"],
}
HEAD = {"vit": "head", "swin": "head.fc", "eva02": "head"}
# Within a block: attention in/out, MLP in/out (every family names them alike).
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
# Layers the forward reads by weight without calling them: EVA's attention computes
# F.linear(x, weight=self.qkv.weight, bias=cat(q_bias, k_bias, v_bias)) (timm/models/eva.py, EvaAttention.forward).
BYPASSED = {"eva02": ("qkv",)}


def create(family: str, seed: int = 0) -> torch.nn.Module:
    name, kwargs, _ = FAMILIES[family]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs)


def example(family: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    size = FAMILIES[family][2]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def expected_targets(family: str, leaves=("qkv", "proj", "fc1", "fc2")) -> list[str]:
    """Block Linear paths whose last name is in ``leaves`` (less the family's bypassed layers)."""
    leaves = [leaf for leaf in leaves if leaf not in BYPASSED.get(family, ())]
    return [f"{b}.{leaf}" for b in BLOCKS[family] for leaf in BLOCK_LINEARS if leaf.rsplit(".", 1)[-1] in leaves]
