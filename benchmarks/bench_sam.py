"""Benchmark: cost of SAM's own work (norm, save, perturb, restore) against two references, side by side.

Implementations (all around the same base optimizer, SGD with momentum 0.9):

- ``ours``: ``timm_remem.SAM``.
- ``davda54``: a straightforward implementation of the davda54/sam algorithm written below (clone the weights,
  build ``e_w`` per tensor, rebind ``p.data`` to restore).
- ``pytorch_optimizer``: ``pytorch_optimizer.SAM`` when importable (``pip install pytorch_optimizer``, the
  ``bench`` extra).

Measured:

1. ``vit_tiny_patch16_224`` at img_size 64, batch 16. SAM-only cost = time(first_step) + time(second_step) -
   time(base step), on the gradients of two real passes (set before each call, so many interleaved repeats are
   cheap), shown in ms, as % of one forward+backward, and as a ratio to each reference. Whole real iterations are
   compared with the floor (two forward+backward passes and one base step).
2. ``vit_base_patch16_224`` with synthetic gradients (no forward): SAM-only cost on 86M parameters.

Numbers are the fastest of interleaved repeats (the implementations take turns), so load from other processes
skews them least. Nothing is asserted about time.

Usage:
    python benchmarks/bench_sam.py [--repeats 3] [--sam-repeats 30] [--base-repeats 6] [--skip-vit-base]
        [--adaptive] [--device cpu] [--threads N] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from timm_remem.sam import SAM  # noqa: E402


class DavdaSAM(torch.optim.Optimizer):
    """The davda54/sam algorithm, written plainly: per-tensor clone, ``e_w`` temporaries, ``p.data`` rebinding."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _grad_norm(self):
        device = self.param_groups[0]["params"][0].device
        return torch.norm(
            torch.stack(
                [
                    ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2).to(device)
                    for group in self.param_groups
                    for p in group["params"]
                    if p.grad is not None
                ]
            ),
            p=2,
        )


def implementations(adaptive: bool) -> dict[str, Callable]:
    kw = dict(rho=0.5 if adaptive else 0.05, adaptive=adaptive, lr=0.01, momentum=0.9)
    impls = {
        "ours": lambda params: SAM(params, torch.optim.SGD, **kw),
        "davda54": lambda params: DavdaSAM(params, torch.optim.SGD, **kw),
    }
    try:
        import pytorch_optimizer

        impls["pytorch_optimizer"] = lambda params: pytorch_optimizer.SAM(params, torch.optim.SGD, **kw)
    except ImportError:
        print("pytorch_optimizer not importable: `pip install pytorch_optimizer` to compare with it.")
    return impls


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_TIMER = time.perf_counter


def _clock(device: torch.device) -> float:
    _sync(device)
    return _TIMER()


def _best_ms(values: list[float]) -> float:
    """Fastest repeat in ms: on a shared machine the minimum is the least disturbed measurement."""
    return 1000.0 * min(values)


def _time_sam_only(params, impls, g1, g2, repeats, device):
    """Interleaved timing of first_step + second_step on fixed gradients, and of a plain base step."""
    opts = {name: make(params) for name, make in impls.items()}
    base = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    sam_t: dict[str, list[float]] = {n: [] for n in impls}
    base_t: list[float] = []

    def set_grads(grads):
        for p, g in zip(params, grads, strict=True):
            p.grad = g

    for r in range(repeats + 1):  # round 0 warms up (buffers, momentum, allocator)
        set_grads(g2)
        t0 = _clock(device)
        base.step()
        t1 = _clock(device)
        if r:
            base_t.append(t1 - t0)
        for name, opt in opts.items():
            set_grads(g1)
            t0 = _clock(device)
            opt.first_step(zero_grad=True)
            t1 = _clock(device)
            set_grads(g2)
            t2 = _clock(device)
            opt.second_step(zero_grad=True)
            t3 = _clock(device)
            if r:
                sam_t[name].append((t1 - t0) + (t3 - t2))
    set_grads([None] * len(params))
    return sam_t, _best_ms(base_t)


def bench_vit_tiny(repeats: int, sam_repeats: int, adaptive: bool, device: torch.device) -> None:
    print("\n== vit_tiny_patch16_224, img_size 64, batch 16 ==")
    impls = implementations(adaptive)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10)
    model.to(device).train()
    params = list(model.parameters())
    x = torch.randn(16, 3, 64, 64, device=device)
    y = torch.randint(0, 10, (16,), device=device)

    def fwd_bwd():
        F.cross_entropy(model(x), y).backward()

    # Real gradients of two passes, reused for the interleaved SAM-only timing.
    grads = []
    for _ in range(2):
        fwd_bwd()
        grads.append([p.grad.detach().clone() for p in params])
        for p in params:
            p.grad = None
    sam_t, base_ms = _time_sam_only(params, impls, grads[0], grads[1], sam_repeats, device)

    # Whole iterations: the floor (two forward+backward passes and a base step) and each implementation.
    floor_opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    opts = {name: make(params) for name, make in impls.items()}
    fb_t, floor_t = [], []
    iter_t: dict[str, list[float]] = {n: [] for n in impls}
    for r in range(repeats + 1):
        t0 = _clock(device)
        fwd_bwd()
        t1 = _clock(device)
        floor_opt.zero_grad()
        fwd_bwd()
        floor_opt.step()
        t2 = _clock(device)
        floor_opt.zero_grad()
        if r:
            fb_t.append(t1 - t0)
            floor_t.append(t2 - t0)
        for name, opt in opts.items():
            t0 = _clock(device)
            fwd_bwd()
            opt.first_step(zero_grad=True)
            fwd_bwd()
            opt.second_step(zero_grad=True)
            t1 = _clock(device)
            if r:
                iter_t[name].append(t1 - t0)
    fb, floor = _best_ms(fb_t), _best_ms(floor_t)
    print(
        f"{sum(p.numel() for p in params) / 1e6:.1f}M parameters; one forward+backward {fb:.1f} ms, "
        f"base SGD step {base_ms:.2f} ms, floor iteration {floor:.1f} ms (best of {repeats}); "
        f"SAM-only: best of {sam_repeats}"
    )
    extra = {
        "iter/floor": {n: f"{_best_ms(iter_t[n]) / floor:.3f}" for n in impls},
        "derived": {n: f"{(floor + _best_ms(sam_t[n]) - base_ms) / floor:.3f}" for n in impls},
    }
    _report(sam_t, base_ms, fb, extra)
    print("iter/floor: measured whole iterations; derived: (floor + SAM-only) / floor, steadier on a busy machine")


def bench_vit_base_synthetic(repeats: int, adaptive: bool, device: torch.device) -> None:
    print("\n== vit_base_patch16_224, synthetic gradients (no forward) ==")
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    g1 = [torch.randn_like(p) * 1e-3 for p in params]
    g2 = [torch.randn_like(p) * 1e-3 for p in params]
    sam_t, base_ms = _time_sam_only(params, implementations(adaptive), g1, g2, repeats, device)
    print(f"{sum(p.numel() for p in params) / 1e6:.1f}M parameters, base SGD step {base_ms:.1f} ms, best of {repeats}")
    _report(sam_t, base_ms, None)


def _report(sam_t, base_ms, fb_ms, extra=None):
    cost = {n: _best_ms(v) - base_ms for n, v in sam_t.items()}
    refs = [n for n in cost if n != "ours"]
    extra = extra or {}
    cols = ["impl", "first+second ms", "SAM-only ms", "x base step"]
    if fb_ms:
        cols.append("% of fwd+bwd")
    cols += [f"ours / {n}" for n in refs] + list(extra)
    rows = []
    for name, c in cost.items():
        row = [name, f"{_best_ms(sam_t[name]):.1f}", f"{c:.1f}", f"{c / base_ms:.2f}"]
        if fb_ms:
            row.append(f"{100 * c / fb_ms:.1f}%")
        row += [f"{cost['ours'] / cost[n]:.2f}" if name == "ours" else "" for n in refs]
        row += [values[name] for values in extra.values()]
        rows.append(row)
    widths = [max(len(r[i]) for r in [cols, *rows]) + 2 for i in range(len(cols))]
    for r in [cols, *rows]:
        print("".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="whole ViT-Ti iterations per implementation")
    parser.add_argument("--sam-repeats", type=int, default=30, help="SAM-only repeats on ViT-Ti gradients")
    parser.add_argument("--base-repeats", type=int, default=6, help="repeats for the ViT-B synthetic benchmark")
    parser.add_argument("--skip-vit-base", action="store_true")
    parser.add_argument("--adaptive", action="store_true", help="ASAM (rho 0.5) instead of SAM")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time, robust on an oversubscribed machine (use with --threads 1)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    global _TIMER
    _TIMER = time.process_time if args.clock == "cpu" else time.perf_counter
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {args.clock} clock, device {device}, {'ASAM' if args.adaptive else 'SAM'}"
    )
    bench_vit_tiny(args.repeats, args.sam_repeats, args.adaptive, device)
    if not args.skip_vit_base:
        bench_vit_base_synthetic(args.base_repeats, args.adaptive, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
