"""Choose which teacher checkpoint to distill from: distill-and-compare, and the MI ranking.

ReMem's point: the most accurate teacher checkpoint is not always the one that teaches best. Two ways to choose:
    * ``select_teacher``: a short distillation of the same student from every checkpoint (teacher logits cached),
      keep the checkpoint whose student is most accurate; ``mi_score=True`` also reports the MI score and its
      Spearman correlation with the students' accuracy;
    * ``rank_checkpoints``: no distillation, an MI-based score per checkpoint (accuracy and I(X; F_T) through a
      noise channel; see docs/analysis.md). Cheap, but check its correlation with student accuracy on your data.

Run:
    python examples/choose_teacher_checkpoint.py --checkpoints runs/vitb-remem/checkpoints
        # exports of finetune_teacher (examples/finetune_teacher.py), ResNet-18 students on CIFAR-100 at 32 px;
        # downloads CIFAR-100 into --data-dir, GPU advised
    python examples/choose_teacher_checkpoint.py --smoke
        # trains a tiny ViT for 2 epochs on digits (2 checkpoints), then both methods; offline, seconds
"""

import argparse
import tempfile
from pathlib import Path

import timm

import timm_remem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny ViT checkpoints on digits, offline")
    parser.add_argument("--checkpoints", default="runs/vitb-remem/checkpoints")
    parser.add_argument("--dataset", default="torch/cifar100")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--output", default="runs/select-remem")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            # Three exported checkpoints (epoch-001..003) of a tiny ReMem teacher.
            run = timm_remem.train.finetune_teacher(
                model="test_vit", img_size=16, epochs=3, save_at=[1, 2, 3], alpha=0.85, rho=0.05, lr=3e-3,
                limit_train_batches=6, output=f"{tmp}/teacher", device="cpu", progress=False)
            args.checkpoints, args.output = str(run.output / "checkpoints"), f"{tmp}/select"
            short = dict(model="test_resnet", dataset="digits", img_size=16, epochs=1, lr=3e-3,
                         limit_train_batches=6, device="cpu", progress=False)
        else:
            short = dict(model="resnet18", dataset=args.dataset, data_dir=args.data_dir, download=True, img_size=32,
                         epochs=10, lr=0.05, optimizer="sgd")

        # 1. Distill-and-compare (DistillConfig fields as keyword arguments).
        sel = timm_remem.train.select_teacher(args.checkpoints, mi_score=True, output=args.output, **short)
        print(sel.table)
        print(f"best by student accuracy: {sel.best.name}")

        # 2. The MI ranking alone, on held-out data without augmentation (no student trained). The checkpoints get
        #    the images as they expect them: their own resolution and normalisation, read from one of them.
        first = timm_remem.load_teacher(sorted(Path(args.checkpoints).iterdir())[0])
        cfg = timm.data.resolve_model_data_config(first)
        rank_data = timm_remem.data.create_dataset("digits" if args.smoke else args.dataset, root=args.data_dir,
                                              split="val", img_size=cfg["input_size"][-1], mean=cfg["mean"],
                                              std=cfg["std"])
        loader = timm_remem.data.create_loader(rank_data, 256)
        ranking = timm_remem.analysis.rank_checkpoints(args.checkpoints, loader, score="combined", progress=False,
                                              max_samples=1024)
        for r in ranking:
            print(f"  rank {r.rank}: {r.name}  score {r.score:+.3f}  acc {r.info.accuracy:.3f}  "
                  f"I(X;T) {r.info.i_xf:.3f} nats")
        assert {r.name for r in ranking} == {row["checkpoint"] for row in sel.rows}
        print(f"best by MI ranking: {ranking[0].name}")


if __name__ == "__main__":
    main()
