"""The offline demo's settings; the demo itself (``timm-remem demo``) is a small study in
:mod:`timm_remem.study.demo`, which sits above this room.
"""

from __future__ import annotations

__all__ = ["DEMO_TEACHER", "DEMO_TEACHER_KWARGS", "DEMO_STUDENT", "DEMO_STUDENT_KWARGS", "DEMO_ALPHA",
           "DEMO_RHO"]

#: The demo's teacher: a small ViT (timm ``vit_tiny_patch16_224`` rebuilt for 32 px digits).
DEMO_TEACHER = "vit_tiny_patch16_224"
DEMO_TEACHER_KWARGS = {"patch_size": 8, "embed_dim": 96, "depth": 6, "num_heads": 3}
#: The demo's student: a CNN from timm (ResNet-18 at a quarter of its width).
DEMO_STUDENT = "resnet18"
DEMO_STUDENT_KWARGS = {"channels": (16, 32, 64, 128), "stem_width": 16}
#: ReMem settings of the demo (chosen a priori, not tuned on the demo's results).
DEMO_ALPHA = 0.85
DEMO_RHO = 0.05
