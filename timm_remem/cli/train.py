"""``timm-remem finetune | distill | select | demo``: the ReMem pipeline from the command line.

Each sub-command builds the matching configuration of :mod:`timm_remem.pipeline` from its flags (a flag left out
keeps the library default) and calls the library function. ``finetune``, ``distill`` and ``select`` run unchanged
under ``torchrun --nproc_per_node N`` (DistributedDataParallel; ``--batch-size`` is per process); only rank 0
prints and writes files.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import ConfigError


def _json_dict(flag: str):
    def parse(text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{flag} is not valid JSON ({e}); pass e.g. '{{\"depth\": 6}}'") from e
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{flag} must be a JSON object such as '{{\"depth\": 6}}', got {text!r}")
        return value

    return parse


def _add_common(p: argparse.ArgumentParser, *, model_help: str) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, help=model_help)
    g.add_argument("--model-kwargs", dest="model_kwargs", type=_json_dict("--model-kwargs"),
                   help='JSON kwargs for timm.create_model, e.g. \'{"drop_path_rate": 0.1}\'')
    g.add_argument("--pretrained", action="store_true", default=None, help="load the model's pretrained weights")
    g.add_argument("--dataset", help="digits (offline, default), folder, torch/cifar100, hfds/<id>, ...")
    g.add_argument("--data-dir", dest="data_dir", help="dataset root folder (image folders, torchvision sets)")
    g.add_argument("--download", action="store_true", default=None, help="let torchvision download torch/... sets")
    g.add_argument("--img-size", dest="img_size", type=int, help="input size (default: 32 for digits, else model's)")
    g.add_argument("--num-classes", dest="num_classes", type=int, help="check the dataset has this many classes")
    g.add_argument("--output", help="output folder of the run")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", dest="batch_size", type=int,
                   help="batch size per process (under torchrun the global batch is nproc x this)")
    g.add_argument("--eval-batch-size", dest="eval_batch_size", type=int)
    g.add_argument("--opt", dest="optimizer", help="timm optimizer name: adamw (default), sgd, ...")
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", dest="weight_decay", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--sched", help="timm scheduler: cosine (default), step, multistep, poly, none")
    g.add_argument("--warmup-epochs", dest="warmup_epochs", type=int)
    g.add_argument("--min-lr", dest="min_lr", type=float)
    g.add_argument("--smoothing", dest="label_smoothing", type=float, help="label smoothing")
    g.add_argument("--augment", action="store_true", default=None, help="timm training augmentation")
    g.add_argument("--mixup", type=float, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, help="cutmix alpha (0: off)")
    g.add_argument("--rho", type=float, help="SAM radius (0: no SAM; ReMem uses >= 0.05)")
    g.add_argument("--adaptive", action="store_true", default=None, help="adaptive SAM (ASAM)")
    g.add_argument("--amp", action="store_true", default=None, help="mixed precision (bf16 on CPU, fp16 on CUDA)")
    g.add_argument("--clip-grad", dest="clip_grad", type=float, help="clip the gradient norm to this value")
    g.add_argument("--ema", action="store_true", default=None, help="keep an EMA of the weights (ModelEmaV3)")
    g.add_argument("--ema-decay", dest="ema_decay", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:1")
    g.add_argument("--workers", dest="num_workers", type=int, help="data loading workers")
    g.add_argument("--limit-train-batches", dest="limit_train_batches", type=int, help="batches per epoch (quick runs)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save-at", dest="save_at", type=int, nargs="*",
                   help="epochs after which to export a checkpoint (default: the last epoch)")
    g.add_argument("--checkpoint-every", dest="checkpoint_every", type=int,
                   help="also write a resumable checkpoint every N steps (default: at epoch ends only)")
    g.add_argument("--keep-last", dest="keep_last", type=int, help="resumable checkpoints kept (default 2)")
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="resume from OUTPUT/train-state (or from CHECKPOINT); 'auto': resume if OUTPUT holds a "
                   "checkpoint, else start afresh (restarted jobs, torchrun --max-restarts)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")


def _add_distill(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher-kwargs", dest="teacher_kwargs", type=_json_dict("--teacher-kwargs"),
                   help="JSON kwargs for building the teacher")
    g.add_argument("--no-teacher-pretrained", dest="teacher_pretrained", action="store_false", default=None,
                   help="a teacher given by timm name gets random weights (tests only)")
    g.add_argument("--method", choices=["kd", "hard", "dist"], help="distillation loss (default kd)")
    g.add_argument("--temperature", type=float)
    g.add_argument("--task-weight", dest="task_weight", type=float, help="weight of the label loss (default 1)")
    g.add_argument("--distill-weight", dest="distill_weight", type=float, help="weight of the KD loss (default 1)")
    g.add_argument("--cache-teacher", dest="cache_teacher", choices=["auto", "on", "off"],
                   help="cache teacher logits across epochs (auto: when inputs are deterministic)")


def _options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    out = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if "cache_teacher" in out:
        out["cache_teacher"] = {"auto": None, "on": True, "off": False}[out["cache_teacher"]]
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``finetune``, ``distill``, ``select`` and ``demo`` sub-commands."""
    p = subparsers.add_parser(
        "finetune", help="fine-tune a ViT teacher, with ReMem reweighting (--alpha) and SAM (--rho)",
        description="Fine-tune a teacher from any timm name (hf-hub: and local-dir: included). --alpha reweights "
        "its MLP residual branches, --rho trains it with SAM; merged checkpoints are exported at --save-at epochs "
        "to OUTPUT/checkpoints/epoch-NNN (plain timm format).",
    )
    _add_common(p, model_help="teacher: a timm name, hf-hub:org/name or local-dir:/path")
    g = p.add_argument_group("ReMem reweighting")
    g.add_argument("--alpha", type=float, help="MLP weight (e.g. 0.85); omit for no reweighting")
    g.add_argument("--schedule", choices=["exponential", "constant"], help="per-block factors (default exponential)")
    g.add_argument("--top-k", dest="top_k", type=int, help="reweight only the top K blocks")
    g.add_argument("--learnable", action="store_true", default=None, help="train the factors")
    p.set_defaults(func=run_finetune)

    p = subparsers.add_parser(
        "distill", help="distill a student from a teacher checkpoint (or train it alone)",
        description="Distill a student (any timm name: resnet18, mobilenetv2_100, ...) from a teacher: a checkpoint "
        "folder written by finetune, hf-hub:org/name, local-dir:/path or a timm name. Without --teacher the "
        "student is trained alone (the baseline).",
    )
    _add_common(p, model_help="student: a timm name")
    p.add_argument("--teacher", help="teacher checkpoint folder, hf-hub:org/name, local-dir:/path or timm name")
    _add_distill(p)
    p.set_defaults(func=run_distill)

    p = subparsers.add_parser(
        "select", help="ReMem's protocol: short distillation from each teacher checkpoint, keep the best",
        description="Distill the student briefly from every checkpoint in TEACHERS (e.g. runs/teacher/checkpoints) "
        "with cached teacher logits, print a table, save OUTPUT/select.png and name the best checkpoint.",
    )
    p.add_argument("teachers", help="folder of teacher checkpoint folders (or a finetune run folder)")
    _add_common(p, model_help="student: a timm name")
    _add_distill(p)
    p.add_argument("--mi-score", dest="mi_score", action="store_true",
                   help="also rank checkpoints by an MI-based score and report its Spearman correlation")
    p.set_defaults(func=run_select)

    p = subparsers.add_parser(
        "demo", help="offline demo: plain vs ReMem ViT teacher on digits, the same CNN student from each",
        description="Train a small ViT teacher on scikit-learn's digits plainly and with ReMem (reweighting + SAM), "
        "distill the same small CNN student from each and train it alone; print one table and save a plot. "
        "Offline, a few minutes on 2 CPU cores. The teachers are not pretrained at scale, so the demo shows the "
        "pipeline, not ReMem's effect.",
    )
    p.add_argument("--output", default="remem-demo", help="output folder (default ./remem-demo)")
    p.add_argument("--quick", action="store_true", help="tiny models and a few batches (seconds; a smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-epochs", dest="teacher_epochs", type=int)
    p.add_argument("--student-epochs", dest="student_epochs", type=int)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the models are tiny; 0 keeps torch's default)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run_demo)


def run_finetune(args: argparse.Namespace) -> int:
    """``timm-remem finetune``."""
    from .. import distributed
    from ..pipeline import FinetuneConfig, finetune_teacher

    try:
        result = finetune_teacher(**_options(args, FinetuneConfig))
        if distributed.is_main_process():
            print(f"teacher val acc {result.val_acc:.4f}; checkpoints: "
                  f"{', '.join(str(p) for p in result.checkpoints)}")
    finally:
        distributed.cleanup()
    return 0


def run_distill(args: argparse.Namespace) -> int:
    """``timm-remem distill``."""
    from .. import distributed
    from ..pipeline import DistillConfig, distill_student

    try:
        result = distill_student(**_options(args, DistillConfig))
        if distributed.is_main_process():
            teacher = "" if result.teacher_acc is None else f" (teacher {result.teacher_acc:.4f})"
            print(f"student val acc {result.val_acc:.4f}{teacher}; output: {result.output}")
    finally:
        distributed.cleanup()
    return 0


def run_select(args: argparse.Namespace) -> int:
    """``timm-remem select``."""
    from .. import distributed
    from ..pipeline import DistillConfig, select_teacher

    options = _options(args, DistillConfig)
    try:
        result = select_teacher(args.teachers, mi_score=args.mi_score, **options)
        if distributed.is_main_process():
            if not options.get("progress", True):  # select_teacher printed it otherwise
                print(result.table)
            print(f"best teacher checkpoint: {result.best}")
    finally:
        distributed.cleanup()
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``timm-remem demo``."""
    from ..pipeline import run_demo as demo

    for name in ("teacher_epochs", "student_epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0 keeps torch's default), got {args.threads}")
    result = demo(args.output, quick=args.quick, progress=args.progress, seed=args.seed,
                  teacher_epochs=args.teacher_epochs, student_epochs=args.student_epochs,
                  threads=args.threads or None)
    if not args.progress:
        print(result.table)
    return 0
