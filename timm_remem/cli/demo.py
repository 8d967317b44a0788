"""``timm-remem demo``: offline demo, a plain vs a ReMem ViT teacher on digits and the same CNN student from each.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="timm-remem")
    >>> register(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["demo", "--quick"])
    >>> args.output, args.quick, args.threads
    ('remem-demo', True, 1)
"""

from __future__ import annotations

import argparse

from .._validation import check_int
from ..train import run_demo

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="offline demo: plain vs ReMem ViT teacher on digits, the same CNN student from each",
        description="Train a small ViT teacher on scikit-learn's digits plainly and with ReMem (reweighting + SAM), "
        "distill the same small CNN student from each and train it alone; print one table and save a plot. "
        "Offline, a few minutes on 2 CPU cores. The teachers are not pretrained at scale, so the demo shows the "
        "pipeline, not ReMem's effect.",
    )
    p.add_argument("--output", default="remem-demo", help="output folder (default: ./remem-demo)")
    p.add_argument("--quick", action="store_true", help="tiny models and a few batches (seconds; a smoke test)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage (default: 0)")
    p.add_argument("--teacher-epochs", type=int, help="teachers' epochs (default: 12, 1 with --quick)")
    p.add_argument("--student-epochs", type=int, help="students' epochs (default: 8, 1 with --quick)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default: 1, the models are tiny; 0 keeps torch's default)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (default: progress bars on)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print its table (``run_demo`` printed it already with progress on); returns the exit code."""
    for flag, value in (("--teacher-epochs", args.teacher_epochs), ("--student-epochs", args.student_epochs)):
        if value is not None:
            check_int(flag, value, low=1)
    check_int("--threads", args.threads, low=0, hint="0 keeps torch's default")
    result = run_demo(args.output, quick=args.quick, progress=args.progress, seed=args.seed,
                      teacher_epochs=args.teacher_epochs, student_epochs=args.student_epochs,
                      threads=args.threads or None)
    if not args.progress:
        print(result.table)
    return 0
