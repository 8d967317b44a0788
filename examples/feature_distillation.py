"""Early-layer feature distillation (Distillation Dynamics' spectral loss) on top of logit KD.

What it shows:
    * ``timm_remem.distill.spectral_loss`` on two block outputs taken from timm's ``forward_intermediates`` (NCHW
      maps; the wider map's channels are pooled to the narrower width, then 2-D FFT over (H, W) and MSE);
    * ``FeatureDistillation(student, teacher, pairs=[(0, 0)], kind="spectral")`` plugged into
      ``RememDistillationTask(..., features=fd)``: the total loss adds ``fd.weight * feature_loss`` (0.2);
    * the warning logged for late-layer pairs (late alignment tends to hurt ViT students), and a CNN student whose
      stage maps are resized to the ViT teacher's grid.

Run:
    python examples/feature_distillation.py --teacher runs/vitb-remem/checkpoints/epoch-015
        # a fine-tuned teacher folder (or hf-hub:me/name), ViT-Ti/16 student on CIFAR-100 at 224 px; GPU advised
    python examples/feature_distillation.py --smoke      # tiny random ViTs on digits, offline, seconds
"""

import argparse
import logging
import sys

import timm
import torch

import timm_remem

# Show the library's warnings (logger "timm_remem.distill") in the output, shortened.
logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="  logged %(levelname)s: %(message).100s...")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random ViTs, digits, a few steps")
    parser.add_argument("--teacher", default="runs/vitb-remem/checkpoints/epoch-015")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")

    if args.smoke:
        size, args.steps = 32, 6
        vit = {"img_size": size, "patch_size": 8, "num_classes": 10}     # a 4x4 token grid
        teacher = timm.create_model("test_vit2", pretrained=False, **vit)
        student = timm.create_model("test_vit", pretrained=False, **vit)
        data = timm_remem.data.create_dataset("digits", split="train", img_size=size)
        cnn = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    else:
        size = 224
        teacher = timm_remem.load_teacher(args.teacher, merge=True)
        student = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=teacher.num_classes)
        data = timm_remem.data.create_dataset("torch/cifar100", root=args.data_dir, img_size=size, download=True)
        cnn = timm.create_model("resnet18", pretrained=False, num_classes=teacher.num_classes)
    teacher, student = teacher.to(device).eval(), student.to(device)

    # 1. The loss by hand on the first block of each model.
    x = torch.stack([data[i][0] for i in range(8)]).to(device)
    with torch.no_grad():
        f_s = student.forward_intermediates(x, indices=[0], output_fmt="NCHW", intermediates_only=True)[0]
        f_t = teacher.forward_intermediates(x, indices=[0], output_fmt="NCHW", intermediates_only=True)[0]
    print(f"block 0: student {tuple(f_s.shape)}, teacher {tuple(f_t.shape)}, "
          f"spectral loss {timm_remem.distill.spectral_loss(f_s, f_t).item():.4f}")

    # 2. Early pairs only (the default [(0, 0)]); a late pair logs a warning that explains why it tends to hurt.
    timm_remem.distill.FeatureDistillation(student, teacher, pairs=[(-1, -1)])
    fd = timm_remem.distill.FeatureDistillation(student, teacher, pairs=[(0, 0), (1, 1)], kind="spectral", weight=0.2)
    loss = timm_remem.DistillationLoss("kd", task_weight=0.1, distill_weight=0.9, label_smoothing=0.1)
    task = timm_remem.distill.RememDistillationTask(student, teacher, loss, features=fd, verbose=False)
    opt = torch.optim.AdamW(task.get_trainable_module().parameters(), lr=1e-3, weight_decay=0.05)
    loader = timm_remem.data.create_loader(data, 64, shuffle=True, drop_last=True)

    task.train()
    step, epoch = 0, 0
    while step < args.steps:
        loader.sampler.set_epoch(epoch)
        for x, y, _ in loader:
            out = task(x.to(device), y.to(device))
            out["loss"].backward()
            opt.step()
            opt.zero_grad()
            if step % max(1, args.steps // 5) == 0:
                print(f"step {step}: loss {out['loss'].item():.4f} = 0.1 * task {out['task_loss'].item():.4f} "
                      f"+ 0.9 * kd {out['kd_loss'].item():.4f} + 0.2 * feature {out['feature_loss'].item():.4f}")
            step += 1
            if step == args.steps:
                break
        epoch += 1
    assert torch.isfinite(out["loss"]), "the loss must stay finite"

    # 3. A CNN student: ResNet stage maps (stem, layer1..4) are compared with ViT blocks on the student's grid.
    fd_cnn = timm_remem.distill.FeatureDistillation(cnn.to(device), teacher, pairs=[(1, 0)])
    with torch.no_grad():
        s_maps = cnn.forward_intermediates(x[:8].to(device), indices=[1], intermediates_only=True)
    print(f"CNN student stage 1 {tuple(s_maps[0].shape)} vs teacher block 0: pairs {fd_cnn.pairs}")
    cnn_task = timm_remem.distill.RememDistillationTask(cnn, teacher, features=fd_cnn, verbose=False)
    cnn_out = cnn_task(x[:8].to(device), y[:8].to(device))
    print(f"CNN student feature loss {cnn_out['feature_loss'].item():.4f}")


if __name__ == "__main__":
    main()
