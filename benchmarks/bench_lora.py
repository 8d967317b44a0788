"""LoRA teacher (rank 8) + SAM against full fine-tuning + SAM on ``vit_base_patch16_224``, measured in one run.

Both setups are what ``finetune_teacher`` builds: the model reweighted (alpha 0.85), SAM over AdamW (rho 0.05)
from ``timm_remem.train.builders.create_optimizer``, one step = ``timm_remem.train.loop.train_step`` (SAM's two
forward/backward passes). LoRA: peft adapters (rank 8) on ``qkv``, ``proj``, ``fc1``, ``fc2``; the head trains fully.

Measured, each setup in a fresh worker process (so one's peak memory cannot hide the other's):

1. trainable parameters;
2. peak memory: the process's peak RSS (``resource.getrusage``) during the steps minus its RSS once the model and
   optimizer are built (gradients, optimizer and SAM state, activations), and the bytes of the tensors the
   optimizer holds after the steps (moments, SAM's saved weights) counted tensor by tensor;
3. step time: the median of ``--repeats`` steps after one warm-up step.

Then the merged export (``timm_remem.lora.merge_lora``: LoRA folded by peft, then the factors) against the plain
timm model: eval forward time, interleaved repeats, median each (target 1.00x).

Usage: ``python benchmarks/bench_lora.py [--img-size 112] [--batch 8] [--repeats 8] [--threads 2]``. Prints a
table; asserts nothing. Random weights, CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date

import timm
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from timm_remem import reweight  # noqa: E402
from timm_remem.lora import apply_lora, merge_lora, trainable_parameters  # noqa: E402
from timm_remem.train import FinetuneConfig  # noqa: E402
from timm_remem.train.builders import create_optimizer  # noqa: E402
from timm_remem.train.loop import train_step  # noqa: E402

MODEL = "vit_base_patch16_224"
NUM_CLASSES = 100


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def _model(img_size: int, lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, num_classes=NUM_CLASSES, img_size=img_size)
    if lora:
        apply_lora(model, rank=8)
    return reweight(model, alpha=0.85)


def worker(setup: str, img_size: int, batch: int, repeats: int) -> dict:
    """One setup's numbers (run in its own process)."""
    model = _model(img_size, lora=setup == "lora").train()
    cfg = FinetuneConfig(model=MODEL, optimizer="adamw", lr=1e-4, rho=0.05, weight_decay=0.05)
    optimizer = create_optimizer(cfg, model)
    x = torch.randn(batch, 3, img_size, img_size)
    y = torch.randint(0, NUM_CLASSES, (batch,))
    idx = torch.arange(batch)

    def compute(x_, t_, i_, teacher_logits):
        logits = model(x_)
        return torch.nn.functional.cross_entropy(logits, t_), logits, None

    def step():
        train_step(model, optimizer, compute, x, y, idx, scaler=None, autocast=contextlib.nullcontext,
                   clip_grad=None, check=lambda loss: float(loss.detach()))

    rss_before = _rss_bytes()
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        step()
        if i:  # the first step allocates the optimizer state: a warm-up
            times.append(time.perf_counter() - t0)
    held = {id(t): t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)}
    return {
        "trainable": trainable_parameters(model),
        "total": sum(p.numel() for p in model.parameters()),
        "peak_delta": _peak_rss_bytes() - rss_before,
        "state_bytes": sum(t.numel() * t.element_size() for t in held.values()),
        "step_s": statistics.median(times),
    }


def forward_ratio(img_size: int, batch: int, repeats: int) -> tuple[float, float, float]:
    """Median eval forward time of the merged export and of the plain model, interleaved; and the adapted model's."""
    adapted = _model(img_size, lora=True).eval()
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.02)  # as if trained
    torch.manual_seed(1)
    plain = timm.create_model(MODEL, pretrained=False, num_classes=NUM_CLASSES, img_size=img_size).eval()
    x = torch.randn(batch, 3, img_size, img_size)
    timings: dict[str, list[float]] = {"adapted": [], "merged": [], "plain": []}
    with torch.no_grad():
        for _ in range(2):
            adapted(x)
        y_adapted = adapted(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            adapted(x)
            timings["adapted"].append(time.perf_counter() - t0)
        merged = merge_lora(adapted)
        assert float((merged(x) - y_adapted).abs().max() / y_adapted.abs().max()) < 1e-5
        for _ in range(2):
            plain(x)
        for _ in range(repeats):
            for name, model in (("merged", merged), ("plain", plain)):
                t0 = time.perf_counter()
                model(x)
                timings[name].append(time.perf_counter() - t0)
    return tuple(statistics.median(timings[k]) for k in ("merged", "plain", "adapted"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=("full", "lora"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.img_size, args.batch, args.repeats)))
        return

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{date.today()}: {MODEL} (random weights), {args.img_size} px, batch {args.batch}, CPU, "
          f"{args.threads} threads; torch {torch.__version__}, timm {timm.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f}")
    rows = {}
    for setup in ("full", "lora"):
        cmd = [sys.executable, __file__, "--worker", setup, "--img-size", str(args.img_size), "--batch",
               str(args.batch), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[setup] = json.loads(out.strip().splitlines()[-1])
        print(f"  {setup}: done", file=sys.stderr, flush=True)
    full, lora = rows["full"], rows["lora"]
    mib = 2**20
    print()
    print("| | full fine-tuning + SAM | LoRA r=8 + SAM | LoRA / full |")
    print("|---|---|---|---|")
    print(f"| trainable parameters | {full['trainable']:,} | {lora['trainable']:,} | "
          f"{lora['trainable'] / full['trainable']:.4f}x |")
    print(f"| optimizer state (tensors in optimizer.state) | {full['state_bytes'] / mib:.1f} MiB | "
          f"{lora['state_bytes'] / mib:.1f} MiB | {lora['state_bytes'] / full['state_bytes']:.4f}x |")
    print(f"| peak RSS during training, over the built model | {full['peak_delta'] / mib:.0f} MiB | "
          f"{lora['peak_delta'] / mib:.0f} MiB | {lora['peak_delta'] / full['peak_delta']:.2f}x |")
    print(f"| step time (median of {args.repeats}) | {full['step_s'] * 1e3:.0f} ms | {lora['step_s'] * 1e3:.0f} ms | "
          f"{lora['step_s'] / full['step_s']:.2f}x |")
    merged, plain, adapted = forward_ratio(args.img_size, args.batch, max(args.repeats, 10))
    print()
    print("| forward (eval, no_grad) | median | / plain timm |")
    print("|---|---|---|")
    print(f"| plain timm model | {plain * 1e3:.1f} ms | 1.00x |")
    print(f"| merged export (merge_lora) | {merged * 1e3:.1f} ms | {merged / plain:.2f}x |")
    print(f"| adapted, unmerged (LoRA + factors) | {adapted * 1e3:.1f} ms | {adapted / plain:.2f}x |")


if __name__ == "__main__":
    main()
