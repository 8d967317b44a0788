"""``timm-remem inspect``: show the MLP branches reweighting would scale, and their factors (offline)."""

from __future__ import annotations

import argparse
import json

from ..errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` sub-command."""
    p = subparsers.add_parser(
        "inspect",
        help="list a model's transformer MLP branches and the factors reweighting would give them",
        description="Build a timm model (random weights, nothing downloaded), find each block's MLP residual "
        "branch and print the factor `reweight` would give it.",
    )
    p.add_argument("model", help="timm model name, e.g. vit_base_patch16_224")
    p.add_argument("--alpha", type=float, default=0.85, help="MLP weight (default 0.85)")
    p.add_argument("--schedule", default="exponential", choices=["exponential", "constant"])
    p.add_argument("--top-k", type=int, default=None, help="reweight only the top K blocks (default: all)")
    p.add_argument("--model-kwargs", default="{}", help='JSON kwargs for timm.create_model, e.g. \'{"img_size": 64}\'')
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the branch table of ``args.model``; returns the exit code."""
    import timm

    from ..reweighting import _is_norm, find_branches, get_scales, reweight

    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--model-kwargs is not valid JSON ({e}): pass e.g. '{{\"img_size\": 64}}'.") from None
    try:
        model = timm.create_model(args.model, pretrained=False, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(
                f"unknown timm model {args.model!r}: see timm.list_models('*vit*') for names."
            ) from None
        raise
    except TypeError as e:
        raise ConfigError(
            f"timm.create_model({args.model!r}) rejected --model-kwargs {args.model_kwargs}: {e}. "
            "Use the model's constructor argument names (e.g. img_size, depth, embed_dim)."
        ) from None
    branches = find_branches(model)
    reweight(model, args.alpha, schedule=args.schedule, top_k=args.top_k)
    scales = get_scales(model)
    rows = [
        {
            "block": b.index,
            "branch": b.path,
            "kind": "fused-columns" if b.columns else ("post-norm" if _is_norm(b.module) else "mlp-output"),
            "block_class": type(model.get_submodule(b.block_path)).__name__,
            "factor": scales.get(b.path, 1.0),
        }
        for b in branches
    ]
    if args.json:
        print(json.dumps({"model": args.model, "num_blocks": branches[-1].index + 1, "branches": rows}, indent=2))
        return 0
    print(f"{args.model}: {branches[-1].index + 1} blocks with a transformer MLP branch "
          f"(alpha={args.alpha}, schedule={args.schedule}, top_k={args.top_k or 'all'})")
    width = max(len(r["branch"]) for r in rows)
    print(f"{'block':>5}  {'branch':<{width}}  {'where':<13}  {'block class':<24}  factor")
    for r in rows:
        print(f"{r['block']:>5}  {r['branch']:<{width}}  {r['kind']:<13}  {r['block_class']:<24}  {r['factor']:.4f}")
    return 0
