"""Fine-tune a teacher with ReMem (MLP reweighting + SAM) using ``timm_remem.train.finetune_teacher``.

What it shows:
    * the Python twin of ``timm-remem finetune``: one ``FinetuneConfig`` (or its fields as keyword arguments);
    * what a run writes (``config.json``, ``metrics.jsonl``, resumable ``train-state/``, exports in
      ``checkpoints/epoch-NNN``), and that an export loads with plain timm (reweighting merged).

Run:
    python examples/finetune_teacher.py --output runs/vitb-remem
        # the README's CIFAR-100 recipe: vit_base_patch16_224.augreg_in21k, 30 epochs, SAM rho=0.1, alpha=0.85.
        # Downloads the model and CIFAR-100 (into --data-dir); needs a GPU (hours).
    python examples/finetune_teacher.py --smoke
        # offline digits, a tiny random ViT, 1 epoch, in a temporary folder (seconds)
"""

import argparse
import json
import tempfile
from pathlib import Path

import timm
import torch

import timm_remem


def recipe(args: argparse.Namespace) -> timm_remem.train.FinetuneConfig:
    """The CIFAR-100 recipe of README.md / docs/pipeline.md (hyper-parameters are ours, not the paper's)."""
    return timm_remem.train.FinetuneConfig(
        model="vit_base_patch16_224.augreg_in21k", pretrained=True,
        dataset="torch/cifar100", data_dir=args.data_dir, download=True, img_size=224, augment=True,
        epochs=30, batch_size=64, optimizer="sgd", lr=0.01, weight_decay=0.0, warmup_epochs=2,
        alpha=0.85, rho=0.1,                       # ReMem: reweight the MLP branches, SAM at a large radius
        amp=True, clip_grad=1.0, save_at=[5, 10, 15, 20, 25, 30], output=args.output,
        resume=args.resume or None,                # True: continue from the newest intact checkpoint
    )


def smoke(output: str) -> timm_remem.train.FinetuneConfig:
    """The same job on scikit-learn's digits (shipped with scikit-learn) with timm's tiny test ViT."""
    return timm_remem.train.FinetuneConfig(
        model="test_vit", dataset="digits", img_size=16, epochs=1, batch_size=64, lr=1e-3,
        alpha=0.85, rho=0.05, save_at=[1], output=output, device="cpu", progress=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="offline digits, tiny ViT, 1 epoch")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--output", default="runs/vitb-remem")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        config = smoke(f"{tmp}/teacher") if args.smoke else recipe(args)
        print("settings:", json.dumps({k: v for k, v in config.to_dict().items()
                                      if k in ("model", "dataset", "epochs", "alpha", "rho", "lr")}))
        result = timm_remem.train.finetune_teacher(config)

        # The returned model stays reweighted (keep training it); the exports are merged.
        print(f"val acc {result.val_acc:.3f} in {result.wall_time:.1f}s; reweighted: "
              f"{timm_remem.is_reweighted(result.model)}")
        for row in result.history:
            print(f"  epoch {row['epoch']}: train_loss {row['train_loss']:.4f} val_acc {row['val_acc']:.3f}")
        print("run folder:", sorted(p.name for p in Path(result.output).iterdir()))
        print("exports:", [p.name for p in result.checkpoints])

        # Any export is a plain timm checkpoint: no timm-remem needed to load it.
        last = result.checkpoints[-1]
        plain = timm.create_model(f"local-dir:{last}", pretrained=True).eval()
        x = torch.randn(4, 3, config.img_size, config.img_size)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), result.model.eval()(x), rtol=1e-4, atol=1e-4)
        print(f"{last.name} loads with timm.create_model('local-dir:...') and matches the trained teacher")


if __name__ == "__main__":
    main()
