"""Multi-process (DDP) teacher fine-tuning under torchrun with ``finetune_teacher``.

What it shows:
    * a script started by ``torchrun`` calls ``finetune_teacher`` unchanged: it uses the process group you set up
      (or joins one itself), shards every epoch across ranks, all-reduces the metrics, runs SAM per replica, and
      writes checkpoints and exports from rank 0 only;
    * every rank ends with the same weights and the same history (checked with an all-gather).

Run:
    torchrun --nproc_per_node 4 examples/torchrun_training.py --output runs/vitb-remem-ddp
        # ViT-B/16 (in21k) on CIFAR-100 with ReMem, nccl on 4 GPUs; --batch-size is per process
        # (add --max-restarts 3 to torchrun and --resume to continue after a crash)
    python examples/torchrun_training.py --smoke
        # launches itself with 2 CPU processes (gloo) via `python -m torch.distributed.run`, tiny ViT on digits,
        # offline; bounded by a timeout
"""

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import tempfile

import torch
import torch.distributed as dist

import timm_remem


def worker(args: argparse.Namespace) -> None:
    """Runs in every process torchrun starts (RANK, WORLD_SIZE, MASTER_ADDR, ... are in the environment)."""
    cuda = torch.cuda.is_available() and not args.smoke
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")     # optional: finetune_teacher would join by itself
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.smoke:
        config = dict(model="test_vit", dataset="digits", img_size=16, epochs=1, batch_size=32, limit_train_batches=4,
                      alpha=0.85, rho=0.05, save_at=[1], device="cpu", progress=False)
    else:
        config = dict(model="vit_base_patch16_224.augreg_in21k", pretrained=True, dataset="torch/cifar100",
                      data_dir=args.data_dir, download=rank == 0, img_size=224, augment=True, epochs=30,
                      batch_size=args.batch_size, optimizer="sgd", lr=0.01 * world, weight_decay=0.0, warmup_epochs=2,
                      alpha=0.85, rho=0.1, amp=True, clip_grad=1.0, save_at=[5, 10, 15, 20, 25, 30],
                      checkpoint_every=500, resume=True if args.resume else None)
    result = timm_remem.train.finetune_teacher(output=args.output, **config)

    # Every rank holds the same weights (DDP + exact SAM restore) and the same all-reduced history.
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes()
                                     for p in result.model.state_dict().values())).hexdigest()
    gathered = [None] * world
    dist.all_gather_object(gathered, (digest, result.history[-1]["val_acc"]))
    if rank == 0:
        print(f"world size {world}: val acc {result.val_acc:.3f}, exports {[p.name for p in result.checkpoints]}")
        assert len(set(gathered)) == 1, f"ranks differ: {gathered}"
        print(f"all {world} ranks have identical weights (sha256 {digest[:12]}) and metrics")
    dist.destroy_process_group()


def launch_smoke(timeout: float) -> int:
    """Start this script in 2 CPU processes with PyTorch's launcher, as `torchrun` would."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, "--smoke", "--output", f"{tmp}/teacher"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        print("launching:", " ".join(cmd[1:6]), "...", flush=True)
        launcher = subprocess.Popen(cmd, env=env, start_new_session=True)   # its own group: killable as a whole
        try:
            return launcher.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)                          # the launcher and both workers
            launcher.wait()
            print(f"timed out after {timeout:.0f}s", file=sys.stderr)
            return 124


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 CPU processes (gloo), tiny ViT, digits")
    parser.add_argument("--output", default="runs/vitb-remem-ddp")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--timeout", type=float, default=120.0, help="smoke: seconds before the launch is killed")
    args = parser.parse_args()
    if "RANK" in os.environ:          # started by torchrun / torch.distributed.run
        worker(args)
    elif args.smoke:
        sys.exit(launch_smoke(args.timeout))
    else:
        sys.exit("start this script with torchrun (see the docstring), or use --smoke")


if __name__ == "__main__":
    main()
