"""``timm-remem inspect``: show the MLP branches reweighting would scale, and their factors (offline)."""

from __future__ import annotations

import argparse
import json

from timm import is_model

from .._models import create_timm_model
from ..errors import ConfigError
from ..reweighting import find_branches, get_scales, reweight
from ..reweighting.config import SCHEDULES
from ._args import json_dict

# How the table names each ``Branch.kind`` (inspect lists MLP branches only).
_WHERE = {"output": "mlp-output", "post-norm": "post-norm", "fused-columns": "fused-columns"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="list a model's transformer MLP branches and the factors reweighting would give them",
        description="Build a timm model (random weights, nothing downloaded), find each block's MLP residual "
        "branch and print the factor `reweight` would give it.",
    )
    p.add_argument("model", help="timm model name, e.g. vit_base_patch16_224")
    p.add_argument("--alpha", type=float, default=0.85, help="MLP weight (default 0.85)")
    p.add_argument("--schedule", default="exponential", choices=SCHEDULES)
    p.add_argument("--top-k", type=int, default=None, help="reweight only the top K blocks (default: all)")
    p.add_argument("--model-kwargs", default="{}", help='JSON kwargs for timm.create_model, e.g. \'{"img_size": 64}\'')
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the branch table of ``args.model``; returns the exit code."""
    try:  # parsed here, not as the argparse type, so the error reads like every other inspect error
        kwargs = json_dict("--model-kwargs")(args.model_kwargs)
    except argparse.ArgumentTypeError as e:
        raise ConfigError(str(e)) from None

    if ":" not in args.model and not is_model(args.model):  # "hf-hub:" / "local-dir:" sources pass through
        raise ConfigError(f"unknown timm model {args.model!r}: see timm.list_models('*vit*') for names.")
    model = create_timm_model(args.model, pretrained=False, kwargs=kwargs)
    branches = find_branches(model)
    reweight(model, args.alpha, schedule=args.schedule, top_k=args.top_k)
    scales = get_scales(model)
    rows = [{"block": b.index, "branch": b.path, "kind": _WHERE[b.kind],
             "block_class": type(model.get_submodule(b.block_path)).__name__, "factor": scales.get(b.path, 1.0)}
            for b in branches]
    num_blocks = branches[-1].index + 1
    if args.json:
        print(json.dumps({"model": args.model, "num_blocks": num_blocks, "branches": rows}, indent=2))
        return 0
    print(f"{args.model}: {num_blocks} blocks with a transformer MLP branch "
          f"(alpha={args.alpha}, schedule={args.schedule}, top_k={args.top_k or 'all'})")
    width = max(len(r["branch"]) for r in rows)
    print(f"{'block':>5}  {'branch':<{width}}  {'where':<13}  {'block class':<24}  factor")
    for r in rows:
        print(f"{r['block']:>5}  {r['branch']:<{width}}  {r['kind']:<13}  {r['block_class']:<24}  {r['factor']:.4f}")
    return 0
