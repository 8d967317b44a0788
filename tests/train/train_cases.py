"""Settings shared by the training tests: tiny digits runs and one short ReMem teacher."""

from __future__ import annotations

from pathlib import Path

from timm_remem.train import TrainResult, finetune_teacher

TINY = dict(dataset="digits", img_size=16, batch_size=64, eval_batch_size=512, progress=False)
VIT = dict(TINY, model="test_vit")
CNN = dict(TINY, model="test_resnet")


def short_teacher_run(out: Path) -> TrainResult:
    """A reweighted (alpha=0.7) SAM teacher, 2 epochs of 2 batches, exported after each epoch."""
    return finetune_teacher(**VIT, epochs=2, save_at=[1, 2], limit_train_batches=2, alpha=0.7, rho=0.05,
                            output=str(out))
