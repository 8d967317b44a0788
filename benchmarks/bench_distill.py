"""Distillation cost on CPU, measured side by side in one run.

1. One distillation step of the pipeline (``timm_remem.train.loop.train_step`` with ``RememDistillationTask``:
   teacher wrapper with re-normalisation, ``DistillationLoss``, NaN check, optimizer step) relative to the bare
   minimum it must do: teacher forward under ``no_grad`` + student forward/backward with an inline CE + KL loss +
   the same optimizer step. Target: <= 1.05x.
2. Epoch time of the short distillations in ``select`` with cached teacher logits vs without: epoch 1 fills the
   cache, later epochs skip the teacher entirely.

Usage: ``python benchmarks/bench_distill.py [--threads 1] [--repeats 20]``. Prints ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time

import timm
import torch
import torch.nn.functional as F

from timm_remem.distill import DistillationLoss, RememDistillationTask, Teacher
from timm_remem.train import (
    DEMO_STUDENT,
    DEMO_STUDENT_KWARGS,
    DEMO_TEACHER,
    DEMO_TEACHER_KWARGS,
    distill_student,
)
from timm_remem.train.loop import check_finite, train_step

CASES = {
    # name: (student, student kwargs, teacher, teacher kwargs, image size, batch size)
    "demo models, 32 px": (DEMO_STUDENT, DEMO_STUDENT_KWARGS, DEMO_TEACHER, DEMO_TEACHER_KWARGS, 32, 64),
    "resnet18 <- vit_small, 64 px": ("resnet18", {}, "vit_small_patch16_224", {"patch_size": 8}, 64, 32),
}


def _step_ratio(student_name, s_kwargs, teacher_name, t_kwargs, size, batch, repeats):
    torch.manual_seed(0)
    student = timm.create_model(student_name, pretrained=False, num_classes=10, **s_kwargs)
    teacher_net = timm.create_model(teacher_name, pretrained=False, num_classes=10, img_size=size, **t_kwargs).eval()
    teacher_net.requires_grad_(False)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    idx = torch.arange(batch)
    opt = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)

    # ours: what the pipeline runs for one step
    task = RememDistillationTask(student, Teacher(teacher_net, student), DistillationLoss("kd", temperature=2.0),
                                 verbose=False)

    def compute(x_, t_, i_, teacher_logits):
        out = task(x_, t_, teacher_logits=teacher_logits)
        return out["loss"], out["output"], out["teacher_logits"]

    def ours():
        train_step(student, opt, compute, x, y, idx, scaler=None, autocast=contextlib.nullcontext, clip_grad=None,
                    check=lambda loss: check_finite(loss, epoch=0, step=0, state_dir=None))

    # baseline: teacher forward + student forward/backward + optimizer step, nothing else
    def baseline():
        with torch.no_grad():
            t = teacher_net(x)
        s = student(x)
        loss = F.cross_entropy(s, y) + 4.0 * F.kl_div(
            F.log_softmax(s / 2.0, -1), F.log_softmax(t / 2.0, -1), reduction="batchmean", log_target=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    student.train()
    for _ in range(3):  # warm up both
        ours()
        baseline()
    t_ours, t_base = [], []
    for _ in range(repeats):  # interleaved so drift hits both equally
        t0 = _clock()
        baseline()
        t_base.append(_clock() - t0)
        t0 = _clock()
        ours()
        t_ours.append(_clock() - t0)
    return statistics.median(t_ours), statistics.median(t_base)


def _clock() -> float:
    # CPU time of this process: with one thread it is the step's own cost, and unlike wall time it does not grow
    # when other jobs share the cores (wall time is the right clock with several threads: use --clock wall)
    return time.process_time() if CLOCK == "cpu" else time.perf_counter()


CLOCK = "cpu"


def _cache_speedup(epochs: int):
    root = tempfile.mkdtemp()
    torch.manual_seed(0)
    teacher = timm.create_model(DEMO_TEACHER, pretrained=False, num_classes=10, img_size=32, **DEMO_TEACHER_KWARGS)
    common = dict(model=DEMO_STUDENT, model_kwargs=DEMO_STUDENT_KWARGS, dataset="digits", epochs=epochs,
                  save_at=[], save_state=False, progress=False)
    distill_student(**dict(common, epochs=1), limit_train_batches=3, output=f"{root}/warmup", teacher_model=teacher)
    c0 = time.process_time()
    cached = distill_student(**common, output=f"{root}/cached", cache_teacher=True, teacher_model=teacher)
    c1 = time.process_time()
    fresh = distill_student(**common, output=f"{root}/fresh", cache_teacher=False, teacher_model=teacher)
    c2 = time.process_time()
    return ([h["epoch_time_s"] for h in cached.history], [h["epoch_time_s"] for h in fresh.history],
            c1 - c0, c2 - c1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the cached-logits comparison")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="step timing clock (default cpu)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = args.clock
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {args.threads} thread(s), CPU, {args.clock} clock")
    print("\n1. one distillation step vs (teacher fwd + student fwd/bwd + optimizer step), median of "
          f"{args.repeats}")
    for name, case in CASES.items():
        ours, base = _step_ratio(*case, repeats=args.repeats)
        print(f"   {name:<32} ours {ours * 1e3:8.1f} ms   baseline {base * 1e3:8.1f} ms   ratio {ours / base:.3f}x")
    print(f"\n2. select's short distillation on digits ({DEMO_TEACHER} teacher, {DEMO_STUDENT} student), "
          "epoch times")
    cached, fresh, cpu_cached, cpu_fresh = _cache_speedup(args.epochs)
    for e, (c, f) in enumerate(zip(cached, fresh, strict=True), start=1):
        print(f"   epoch {e} (wall): cached {c:6.2f} s   no cache {f:6.2f} s   speed-up {f / c:.2f}x")
    print(f"   epochs (wall):   cached {sum(cached):6.2f} s   no cache {sum(fresh):6.2f} s   speed-up "
          f"{sum(fresh) / sum(cached):.2f}x")
    print(f"   whole run (CPU): cached {cpu_cached:6.2f} s   no cache {cpu_fresh:6.2f} s   speed-up "
          f"{cpu_fresh / cpu_cached:.2f}x   (includes model setup and the teacher's accuracy pass)")


if __name__ == "__main__":
    main()
