"""``timm-remem analyze``: a JSON report and PNG plots of a teacher's information, expertness, pruning and dynamics.

MODEL is a timm name, a checkpoint folder written by ``timm_remem.save_pretrained`` or a folder of them (then all are
ranked and the best-ranked one gets the per-model analyses). ``--data digits`` (offline, the held-out split) or an
image folder ``PATH/<class>/<image>``; see docs/analysis.md.

Example:
    timm-remem analyze test_vit --model-kwargs '{"img_size": 32}' --max-samples 128 --out analysis-test-vit
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import create_dataset, create_transform

from .._io import atomic_write_text, claim_output_dir
from .._models import create_timm_model, data_config, model_input_size
from .._validation import check_int
from .._version import __version__
from ..analysis import (
    layer_dynamics,
    mlp_expertness,
    plot_expertness,
    plot_information_plane,
    plot_layer_dynamics,
    plot_pruning,
    pruning_diagnostic,
    rank_checkpoints,
    teacher_information,
)
from ..analysis.dynamics import ENTROPY_RANGES
from ..analysis.information import FEATURES, SCORES
from ..analysis.mi import MI_METHODS
from ..data import DigitsDataset
from ..errors import ConfigError, UnsupportedModelError
from ..teachers import list_exports, load_teacher_model
from ._args import json_dict

__all__ = ["ANALYSES", "register", "run"]

ANALYSES = ("information", "dynamics", "expertness", "pruning")


def register(subparsers: argparse._SubParsersAction) -> None:
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
    p.add_argument("--features", default="logits", choices=FEATURES, help="teacher output measured")
    p.add_argument("--mi-method", default="gaussian", choices=MI_METHODS)
    p.add_argument("--noise", type=float, default=0.1, help="relative noise of the MI channel (default 0.1)")
    p.add_argument("--max-dim", type=int, default=32,
                   help="compress features to this many principal components before MI (default 32; 0 = keep all)")
    p.add_argument("--score", default="combined", choices=SCORES,
                   help="checkpoint ranking score (default combined)")
    p.add_argument("--dynamics-images", type=int, default=16, help="images for the layer dynamics (default 16)")
    p.add_argument("--entropy-range", default="global", choices=ENTROPY_RANGES)
    p.add_argument("--gradient", action="store_true", help="also measure gradient magnitude in the dynamics")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: analysis-<model name>)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the flags, run the analyses and write ``report.json`` and PNGs; returns the exit code."""
    analyses = [a.strip() for a in args.analyses.split(",") if a.strip()]
    if not analyses or any(a not in ANALYSES for a in analyses):
        raise ConfigError(f"--analyses {args.analyses!r}: choose a comma-separated subset of {','.join(ANALYSES)}.")
    for name in ("max_samples", "batch_size", "dynamics_images"):
        check_int(f"--{name.replace('_', '-')}", getattr(args, name), low=1)
    if not (math.isfinite(args.noise) and args.noise > 0):
        raise ConfigError(f"--noise must be > 0, got {args.noise}.")
    check_int("--max-dim", args.max_dim, low=0, hint="0 keeps every dimension")
    return run_analyses(args, analyses)


def _dataset(model: torch.nn.Module, data: str) -> Any:
    """The dataset ``--data`` names, at the model's input size: the held-out digits split or an image folder."""
    _, h, w = model_input_size(model)
    cfg = data_config(model)
    if data == "digits":
        if h != w:
            raise ConfigError(f"--data digits needs a square input size, the model takes {h}x{w}; pass --data PATH.")
        if len(cfg["mean"]) != 3:
            raise ConfigError(f"--data digits makes 3-channel images, the model takes {len(cfg['mean'])}; pass "
                              "--data PATH.")
        return DigitsDataset("val", img_size=h, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    if not os.path.isdir(data):
        raise ConfigError(f"--data {data!r} is neither 'digits' nor an existing image folder (PATH/<class>/<image>).")
    cfg["input_size"] = (cfg["input_size"][0], h, w)
    ds = create_dataset("", root=data, transform=create_transform(**cfg, is_training=False))
    if len(ds) == 0:
        raise ConfigError(f"the image folder {data!r} holds no images; expected PATH/<class>/<image>.")
    return ds


def run_analyses(args: argparse.Namespace, analyses: list[str]) -> int:
    """Run ``analyses`` on ``args.model`` and write ``report.json`` and PNGs; returns the exit code 0."""
    torch.manual_seed(args.seed)
    progress = not args.no_progress
    device = torch.device(args.device)
    path = Path(args.model)
    if path.is_dir():
        dirs = list_exports(path)
        checkpoints = {d.name: d for d in dirs}
        first = load_teacher_model(dirs[0])
    else:
        checkpoints = None
        if not args.model.startswith(("hf-hub:", "hf_hub:", "local-dir:")) and not timm.is_model(args.model):
            raise ConfigError(f"{args.model!r} is neither a folder nor a timm model name: see "
                              "timm.list_models('*vit*').")
        first = create_timm_model(args.model, pretrained=args.pretrained, kwargs=args.model_kwargs,
                                  num_classes=args.num_classes or (10 if args.data == "digits" else None))
    first = first.to(device).eval()

    ds = _dataset(first, args.data)
    pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed))[: args.max_samples].tolist()
    items = [ds[i] for i in pick]
    images, labels = torch.stack([im for im, _ in items]), torch.tensor([int(t) for _, t in items])
    step = args.batch_size
    loader = [(images[i : i + step], labels[i : i + step]) for i in range(0, len(labels), step)]
    info_kw: dict[str, Any] = {"features": args.features, "method": args.mi_method, "noise": args.noise,
                               "max_dim": args.max_dim or None, "seed": args.seed, "device": device}

    out = Path(args.out or f"analysis-{path.name if path.is_dir() else args.model.replace('/', '_')}")
    claim_output_dir(out, "analysis", what="--out")
    report: dict[str, Any] = {
        "timm_remem_version": __version__,
        "model": args.model,
        "data": {"name": args.data, "num_samples": int(len(labels)), "image_size": list(images.shape[-2:])},
        "settings": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in info_kw.items()},
        "plots": {},
        "timings_s": {},
    }

    def timed(name: str, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        except UnsupportedModelError as err:  # this model lacks what the analysis needs: report it, go on
            report[name] = {"skipped": str(err)}
            return None
        finally:
            report["timings_s"][name] = round(time.perf_counter() - t0, 3)

    model = first
    if "information" in analyses:
        if checkpoints is not None and len(checkpoints) > 1:
            ranking = timed("information", lambda: rank_checkpoints(
                checkpoints, loader, score=args.score, progress=progress, **info_kw))
            if ranking is not None:
                points = sorted((r.info for r in ranking), key=lambda p: list(checkpoints).index(p.name))
                report["information_plane"] = [p.to_dict() for p in points]
                report["ranking"] = [r.to_dict() | {"info": None} for r in ranking]
                report["best_checkpoint"] = ranking[0].name
                model = load_teacher_model(checkpoints[ranking[0].name]).to(device).eval()
                _plot(report, out, "information_plane", plot_information_plane, points)
        else:
            info = timed("information", lambda: teacher_information(model, loader, progress=progress, **info_kw))
            if info is not None:
                info.name = path.name if checkpoints else args.model
                report["information"] = info.to_dict()
                _plot(report, out, "information_plane", plot_information_plane, [info])
    if checkpoints is not None:
        report["analyzed_checkpoint"] = report.get("best_checkpoint", next(iter(checkpoints)))
    if "dynamics" in analyses:
        batch = images[: args.dynamics_images].to(device)
        target = labels[: args.dynamics_images].to(device) if args.gradient else None
        dyn = timed("dynamics", lambda: layer_dynamics(model, batch, entropy_range=args.entropy_range,
                                                       gradient=args.gradient, target=target))
        if dyn is not None:
            report["dynamics"] = dyn.to_dict()
            _plot(report, out, "layer_dynamics", plot_layer_dynamics, dyn)
    if "expertness" in analyses:
        blocks = timed("expertness", lambda: mlp_expertness(model, loader, device=device, progress=progress))
        if blocks is not None:
            report["expertness"] = [b.summary() for b in blocks]
            _plot(report, out, "expertness", plot_expertness, blocks)
    if "pruning" in analyses:
        result = timed("pruning", lambda: pruning_diagnostic(model, loader, progress=progress, **info_kw))
        if result is not None:
            report["pruning"] = result.to_dict()
            _plot(report, out, "pruning", plot_pruning, result)

    report_path = atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=_json_default))
    _print_summary(report, report_path)
    return 0


def _plot(report: dict[str, Any], out: Path, name: str, fn, obj: Any) -> None:
    file = out / f"{name}.png"
    fn(obj, file)
    report["plots"][name] = file.name


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _print_summary(report: dict[str, Any], path: Path) -> None:
    lines = [f"report: {path}"]
    info = report.get("information")
    if isinstance(info, dict) and "i_xf" in info:
        acc = info.get("accuracy")
        lines.append(
            f"I(X;F)={info['i_xf']:.3f}  I(F;Y)={info['i_fy'] or 0:.3f}  I(X;F|Y)={info['i_xf_given_y'] or 0:.3f} nats"
            + (f"  accuracy={acc:.3f}" if acc is not None else "")
        )
    for r in report.get("ranking", []):
        lines.append(f"  #{r['rank']} {r['name']}: score={r['score']:.3f}")
    for name, file in report["plots"].items():
        lines.append(f"{name}: {path.parent / file}")
    for name in ANALYSES:
        if isinstance(report.get(name), dict) and "skipped" in report[name]:
            lines.append(f"{name}: skipped ({report[name]['skipped']})")
    print("\n".join(lines))
