"""A LoRA teacher with ReMem (reweighting + SAM), merged back to plain timm, then distilled into a small student.

What it shows:
    * ``finetune_teacher(lora_rank=...)``: peft LoRA adapters on the attention and MLP Linear layers, the head
      trained fully, every other weight frozen; reweighting and SAM on top (SAM perturbs only what trains);
    * the export is a plain timm checkpoint: LoRA folded by peft, then the factors; ``timm.create_model(
      "local-dir:...", pretrained=True)`` loads it and gives the adapted teacher's outputs;
    * ``timm_remem.lora.apply_lora`` / ``merge_lora`` by hand, and ``distill_student`` from the export.

Run:
    python examples/lora_teacher.py --output runs/vitl-lora
        # ViT-L/16 (augreg in21k) on CIFAR-100, LoRA rank 16: downloads the model and the data; needs a GPU.
    python examples/lora_teacher.py --smoke
        # offline digits, timm's tiny test ViT with random weights, 1 epoch each, in a temporary folder (seconds)

Needs peft: ``pip install timm-remem[lora]``.
"""

import argparse
import tempfile

import timm
import torch

import timm_remem
from timm_remem.lora import apply_lora, merge_lora, trainable_parameters


def teacher_config(args: argparse.Namespace, output: str) -> timm_remem.train.FinetuneConfig:
    if args.smoke:
        return timm_remem.train.FinetuneConfig(
            model="test_vit", dataset="digits", img_size=16, epochs=1, batch_size=64, lr=5e-3,
            alpha=0.85, rho=0.05, lora_rank=8, save_at=[1], output=output, device="cpu", progress=False,
            limit_train_batches=12,
        )
    return timm_remem.train.FinetuneConfig(   # a big teacher: LoRA keeps SAM's extra memory to the adapters
        model="vit_large_patch16_224.augreg_in21k", pretrained=True, dataset="torch/cifar100",
        data_dir=args.data_dir, download=True, img_size=224, augment=True, epochs=10, batch_size=64,
        optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup_epochs=1, amp=True, clip_grad=1.0,
        alpha=0.85, rho=0.1, lora_rank=16, lora_alpha=32, lora_dropout=0.05, save_at=[5, 10], output=output,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="offline digits, tiny ViT, 1 epoch")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--output", default="runs/vitl-lora")
    args = parser.parse_args()

    # 1. By hand: adapters, then the reweighting; merge folds both back into a plain timm model.
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=10)
    total = sum(p.numel() for p in model.parameters())
    teacher = timm_remem.reweight(apply_lora(model, rank=4), alpha=0.85)
    print(f"apply_lora: {trainable_parameters(teacher):,} of {total:,} parameters train (adapters + head)")
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.02)  # as if trained
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = teacher.eval()(x)
        plain = merge_lora(teacher)
        print(f"merge_lora: plain {type(plain.blocks[0].mlp.fc1).__name__} layers, max |diff| "
              f"{float((plain(x) - y).abs().max()):.2e}")

    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/teacher" if args.smoke else args.output
        # 2. The pipeline: a LoRA teacher with reweighting and SAM; exports are merged plain timm checkpoints.
        cfg = teacher_config(args, out)
        result = timm_remem.train.finetune_teacher(cfg)
        print(f"LoRA teacher: val acc {result.val_acc:.3f}, {result.trainable_params:,} trained parameters")
        export = result.checkpoints[-1]
        reloaded = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
        size = cfg.img_size
        x = torch.randn(4, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(x), result.model.eval()(x), rtol=1e-5, atol=1e-5)
        print(f"{export.name} loads with plain timm (local-dir:) and matches the adapted, reweighted teacher")

        # 3. Distill a student from the export, like any teacher.
        student = timm_remem.train.distill_student(
            model="test_resnet" if args.smoke else "resnet18", dataset=cfg.dataset, data_dir=cfg.data_dir,
            img_size=size if args.smoke else 224, epochs=1 if args.smoke else 30, teacher=str(export),
            save_at=[], output=f"{tmp}/student" if args.smoke else f"{args.output}-student",
            device=cfg.device, progress=cfg.progress, limit_train_batches=cfg.limit_train_batches,
        )
        print(f"student from the LoRA teacher: val acc {student.val_acc:.3f} (teacher {student.teacher_acc:.3f})")


if __name__ == "__main__":
    main()
