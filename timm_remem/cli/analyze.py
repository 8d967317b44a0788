"""``timm-remem analyze``: a JSON report and PNG plots of a teacher's information, expertness, pruning and dynamics.

MODEL is a timm model name (random weights unless ``--pretrained``), a checkpoint folder written by
``timm_remem.save_pretrained`` (``config.json`` + ``model.safetensors``), or a folder of such checkpoint folders.
With several checkpoints the report holds the information plane and the checkpoint ranking of all of them, and the
per-model analyses (dynamics, expertness, pruning) of the best-ranked one.

Data: ``--data digits`` (default, offline: scikit-learn's 8x8 digits, upsampled to the model's input size, repeated
to 3 channels and normalised with the model's mean/std; a fixed seeded 30% validation split) or ``--data PATH``, an
image folder ``PATH/<class>/<image>`` read with timm's eval transforms.

Example:
    timm-remem analyze test_vit --model-kwargs '{"img_size": 32}' --max-samples 128 --out analysis-test-vit
"""

from __future__ import annotations

import argparse
import math

from .._validation import check_int
from ..errors import ConfigError
from ._args import deferred_module, json_dict

_analyze_run = deferred_module("timm_remem.cli._analyze_run")  # the torch-heavy body, executed when the command runs

__all__ = ["ANALYSES", "register", "run"]

ANALYSES = ("information", "dynamics", "expertness", "pruning")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``analyze`` sub-command."""
    p = subparsers.add_parser(
        "analyze",
        help="write a JSON report and PNG plots: MI, information plane, expertness, pruning, layer dynamics",
        description="Measure a teacher (or a folder of teacher checkpoints) on a dataset: I(X;F_T), I(F_T;Y), "
        "I(X;F_T|Y), the information plane and checkpoint ranking, MLP expertness, the top-down pruning "
        "diagnostic and per-layer dynamics. Writes report.json and PNG plots to --out.",
    )
    p.add_argument("model", help="timm model name, checkpoint folder (config.json), or folder of checkpoint folders")
    p.add_argument("--pretrained", action="store_true", help="load pretrained timm weights (needs them cached)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="head size for a timm name (default: the dataset's number of classes)")
    p.add_argument("--model-kwargs", type=json_dict("--model-kwargs"), default={},
                   help='JSON kwargs for timm.create_model, e.g. \'{"img_size": 32}\'')
    p.add_argument("--data", default="digits", help="'digits' (offline, default) or an image folder PATH/<class>/")
    p.add_argument("--max-samples", type=int, default=256, help="images used for every measurement (default 256)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--analyses", default=",".join(ANALYSES),
                   help=f"comma-separated subset of {','.join(ANALYSES)} (default: all)")
    p.add_argument("--features", default="logits", choices=["logits", "pre_logits"], help="teacher output measured")
    p.add_argument("--mi-method", default="gaussian", choices=["gaussian", "ksg", "binning", "renyi"])
    p.add_argument("--noise", type=float, default=0.1, help="relative noise of the MI channel (default 0.1)")
    p.add_argument("--max-dim", type=int, default=32,
                   help="compress features to this many principal components before MI (default 32; 0 = keep all)")
    p.add_argument("--score", default="combined", choices=["combined", "mi", "conditional_mi", "accuracy"],
                   help="checkpoint ranking score (default combined)")
    p.add_argument("--dynamics-images", type=int, default=16, help="images for the layer dynamics (default 16)")
    p.add_argument("--entropy-range", default="global", choices=["global", "layer"])
    p.add_argument("--gradient", action="store_true", help="also measure gradient magnitude in the dynamics")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: analysis-<model name>)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> list[str]:
    analyses = [a.strip() for a in args.analyses.split(",") if a.strip()]
    bad = [a for a in analyses if a not in ANALYSES]
    if bad or not analyses:
        raise ConfigError(f"--analyses {args.analyses!r}: choose a comma-separated subset of {','.join(ANALYSES)}.")
    for name in ("max_samples", "batch_size", "dynamics_images"):
        check_int(f"--{name.replace('_', '-')}", getattr(args, name), low=1)
    if not (math.isfinite(args.noise) and args.noise > 0):
        raise ConfigError(f"--noise must be > 0, got {args.noise}.")
    check_int("--max-dim", args.max_dim, low=0, hint="0 keeps every dimension")
    return analyses


def run(args: argparse.Namespace) -> int:
    """Run the analyses and write ``report.json`` and PNGs; returns the exit code."""
    analyses = _check_args(args)
    run_analyses = _analyze_run.run_analyses  # loads torch and timm now

    return run_analyses(args, analyses)
