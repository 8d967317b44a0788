"""Benchmark: SAM over what trains. SAM's state and step time on a ViT-B with a small trainable part, against full.

Two copies of ``vit_base_patch16_224`` (random weights, same seed), both given entirely to ``SAM(AdamW)``:

- ``full``: every parameter trains.
- ``frozen``: only a small part trains: ``--trainable head`` (the head and every LayerNorm, a linear probe with
  norms) or ``--trainable lora`` (peft LoRA rank ``--rank`` on qkv, proj, fc1, fc2, plus the head; needs
  ``pip install timm-remem[lora]``).

Printed for each, and as frozen / full ratios measured in this one run: trainable bytes, SAM's own buffers
(``opt.buffer_nbytes``: the saved ``w``), the base optimizer's state bytes (AdamW moments), and the time of a whole
``opt.step(closure)`` (two forward+backward passes, SAM's work, the base step), the fastest of interleaved repeats.
The step-time ratio depends on where the trainable part sits: with the head only, the backward pass stops at the
head; with LoRA it runs through every block. Nothing is asserted about time.

Usage:
    python benchmarks/bench_sam_trainable.py [--trainable head|lora] [--rank 8] [--img-size 112] [--batch 8]
        [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from timm_remem.sam import SAM  # noqa: E402

MODEL = "vit_base_patch16_224"


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build(kind: str, img_size: int, rank: int) -> torch.nn.Module:
    """The model of one configuration: ``full``, ``head`` (head + norms) or ``lora`` (peft LoRA + head)."""
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, img_size=img_size, num_classes=10)
    if kind == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head.") or ".norm" in name or name.startswith("norm"))
    elif kind == "lora":
        try:
            import peft  # optional: the lora extra
        except ImportError as error:
            raise SystemExit("--trainable lora needs peft: pip install timm-remem[lora]") from error
        config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["qkv", "proj", "fc1", "fc2"],
                                 modules_to_save=["head"])
        model = peft.get_peft_model(model, config)
    return model


def state_bytes(opt: SAM) -> int:
    """Bytes of the base optimizer's tensors (AdamW's moments; the step counters are tiny)."""
    return sum(_nbytes(v for v in state.values() if isinstance(v, torch.Tensor)) for state in opt.state.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trainable", choices=("head", "lora"), default="head")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (with --trainable lora)")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{MODEL} @ {args.img_size}px, batch {args.batch}, SAM(AdamW), frozen = --trainable {args.trainable}; "
          f"torch {torch.__version__}, timm {timm.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    runs = {}
    for name, kind in (("full", "full"), ("frozen", args.trainable)):
        model = build(kind, args.img_size, args.rank).train()
        opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-4, weight_decay=0.05)
        trainable = [p for p in model.parameters() if p.requires_grad]

        def closure(model=model):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)  # warm-up: allocates SAM's buffers and AdamW's moments
        runs[name] = {"model": model, "opt": opt, "closure": closure, "times": [],
                      "params": _nbytes(model.parameters()), "trainable": _nbytes(trainable)}
    for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
        for run in runs.values():
            start = time.perf_counter()
            run["opt"].step(run["closure"])
            run["times"].append(time.perf_counter() - start)

    rows = {}
    for name, run in runs.items():
        rows[name] = {
            "trainable MB": run["trainable"] / 2**20,
            "SAM buffers MB": run["opt"].buffer_nbytes / 2**20,
            "AdamW state MB": state_bytes(run["opt"]) / 2**20,
            "step s": min(run["times"]),
        }
        print(f"{name:>6}: parameters {run['params'] / 2**20:7.1f} MB, " + ", ".join(
            f"{k} {v:7.2f}" if k != "step s" else f"{k} {v:6.3f}" for k, v in rows[name].items()))
        assert run["opt"].buffer_nbytes == run["trainable"], "SAM buffered something that does not train"
    print("frozen / full: " + ", ".join(
        f"{k.rsplit(' ', 1)[0]} {rows['frozen'][k] / rows['full'][k]:.4f}x" for k in rows["full"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
