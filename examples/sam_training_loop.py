"""SAM (sharpness-aware minimization) in a plain timm training loop, four ways.

What it shows:
    * ``closure``: ``loss = opt.step(closure)``: the closure runs at w and at w + e; SAM handles BatchNorm
      statistics, dropout masks and DDP by itself.
    * ``two-step``: ``first_step`` / ``second_pass`` / ``second_step``, for loops that cannot use a closure.
    * ``amp``: mixed precision with a ``torch.amp.GradScaler`` given to SAM (never call ``scaler.step`` yourself),
      with gradient clipping through ``max_grad_norm``.
    * ``one-pass``: the loop of timm's ``train.py``: ``loss.backward(); scaler.step(opt)`` with timm's
      ``"samsgd"`` (registered by ``import timm_remem``): Momentum-SAM, one forward/backward per step.
    The exact forms build SAM with ``timm_remem.sam.create_sam`` (timm's parameter groups, no weight decay on norms
    and biases); every form uses a timm cosine LR scheduler with warm-up, updated per step.

Run:
    python examples/sam_training_loop.py            # pretrained ViT-S/16 on digits at 224 px (download; GPU advised)
    python examples/sam_training_loop.py --smoke    # tiny random ViT, a few batches per form, offline, seconds
"""

import argparse

import timm
import timm.data
import timm.optim
import timm.scheduler
import torch
import torch.nn.functional as F

import timm_remem
from timm_remem.sam import OnePassSAM, create_sam


def closure_step(opt: timm_remem.SAM, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    def closure():                                   # forward + backward, returns the loss; zeroes nothing
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    loss = opt.step(closure)                         # two passes; returns the loss at w
    opt.zero_grad()
    return loss


def two_step(opt: timm_remem.SAM, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with opt.first_pass(model):                      # records the RNG (dropout replay); no_sync under DDP
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    if opt.first_step(zero_grad=True):               # w -> w + e; False on skipped / plain steps
        with opt.second_pass(model):                 # same dropout masks, BatchNorm statistics left alone
            F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)                  # back to w, base optimizer step
    return loss


def amp_step(opt: timm_remem.SAM, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
             scaler: torch.amp.GradScaler, dtype: torch.dtype) -> torch.Tensor:
    def closure():
        with torch.autocast(x.device.type, dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        return loss
    # SAM unscales both passes, skips non-finite steps, clips, and calls scaler.update() once:
    # never call scaler.step / scaler.update yourself.
    loss = opt.step(closure, scaler=scaler, max_grad_norm=1.0)
    opt.zero_grad()
    return loss


def one_pass_step(opt: OnePassSAM, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                  scaler: torch.amp.GradScaler, dtype: torch.dtype) -> torch.Tensor:
    # timm's train.py, word for word in spirit: nothing SAM-specific. The optimizer perturbs the weights before the
    # training forward and puts them back as the backward finishes; a step GradScaler skips leaves them clean.
    with torch.autocast(x.device.type, dtype=dtype):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    return loss


def train(form: str, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=10, **args.model_kwargs).to(device)
    norm = {k: v for k, v in timm.data.resolve_model_data_config(model).items() if k in ("mean", "std")}
    train_set = timm_remem.data.create_dataset("digits", split="train", img_size=args.img_size, **norm)
    loader = timm_remem.data.create_loader(train_set, args.batch_size, shuffle=True, drop_last=True)
    steps = min(len(loader), args.max_batches or len(loader))

    if form == "one-pass":  # timm's registry name: the one-pass SAM, driven by step() alone
        opt = timm.optim.create_optimizer_v2(model, "samsgd", lr=args.lr, weight_decay=1e-4, rho=args.rho)
    else:  # the exact SAM around timm's SGD (Nesterov), on timm's no-weight-decay groups; rho is a group field
        opt = create_sam(model, "sgd", lr=args.lr, weight_decay=1e-4, rho=args.rho)
    sched = timm.scheduler.CosineLRScheduler(opt, t_initial=args.epochs * steps, warmup_t=max(1, steps // 4),
                                             warmup_lr_init=args.lr / 10, t_in_epochs=False)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type) if form in ("amp", "one-pass") else None

    model.train()
    sam_steps = 0
    for epoch in range(args.epochs):
        loader.sampler.set_epoch(epoch)
        for step, (x, y, _index) in enumerate(loader):
            if step == steps:
                break
            x, y = x.to(device), y.to(device)
            if form == "closure":
                loss = closure_step(opt, model, x, y)
            elif form == "two-step":
                loss = two_step(opt, model, x, y)
            elif form == "one-pass":
                loss = one_pass_step(opt, model, x, y, scaler, amp_dtype)
            else:
                loss = amp_step(opt, model, x, y, scaler, amp_dtype)
            sam_steps += opt.stats.perturbed if form == "one-pass" else opt.stats.sam_step
            sched.step_update(epoch * steps + step + 1)   # per-step schedule (t_in_epochs=False)
            if step % max(1, steps // 4) == 0:
                stats = opt.stats
                gnorm = stats.direction_norm if form == "one-pass" else stats.grad_norm
                increase = getattr(stats, "loss_increase", None)
                print(f"  [{form}] epoch {epoch} step {step}: loss {loss.item():.4f} "
                      f"lr {opt.param_groups[0]['lr']:.2e}" + (f" norm {gnorm:.3f}" if gnorm is not None else "")
                      + (f" loss_increase {increase:.4f}" if increase is not None else ""))

    model.eval()
    val_set = timm_remem.data.create_dataset("digits", split="val", img_size=args.img_size, **norm)
    val = timm_remem.data.create_loader(val_set, 256)
    correct = total = 0
    with torch.no_grad():
        for x, y, _index in val:
            correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
            total += len(y)
    skipped = getattr(opt, "skipped_steps", 0)
    print(f"[{form}] {sam_steps} SAM steps, {skipped} skipped, val acc {correct / total:.3f}")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random model, a few batches, offline")
    parser.add_argument("--forms", nargs="+", default=["closure", "two-step", "amp", "one-pass"],
                        choices=["closure", "two-step", "amp", "one-pass"])
    parser.add_argument("--model", default="vit_small_patch16_224.augreg_in21k")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    args.pretrained, args.model_kwargs, args.img_size, args.max_batches = True, {}, 224, None
    if args.smoke:
        args.model, args.pretrained, args.model_kwargs = "test_vit", False, {"img_size": 32}
        args.img_size, args.epochs, args.batch_size, args.max_batches, args.lr = 32, 1, 32, 6, 0.05
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    models = {form: train(form, args, device) for form in args.forms}
    if "closure" in models and "two-step" in models:
        # Same seed, same data, same masks: the two forms compute the same update.
        for a, b in zip(models["closure"].parameters(), models["two-step"].parameters(), strict=True):
            torch.testing.assert_close(a, b)
        print("closure and two-step forms give the same weights")


if __name__ == "__main__":
    main()
