"""Benchmark: whole training iterations of the one-pass and the exact SAM against the plain base optimizer.

One iteration = what a training loop pays per optimizer step: forward, backward and ``step()`` (and ``zero_grad``).
Measured side by side in one run, with the implementations taking turns (interleaved repeats, the fastest kept, so
load from other processes skews them least), on the same model, batch and base optimizer:

- ``base``: the base optimizer alone (SGD with momentum 0.9, or AdamW), timm's factory (``sgd`` / ``adamw``);
- ``onepass``: ``timm_remem``'s one-pass SAM from timm's factory (``sammomentum`` / ``samadamw``), driven exactly
  like ``base`` (``loss.backward(); opt.step()``): it finds the model through its first forward and perturbs by
  itself; target: at most 1.05x ``base``;
- ``exact``: ``timm_remem.SAM`` (``step(closure)``, two forward/backward passes), floor 2.0x;
- ``davda54``: the davda54/sam algorithm written plainly (see ``bench_sam.py``), two passes;
- ``pytorch_optimizer``: ``pytorch_optimizer.SAM`` (the ``bench`` extra), two passes.

Also reported: the one-pass SAM's own buffers as a multiple of the parameter bytes (the saved ``w``).

Usage:
    python benchmarks/bench_sam_onepass.py [--model vit_tiny_patch16_224] [--img-size 64] [--batch-size 16]
        [--repeats 10] [--base sgd|adamw] [--threads N] [--device cpu|cuda] [--amp]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import timm
import timm.optim
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sam import DavdaSAM  # noqa: E402

import timm_remem  # noqa: E402,F401  (registers the one-pass names)
from timm_remem.sam import SAM, OnePassSAM, create_sam  # noqa: E402

ONE_PASS_NAME = {"sgd": "sammomentum", "adamw": "samadamw"}
TIMM_NAME = {"sgd": "momentum", "adamw": "adamw"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(kind: str, args, device):
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size, num_classes=10).to(device)
    model.train()
    base_kw = dict(lr=0.01, weight_decay=0.05)
    if kind == "base":
        opt = timm.optim.create_optimizer_v2(model, TIMM_NAME[args.base], **base_kw)
    elif kind == "onepass":
        opt = timm.optim.create_optimizer_v2(model, ONE_PASS_NAME[args.base], rho=0.05, **base_kw)
    elif kind == "exact":
        opt = create_sam(model, TIMM_NAME[args.base], rho=0.05, **base_kw)
    else:
        base_cls = torch.optim.SGD if args.base == "sgd" else torch.optim.AdamW
        kw = dict(lr=0.01, weight_decay=0.05, **({"momentum": 0.9} if args.base == "sgd" else {}))
        if kind == "davda54":
            opt = DavdaSAM(model.parameters(), base_cls, rho=0.05, **kw)
        else:
            import pytorch_optimizer

            opt = pytorch_optimizer.SAM(model.parameters(), base_cls, rho=0.05, **kw)
    return model, opt


def _iteration(kind: str, model, opt, x, y, autocast, scaler):
    def loss_fn():
        with autocast():
            return F.cross_entropy(model(x), y)

    if kind in ("base", "onepass"):
        loss = loss_fn()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad()
    elif kind == "exact":
        def closure():
            loss = loss_fn()
            (scaler.scale(loss) if scaler is not None else loss).backward()
            return loss

        opt.step(closure, scaler=scaler)
        opt.zero_grad()
    else:  # the references' two-step API (no scaler support)
        loss_fn().backward()
        opt.first_step(zero_grad=True)
        loss_fn().backward()
        opt.second_step(zero_grad=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--base", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="autocast (fp16 + GradScaler on CUDA, bf16 on CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kinds = ["base", "onepass", "exact", "davda54"]
    try:
        import pytorch_optimizer  # noqa: F401

        kinds.append("pytorch_optimizer")
    except ImportError:
        print("pytorch_optimizer not importable: `pip install pytorch_optimizer` to compare with it.")
    if args.amp:
        kinds = [k for k in kinds if k in ("base", "onepass", "exact")]  # the references take no GradScaler
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if args.amp else torch.nn.Identity
    if not args.amp:
        import contextlib

        autocast = contextlib.nullcontext
    runs = {}
    for kind in kinds:
        model, opt = _build(kind, args, device)
        scaler = torch.amp.GradScaler(device.type) if args.amp and device.type == "cuda" else None
        runs[kind] = (model, opt, scaler)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.repeats + 2):  # two warm-up rounds (buffers, momentum, discovery, allocator)
        for kind in kinds:
            model, opt, scaler = runs[kind]
            _sync(device)
            t0 = time.perf_counter()
            _iteration(kind, model, opt, x, y, autocast, scaler)
            _sync(device)
            if r >= 2:
                times[kind].append(time.perf_counter() - t0)
    best = {k: 1000 * min(v) for k, v in times.items()}
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, timm {timm.__version__}, "
          f"device {device}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}")
    print(f"# {args.model} img {args.img_size} batch {args.batch_size}, base {args.base}, amp {args.amp}, "
          f"fastest of {args.repeats} interleaved repeats")
    print("| implementation | ms / iteration | / base |")
    print("|---|---|---|")
    for kind in kinds:
        print(f"| {kind} | {best[kind]:.1f} | {best[kind] / best['base']:.3f} |")
    onepass = runs["onepass"][1]
    assert isinstance(onepass, OnePassSAM) and onepass.stats.perturbed
    assert isinstance(runs["exact"][1], SAM)
    param_bytes = sum(p.numel() * p.element_size() for p in runs["onepass"][0].parameters())
    print(f"one-pass buffers: {onepass.buffer_nbytes / param_bytes:.2f}x the parameter bytes")


if __name__ == "__main__":
    main()
