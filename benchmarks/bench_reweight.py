"""Forward time of reweighted (unmerged and merged) vs plain timm models, measured side by side.

Run: ``python benchmarks/bench_reweight.py [--batch 8] [--repeats 15] [--device cpu]``.
The three variants are timed in interleaved rounds (plain, wrapped, merged, plain, ...) so that drift in machine
load hits all of them alike; each ratio is the median over rounds of (variant time / plain time in that round).
Targets (issue 2): <= 1.01x unmerged, 1.00x merged.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import timm
import torch

import timm_remem

MODELS = {
    "vit_base_patch16_224": {},
    "swin_tiny_patch4_window7_224": {},
}


def _time(model: torch.nn.Module, x: torch.Tensor, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(name: str, kwargs: dict, batch: int, repeats: int, device: str) -> dict[str, float]:
    torch.manual_seed(0)
    plain = timm.create_model(name, pretrained=False, **kwargs).eval().to(device)
    wrapped = timm_remem.reweight(copy.deepcopy(plain), alpha=0.85)
    merged = timm_remem.merge(copy.deepcopy(wrapped))
    x = torch.randn(batch, 3, 224, 224, device=device)
    variants = {"plain": plain, "wrapped": wrapped, "merged": merged}
    ratios: dict[str, list[float]] = {"wrapped": [], "merged": []}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for m in variants.values():  # warm-up
            m(x)
        for r in range(repeats):
            # rotate the order each round so no variant always runs first
            order = list(variants)[r % 3:] + list(variants)[: r % 3]
            t = {k: _time(variants[k], x, device) for k in order}
            for k, v in t.items():
                times[k].append(v)
            ratios["wrapped"].append(t["wrapped"] / t["plain"])
            ratios["merged"].append(t["merged"] / t["plain"])
    return {
        "plain_ms": 1000 * statistics.median(times["plain"]),
        "wrapped_ratio": statistics.median(ratios["wrapped"]),
        "merged_ratio": statistics.median(ratios["merged"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"# bench_reweight: batch {args.batch}, {args.repeats} interleaved rounds, device {args.device}, "
          f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'model':<32} {'plain ms':>9} {'unmerged/plain':>15} {'merged/plain':>13}")
    for name, kwargs in MODELS.items():
        r = bench(name, kwargs, args.batch, args.repeats, args.device)
        print(f"{name:<32} {r['plain_ms']:>9.1f} {r['wrapped_ratio']:>14.3f}x {r['merged_ratio']:>12.3f}x")


if __name__ == "__main__":
    main()
