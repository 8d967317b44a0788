"""Distillation cost on CPU, measured side by side in one run.

1. One distillation step of the pipeline (``timm_remem.train.loop.train_step`` with ``RememDistillationTask``:
   teacher wrapper with re-normalisation, ``DistillationLoss``, NaN check, optimizer step) relative to the bare
   minimum it must do: teacher forward under ``no_grad`` + student forward/backward with an inline CE + KL loss +
   the same optimizer step. Target: <= 1.05x.
2. Epoch time of the short distillations in ``select`` with cached teacher logits vs without: epoch 1 fills the
   cache, later epochs skip the teacher entirely.
3. ``kd_loss`` forward+backward against the textbook formula
   ``F.kl_div(F.log_softmax(s/T), F.log_softmax(t/T), log_target=True, reduction="batchmean") * T*T`` at batch 256
   with 1,000 and 21,843 classes (float32 logits): time (interleaved, median and fastest of ``--kd-repeats``), the
   peak of the memory allocated from the start of the forward pass to the end of backward (torch.profiler's memory
   profile, the logits' gradient included), and the ``[B, C]`` tensors the autograd graph keeps for backward.
   Target: within 2x the textbook formula in time and memory. The textbook formula's time depends on the C
   library's allocator (its five ``[B, C]`` tensors a step come back as fresh pages with glibc's defaults);
   ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824`` measures both with a warm heap.

Usage: ``python benchmarks/bench_distill.py [--threads 1] [--repeats 20] [--only kd]``. Prints ratios; asserts
nothing.
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

from timm_remem.distill import DistillationLoss, RememDistillationTask, Teacher, kd_loss
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


def _textbook_kd(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1),
                    log_target=True, reduction="batchmean") * temperature * temperature


KD_LOSSES = {"kd_loss": kd_loss, "textbook": _textbook_kd}


def _kd_logits(classes: int, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, classes, generator=g) * 2, torch.randn(batch, classes, generator=g) * 2


def _kd_step(loss, s: torch.Tensor, t: torch.Tensor, temperature: float) -> None:
    student = s.detach().requires_grad_(True)  # a fresh leaf: each step allocates its gradient, as a training step
    loss(student, t, temperature).backward()


def _kd_times(classes: int, temperature: float, repeats: int) -> dict[str, list[float]]:
    s, t = _kd_logits(classes)
    times = {name: [] for name in KD_LOSSES}
    for loss in KD_LOSSES.values():  # warm up both
        _kd_step(loss, s, t, temperature)
    for _ in range(repeats):  # interleaved so drift hits both equally
        for name, loss in KD_LOSSES.items():
            t0 = _clock()
            _kd_step(loss, s, t, temperature)
            times[name].append(_clock() - t0)
    return times


def _kd_memory(classes: int, temperature: float) -> dict[str, tuple[int, int]]:
    """Per loss: the peak of the bytes allocated from the start of the forward pass to the end of backward (the
    logits' gradient included; tensors that existed before not counted), from torch.profiler's memory profile (its
    allocation timeline: private API, the one behind ``export_memory_timeline``), and the bytes of the ``[B, C]``
    tensors the autograd graph saves for backward."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    s, t = _kd_logits(classes)
    out = {}
    for name, loss in KD_LOSSES.items():
        saved = []

        def pack(tensor, saved=saved):
            saved.append(tensor.numel() * tensor.element_size() if tensor.numel() >= s.numel() else 0)
            return tensor

        student = s.detach().requires_grad_(True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                value = loss(student, t, temperature)
            value.backward()
        total = peak = 0
        for _, action, _, size in sorted(prof._memory_profile().timeline, key=lambda row: row[0]):
            if action == Action.CREATE:
                total += size
            elif action == Action.DESTROY:
                total -= size
            peak = max(peak, total)
        out[name] = (peak, sum(saved))
    return out


def _kd_section(repeats: int, temperatures: list[float]) -> None:
    print(f"\n3. kd_loss vs the textbook kl_div formula, forward+backward, batch 256, float32, {CLOCK} time over "
          f"{repeats} interleaved repeats")
    for classes in (1000, 21843):
        for temperature in temperatures:
            times = _kd_times(classes, temperature, repeats if classes < 5000 else max(3, repeats // 4))
            med = {k: statistics.median(v) for k, v in times.items()}
            low = {k: min(v) for k, v in times.items()}
            print(f"   C={classes:<6} T={temperature:<6g} kd_loss median {med['kd_loss'] * 1e3:7.2f} ms (fastest "
                  f"{low['kd_loss'] * 1e3:7.2f})   textbook median {med['textbook'] * 1e3:7.2f} ms (fastest "
                  f"{low['textbook'] * 1e3:7.2f})   ratio {med['kd_loss'] / med['textbook']:.2f}x "
                  f"(fastest {low['kd_loss'] / low['textbook']:.2f}x)")
        memory = _kd_memory(classes, temperatures[0])
        mib = 2.0**20
        print(f"   C={classes:<6} T={temperatures[0]:<6g} peak memory: kd_loss {memory['kd_loss'][0] / mib:7.1f} MiB, "
              f"textbook {memory['textbook'][0] / mib:7.1f} MiB, ratio "
              f"{memory['kd_loss'][0] / memory['textbook'][0]:.2f}x; saved for backward: kd_loss "
              f"{memory['kd_loss'][1] / mib:.1f} MiB, textbook {memory['textbook'][1] / mib:.1f} MiB (one [B, C] "
              f"float32 tensor = {256 * classes * 4 / mib:.1f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the cached-logits comparison")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="step timing clock (default cpu)")
    parser.add_argument("--only", choices=["kd"], help="run only section 3 (kd_loss against the textbook formula)")
    parser.add_argument("--kd-repeats", type=int, default=40, help="repeats of section 3 (a quarter at C=21843)")
    parser.add_argument("--kd-temperatures", type=float, nargs="+", default=[4.0, 1.0, 1e4],
                        help="temperatures of section 3 (memory measured at the first)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = args.clock
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {args.threads} thread(s), CPU, {args.clock} clock")
    if args.only == "kd":
        _kd_section(args.kd_repeats, args.kd_temperatures)
        return
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
    _kd_section(args.kd_repeats, args.kd_temperatures)


if __name__ == "__main__":
    main()
