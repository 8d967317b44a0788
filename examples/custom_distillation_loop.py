"""A hand-written distillation loop around ``timm_remem.distill.RememDistillationTask``.

What it shows:
    * ``RememDistillationTask(student, teacher, DistillationLoss(...))``: ``task(x, y)`` returns the loss, the student
      output and the teacher logits; the teacher stays frozen in eval mode and gets the student's input re-normalised
      and resized to its own resolution;
    * SAM on the student, two-step form, reusing the teacher logits in the second pass (``teacher_logits=``), so the
      teacher runs once per step;
    * a ``TeacherLogitCache`` by sample index (``indices=``) for deterministic inputs: from the second epoch on the
      teacher is not run at all;
    * EMA of the student through the task (``setup_ema`` / ``update_ema`` / ``get_eval_model``).

Run:
    python examples/custom_distillation_loop.py --teacher runs/vitb-remem/checkpoints/epoch-015
        # a teacher folder written by finetune_teacher / save_pretrained (or hf-hub:me/name), CIFAR-100 at 32 px,
        # ResNet-18 student; downloads CIFAR-100 into --data-dir, GPU advised
    python examples/custom_distillation_loop.py --smoke   # random tiny ViT teacher, test_resnet student, digits,
                                                          # offline, seconds
"""

import argparse

import timm
import torch

import timm_remem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="random tiny teacher, digits, a few batches")
    parser.add_argument("--teacher", default="runs/vitb-remem/checkpoints/epoch-015")
    parser.add_argument("--dataset", default="torch/cifar100")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rho", type=float, default=0.05, help="SAM radius for the student (0: plain SGD)")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    student_name, batch_size = "resnet18", 128

    if args.smoke:
        # 256 training images so that two short epochs see the same samples (the second one all from the cache).
        train_set = torch.utils.data.Subset(timm_remem.data.create_dataset("digits", split="train", img_size=32),
                                            range(256))
        val_set = timm_remem.data.create_dataset("digits", split="val", img_size=32)
        teacher_model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=10)
        args.epochs, student_name, batch_size = 2, "test_resnet", 64
    else:
        kw = {"root": args.data_dir, "img_size": 32, "download": True}
        train_set = timm_remem.data.create_dataset(args.dataset, split="train", **kw)
        val_set = timm_remem.data.create_dataset(args.dataset, split="val", **kw)
        teacher_model = timm_remem.load_teacher(args.teacher, merge=True)    # eval mode, strict key check
    num_classes = teacher_model.num_classes
    student = timm.create_model(student_name, pretrained=False, num_classes=num_classes).to(device)

    # Count teacher forwards with a plain hook, to see the reuse and the cache at work.
    calls = []
    teacher_model.register_forward_hook(lambda *_: calls.append(1))

    # No random augmentation here, so the teacher's view of each sample is the same every epoch: cache its logits.
    cache = timm_remem.distill.TeacherLogitCache(len(train_set))
    teacher = timm_remem.Teacher(teacher_model.to(device), student, cache=cache)
    loss_fn = timm_remem.DistillationLoss("kd", task_weight=0.5, distill_weight=0.5, temperature=4.0)
    task = timm_remem.distill.RememDistillationTask(student, teacher, loss_fn, verbose=False)
    task.setup_ema(decay=0.99)

    params = task.get_trainable_module().parameters()    # the student (+ feature projectors, if any)
    if args.rho > 0:
        opt = timm_remem.SAM(params, torch.optim.SGD, rho=args.rho, lr=0.05, momentum=0.9, weight_decay=5e-4)
    else:
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = timm_remem.data.create_loader(train_set, batch_size, shuffle=True)

    step = 0
    for epoch in range(args.epochs):
        loader.sampler.set_epoch(epoch)
        task.train()                                      # student in train mode, teacher stays in eval
        calls.clear()
        for x, y, index in loader:
            x, y = x.to(device), y.to(device)
            out = task(x, y, indices=index)               # teacher runs here, or its logits come from the cache
            out["loss"].backward()
            if isinstance(opt, timm_remem.SAM):
                if opt.first_step(zero_grad=True):
                    with opt.second_pass(task):           # second pass at w + e: no teacher call
                        task(x, y, teacher_logits=out["teacher_logits"])["loss"].backward()
                opt.second_step(zero_grad=True)
            else:
                opt.step()
                opt.zero_grad()
            step += 1
            task.update_ema(step)
        print(f"epoch {epoch}: loss {out['loss'].item():.4f} (task {out['task_loss'].item():.4f}, "
              f"kd {out['kd_loss'].item():.4f}), teacher forwards {len(calls)}")
        if epoch > 0:
            assert not calls, "cached epochs must not run the teacher"

    # Evaluate the EMA student: get_eval_model gives the bare student (no teacher, no projectors).
    model = task.get_eval_model(ema=True).eval()
    correct = total = 0
    with torch.no_grad():
        for x, y, _ in timm_remem.data.create_loader(val_set, 256):
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
            total += len(y)
    print(f"EMA student val acc {correct / total:.3f}; teacher cache complete: {cache.complete}")


if __name__ == "__main__":
    main()
