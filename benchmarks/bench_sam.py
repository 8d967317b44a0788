"""Benchmark: SAM and ASAM against two references, side by side in one run: own work, buffers, whole step.

Implementations (all around the same base optimizer, SGD with momentum 0.9; ASAM with rho 0.5):

- ``ours``: ``timm_remem.SAM``.
- ``davda54``: a straightforward implementation of the davda54/sam algorithm written below (clone the weights,
  build ``e_w`` per tensor, rebind ``p.data`` to restore; its ASAM has no ``eta``).
- ``pytorch_optimizer``: ``pytorch_optimizer.SAM`` when importable (``pip install pytorch_optimizer``, the
  ``bench`` extra).

Measured for SAM and for ASAM on ``vit_tiny_patch16_224`` at img_size 64, batch 16:

1. SAM's own work = time(first_step) + time(second_step) - time(base step), on the gradients of two real passes
   (set before each call, so many interleaved repeats are cheap): ms, and ours / each reference.
2. Buffers, as multiples of the trainable parameters' bytes: what SAM holds while the perturbed pass runs, and the
   peak inside ``first_step`` (its persistent buffers plus what it allocates, from torch.profiler's memory events).
3. The whole step (two forward+backward passes, SAM's work, the base step; ours through
   ``step(closure, model=model)``, the references through their two-step API) / one plain step (forward+backward,
   base step, zero_grad). The floor is 2.0.

Optionally (default on) ``vit_base_patch16_224`` with synthetic gradients (no forward): 1 and 2 on 86M parameters.

Numbers are the fastest of interleaved repeats (the implementations take turns), so load from other processes
skews them least; the load average is printed before and after. Nothing is asserted about time.

Usage:
    python benchmarks/bench_sam.py [--modes sam asam] [--repeats 5] [--sam-repeats 30] [--base-repeats 6]
        [--skip-vit-base] [--device cpu] [--threads N] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

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


MODES = {"sam": False, "asam": True}


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


def _set_grads(params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = g


def _time_sam_only(params, impls, g1, g2, repeats, device):
    """Interleaved timing of first_step + second_step on fixed gradients, and of a plain base step."""
    opts = {name: make(params) for name, make in impls.items()}
    base = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    sam_t: dict[str, list[float]] = {n: [] for n in impls}
    base_t: list[float] = []
    for r in range(repeats + 1):  # round 0 warms up (buffers, momentum, allocator)
        _set_grads(params, g2)
        t0 = _clock(device)
        base.step()
        t1 = _clock(device)
        if r:
            base_t.append(t1 - t0)
        for name, opt in opts.items():
            _set_grads(params, g1)
            t0 = _clock(device)
            opt.first_step(zero_grad=True)
            t1 = _clock(device)
            _set_grads(params, g2)
            t2 = _clock(device)
            opt.second_step(zero_grad=True)
            t3 = _clock(device)
            if r:
                sam_t[name].append((t1 - t0) + (t3 - t2))
    _set_grads(params, [None] * len(params))
    return sam_t, _best_ms(base_t)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _buffers(params, impls, g1, g2) -> dict[str, tuple[float, float]]:
    """Per implementation: (bytes held while the perturbed pass runs, peak inside first_step) / parameter bytes.

    Held = SAM's persistent buffers (ours: ``buffer_nbytes``; the references keep none between steps beyond the
    weights themselves) plus what ``first_step`` allocated and did not free; the peak adds the highest running total
    of first_step's allocations (the profiler attributes each allocation to the op that made it, each free to a
    ``[memory]`` event). Measured on the second step, after the first allocated what is allocated once.
    """
    param_bytes = _nbytes(params)
    out = {}
    for name, make in impls.items():
        opt = make(params)
        for step in range(2):
            _set_grads(params, g1)
            if step:
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                    opt.first_step(zero_grad=True)
                events = sorted(prof.events(), key=lambda e: e.time_range.start)
                total = peak = 0
                for e in events:
                    total += e.self_cpu_memory_usage
                    peak = max(peak, total)
                persistent = opt.buffer_nbytes if isinstance(opt, SAM) else 0
                out[name] = ((persistent + total) / param_bytes, (persistent + peak) / param_bytes)
            else:
                opt.first_step(zero_grad=True)
            _set_grads(params, g2)
            opt.second_step(zero_grad=True)
    _set_grads(params, [None] * len(params))
    return out


def _vit_tiny_grads(model, x, y, params):
    grads = []
    for _ in range(2):
        F.cross_entropy(model(x), y).backward()
        grads.append([p.grad.detach().clone() for p in params])
        _set_grads(params, [None] * len(params))
    return grads


def bench_vit_tiny(mode: str, repeats: int, sam_repeats: int, device: torch.device) -> None:
    adaptive = MODES[mode]
    print(f"\n== {mode.upper()}: vit_tiny_patch16_224, img_size 64, batch 16 ==")
    impls = implementations(adaptive)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10)
    model.to(device).train()
    params = list(model.parameters())
    x = torch.randn(16, 3, 64, 64, device=device)
    y = torch.randint(0, 10, (16,), device=device)

    g1, g2 = _vit_tiny_grads(model, x, y, params)
    sam_t, base_ms = _time_sam_only(params, impls, g1, g2, sam_repeats, device)
    buffers = _buffers(params, impls, g1, g2) if device.type == "cpu" else {}

    def fwd_bwd():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    # Whole steps, interleaved: one plain step, then one SAM step of each implementation.
    plain = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    opts = {name: make(params) for name, make in impls.items()}
    plain_t: list[float] = []
    step_t: dict[str, list[float]] = {n: [] for n in impls}
    for r in range(repeats + 1):
        t0 = _clock(device)
        fwd_bwd()
        plain.step()
        plain.zero_grad()
        t1 = _clock(device)
        if r:
            plain_t.append(t1 - t0)
        for name, opt in opts.items():
            t0 = _clock(device)
            if isinstance(opt, SAM):
                opt.step(fwd_bwd, model=model)
                opt.zero_grad()
            else:
                fwd_bwd()
                opt.first_step(zero_grad=True)
                fwd_bwd()
                opt.second_step(zero_grad=True)
            t1 = _clock(device)
            if r:
                step_t[name].append(t1 - t0)
    plain_ms = _best_ms(plain_t)
    print(
        f"{sum(p.numel() for p in params) / 1e6:.2f}M parameters; base SGD step {base_ms:.2f} ms "
        f"(best of {sam_repeats}); plain step (fwd+bwd+step) {plain_ms:.1f} ms (best of {repeats})"
    )
    extra = {"step / plain step": {n: f"{_best_ms(step_t[n]) / plain_ms:.3f}" for n in impls}}
    _report(sam_t, base_ms, buffers, extra)
    print("step / plain step: two forward+backward passes, SAM's work and the base step, over one plain step "
          "(floor 2.0)")


def bench_vit_base_synthetic(mode: str, repeats: int, device: torch.device) -> None:
    adaptive = MODES[mode]
    print(f"\n== {mode.upper()}: vit_base_patch16_224, synthetic gradients (no forward) ==")
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    g1 = [torch.randn_like(p) * 1e-3 for p in params]
    g2 = [torch.randn_like(p) * 1e-3 for p in params]
    impls = implementations(adaptive)
    sam_t, base_ms = _time_sam_only(params, impls, g1, g2, repeats, device)
    buffers = _buffers(params, impls, g1, g2) if device.type == "cpu" else {}
    print(f"{sum(p.numel() for p in params) / 1e6:.1f}M parameters, base SGD step {base_ms:.1f} ms, best of {repeats}")
    _report(sam_t, base_ms, buffers)


def _report(sam_t, base_ms, buffers, extra=None):
    cost = {n: _best_ms(v) - base_ms for n, v in sam_t.items()}
    refs = [n for n in cost if n != "ours"]
    extra = extra or {}
    cols = ["impl", "first+second ms", "SAM's work ms"] + [f"ours / {n}" for n in refs]
    if buffers:
        cols += ["held / params", "peak / params"]
    cols += list(extra)
    rows = []
    for name, c in cost.items():
        row = [name, f"{_best_ms(sam_t[name]):.2f}", f"{c:.2f}"]
        row += [f"{cost['ours'] / cost[n]:.2f}" if name == "ours" else "" for n in refs]
        if buffers:
            held, peak = buffers[name]
            row += [f"{held:.2f}x", f"{peak:.2f}x"]
        row += [values[name] for values in extra.values()]
        rows.append(row)
    widths = [max(len(r[i]) for r in [cols, *rows]) + 2 for i in range(len(cols))]
    for r in [cols, *rows]:
        print("".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="SAM, ASAM or both")
    parser.add_argument("--adaptive", action="store_true", help="ASAM only (the same as --modes asam)")
    parser.add_argument("--repeats", type=int, default=5, help="whole ViT-Ti steps per implementation")
    parser.add_argument("--sam-repeats", type=int, default=30, help="SAM-only repeats on ViT-Ti gradients")
    parser.add_argument("--base-repeats", type=int, default=6, help="repeats for the ViT-B synthetic benchmark")
    parser.add_argument("--skip-vit-base", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time, robust on an oversubscribed machine (use with --threads 1)",
    )
    args = parser.parse_args(argv)
    modes = ["asam"] if args.adaptive else args.modes
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    global _TIMER
    _TIMER = time.process_time if args.clock == "cpu" else time.perf_counter
    print(
        f"{datetime.date.today()}; torch {torch.__version__}, timm {timm.__version__}; {_cpu_model()}, "
        f"{os.cpu_count()} CPUs; {torch.get_num_threads()} threads, {args.clock} clock, device {device}; "
        f"load average {_load()}"
    )
    for mode in modes:
        bench_vit_tiny(mode, args.repeats, args.sam_repeats, device)
    if not args.skip_vit_base:
        for mode in modes:
            bench_vit_base_synthetic(mode, args.base_repeats, device)
    print(f"\nload average at the end: {_load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
