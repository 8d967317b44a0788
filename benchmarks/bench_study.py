"""The study harness's overhead: ``run_study`` against the same stages called one by one.

One study of two arms (``plain`` and ``student``) and one seed, against the same three stages run directly through
the public API (``finetune_teacher``, ``teacher_information`` on the validation split, ``distill_student`` from the
teacher's last checkpoint and alone), with the same settings. Rounds alternate (study, stages, stages, study, ...)
so that load on the machine hits both alike; the ratio is the median study time over the median stage time. The
harness adds its folder and settings checks, the reweightability probe, the JSON files, the statistics, the
Markdown table and the plot. Target: <= 1.02.

The default settings are one run of the published CPU protocol (docs/evidence.md: a ViT teacher fine-tuned on 5
labelled digits per class, a quarter-width ResNet-18 distilled with the labels of those 50 images); ``--quick``
uses timm's test models (seconds; the ratio then measures mostly fixed costs).

Usage:
    python benchmarks/bench_study.py --rounds 3
    python benchmarks/bench_study.py --quick --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from timm_remem.analysis import teacher_information
from timm_remem.data import create_dataset, create_loader
from timm_remem.study import run_study
from timm_remem.teachers import load_teacher_model
from timm_remem.train import DistillConfig, FinetuneConfig, distill_student, finetune_teacher

VIT = {"patch_size": 8, "embed_dim": 96, "depth": 6, "num_heads": 3}
CNN = {"channels": [16, 32, 64, 128], "stem_width": 16}


def settings(quick: bool) -> dict:
    if quick:
        return dict(teacher="test_vit", teacher_kwargs={}, student="test_resnet", student_kwargs={},
                    finetune=dict(epochs=1, img_size=16, limit_train_batches=2, save_state=False),
                    distill=dict(epochs=1, img_size=16, limit_train_batches=2, save_state=False))
    return dict(teacher="vit_tiny_patch16_224", teacher_kwargs=VIT, student="resnet18", student_kwargs=CNN,
                finetune=dict(train_per_class=5, epochs=10, batch_size=32, lr=2e-4, warmup_epochs=1,
                              save_state=False),
                distill=dict(labels_per_class=5, epochs=8, batch_size=64, lr=2e-3, temperature=4.0,
                             save_state=False))


def by_study(s: dict, out: Path) -> None:
    run_study(teacher=s["teacher"], teacher_kwargs=s["teacher_kwargs"], student=s["student"],
              student_kwargs=s["student_kwargs"], dataset="digits", arms=["plain", "student"], seeds=1,
              confidence=None, finetune=s["finetune"], distill=s["distill"], mi={"max_samples": 360},
              sharpness=None, device="cpu", output=str(out), progress=False)  # the stages below have no sharpness


def by_stages(s: dict, out: Path) -> None:
    common = dict(dataset="digits", seed=0, device="cpu", progress=False)
    tcfg = FinetuneConfig(**s["finetune"], **common, model=s["teacher"], model_kwargs=s["teacher_kwargs"],
                          output=str(out / "teacher"))
    res = finetune_teacher(tcfg)
    checkpoint = str(res.checkpoints[-1])
    model = load_teacher_model(checkpoint, num_classes=10).eval()
    cfg = model.pretrained_cfg
    val = create_dataset("digits", split="val", img_size=tcfg.img_size or 32, mean=cfg["mean"], std=cfg["std"])
    loader = ((x, y) for x, y, _ in create_loader(val, tcfg.eval_batch_size))
    teacher_information(model, loader, device="cpu", progress=False, max_samples=360)
    for teacher, name in ((checkpoint, "student-plain"), (None, "student-alone")):
        distill_student(DistillConfig(**s["distill"], **common, model=s["student"], model_kwargs=s["student_kwargs"],
                                      teacher=teacher, output=str(out / name)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each (default: 3)")
    parser.add_argument("--quick", action="store_true", help="timm's test models (seconds)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = settings(args.quick)
    times: dict[str, list[float]] = {"study": [], "stages": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ("study", "stages") if r % 2 == 0 else ("stages", "study")
            for name in order:
                out = Path(tmp) / f"{name}-{r}"
                t0 = time.perf_counter()
                (by_study if name == "study" else by_stages)(s, out)
                times[name].append(time.perf_counter() - t0)
                print(f"round {r + 1}: {name} {times[name][-1]:.2f} s", flush=True)
    study, stages = statistics.median(times["study"]), statistics.median(times["stages"])
    print(f"\nmedian study {study:.2f} s, median stages one by one {stages:.2f} s, ratio {study / stages:.3f} "
          f"(target <= 1.02; {args.rounds} rounds, {'quick' if args.quick else 'protocol'} settings)")


if __name__ == "__main__":
    main()
