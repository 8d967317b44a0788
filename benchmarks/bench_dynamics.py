"""Benchmark: cost of ``layer_dynamics`` beyond the forward pass (target: <= 1 s for ViT-B/16, 64 images, 224 px).

Measured side by side in one run:

- ``forward``: ``model.forward_intermediates(images, intermediates_only=True)`` under ``no_grad`` (the floor);
- ``layer_dynamics``: the whole call (the same forward plus spectrum, entropy and magnitude of every block);
- ``metrics only``: the measurement part alone on precomputed block outputs (what ``layer_dynamics`` adds);
- ``naive loop``: the straightforward per-token implementation (``torch.fft.fft`` and ``torch.histc`` per token),
  timed on a slice of the tokens and extrapolated linearly to all of them.

Usage: ``python benchmarks/bench_dynamics.py [--model vit_base_patch16_224] [--images 64] [--threads 2]``.
Never asserts on time; prints the numbers and ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import timm
import torch

from timm_remem.analysis.dynamics import _measure, layer_dynamics


def best_of(fn, repeats: int) -> tuple[float, float, object]:
    """(best wall seconds, process CPU seconds of that run, result of the last run)."""
    best = (float("inf"), 0.0)
    out = None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if wall < best[0]:
            best = (wall, cpu)
    return best[0], best[1], out


def metrics_only(feats: list[torch.Tensor], bins: int = 100) -> None:
    """What layer_dynamics does after the forward pass (global entropy range)."""
    _measure(feats, list(range(len(feats))), bins, "global")


def naive_per_token(feat: torch.Tensor, lo: float, hi: float, max_tokens: int, bins: int = 100) -> tuple[float, int]:
    """Per-token loop on the first ``max_tokens`` tokens of one block: (seconds, tokens done)."""
    b, c, h, w = feat.shape
    tokens = feat.permute(0, 2, 3, 1).reshape(-1, c)[:max_tokens]
    t0 = time.perf_counter()
    spec = torch.zeros(c)
    ent = 0.0
    for tok in tokens:
        spec += torch.fft.fft(tok).abs() / c
        hist = torch.histc(tok, bins=bins, min=lo, max=hi)
        p = hist / hist.sum()
        p = p[p > 0]
        ent += float(-(p * torch.log2(p)).sum())
    _ = tok.abs().mean()
    return time.perf_counter() - t0, len(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--naive-tokens", type=int, default=500, help="tokens timed for the naive loop")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=args.size).eval()
    images = torch.randn(args.images, 3, args.size, args.size)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.model}, {args.images} images at {args.size}px, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f}")

    layer_dynamics(model, images[:4])  # warm-up (allocator, FFT plans)

    def forward():
        with torch.no_grad():
            return model.forward_intermediates(images, intermediates_only=True)

    t_fwd, c_fwd, feats = best_of(forward, args.repeats)
    t_dyn, c_dyn, _ = best_of(lambda: layer_dynamics(model, images), args.repeats)
    layers = len(feats)
    t_met, c_met, _ = best_of(lambda: metrics_only(feats), max(args.repeats, 3))
    lo = min(float(f.min()) for f in feats)
    hi = max(float(f.max()) for f in feats)
    t_naive, done = naive_per_token(feats[0], lo, hi, args.naive_tokens)
    total_tokens = feats[0].shape[0] * feats[0].shape[2] * feats[0].shape[3] * layers
    t_naive_all = t_naive / done * total_tokens

    print(f"{'':38} {'wall':>9} {'CPU':>9}")
    print(f"{'forward_intermediates (floor)':<38} {t_fwd:8.3f}s {c_fwd:8.3f}s")
    print(f"{'layer_dynamics (total)':<38} {t_dyn:8.3f}s {c_dyn:8.3f}s")
    print(f"{'  beyond the forward (total - floor)':<38} {t_dyn - t_fwd:8.3f}s {c_dyn - c_fwd:8.3f}s   target <= 1 s")
    print(f"{f'metrics only ({layers} blocks)':<38} {t_met:8.3f}s {c_met:8.3f}s   "
          f"({t_met / t_fwd:.1%} of the forward's wall time)")
    print(f"{'naive per-token loop (extrapolated)':<38} {t_naive_all:8.1f}s {'':>9}   "
          f"({done} of {total_tokens} tokens timed)")
    print(f"ratio layer_dynamics / forward: {t_dyn / t_fwd:.3f}x; naive loop / ours (metrics only): "
          f"{t_naive_all / t_met:.0f}x")


if __name__ == "__main__":
    main()
