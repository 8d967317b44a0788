"""``timm-remem study``: the ReMem ablation over seeds, with confidence intervals (see :mod:`timm_remem.study`).

Settings come from, in increasing priority: ``--quick``, ``--config FILE`` (the
:class:`~timm_remem.study.StudyConfig` fields), then the flags typed. ``--finetune``, ``--distill``,
``--select-options``, ``--mi`` and ``--sharpness`` take ``KEY=VALUE`` items (VALUE read as JSON where it parses);
``--epochs``, ``--img-size``, ``--batch-size`` and ``--limit-train-batches`` set both training stages.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="timm-remem")
    >>> register(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["study", "--teacher", "test_vit", "--student", "test_resnet", "--alpha", "0.7",
    ...                           "0.9", "--finetune", "lr=1e-3", "--epochs", "2"])
    >>> opts = options(args)
    >>> opts["alpha"], opts["finetune"], opts["distill"]
    ([0.7, 0.9], {'lr': 0.001, 'epochs': 2}, {'epochs': 2})
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from ..reweighting.config import SCHEDULES
from ..study import runner as _runner
from ..study.config import DEFAULT_ARMS, SHARPNESS_DEFAULTS, StudyConfig, load_config, study_config
from ._args import json_dict

__all__ = ["register", "options", "run", "key_values"]

_BOTH = ("epochs", "img_size", "batch_size", "limit_train_batches")  # flags that set both training stages


def key_values(flag: str):
    """An argparse ``type`` for ``KEY=VALUE`` (VALUE read as JSON when it parses, else kept as a string).

    Example:
        >>> key_values("--finetune")("lr=1e-3"), key_values("--finetune")("sched=step")
        (('lr', 0.001), ('sched', 'step'))
    """

    def parse(text: str) -> tuple[str, Any]:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"{flag} takes KEY=VALUE items such as lr=1e-3, got {text!r}")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        return key.strip().replace("-", "_"), parsed

    parse.__name__ = "KEY=VALUE"
    return parse


def _confidence(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--confidence takes a level such as 0.95, or 'none'; got {text!r}") from err


_FIELDS = {f.name: f for f in dataclasses.fields(StudyConfig)}


def _help(name: str, default: str) -> str:
    """A flag's help: its StudyConfig field's help (written once, there) and the default the command line shows."""
    return f"{_FIELDS[name].metadata['help']} (default: {default})"


def _add(group: argparse._ArgumentGroup, flag: str, default: str, **kwargs: Any) -> None:
    """Add the flag of StudyConfig field ``flag``: absent unless given, its help showing ``default``."""
    group.add_argument(flag, default=argparse.SUPPRESS, help=_help(flag[2:].replace("-", "_"), default), **kwargs)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "study", help="the ReMem ablation (plain, reweight, sam, onepass, remem, student) over seeds, with intervals",
        description="For every arm and seed: fine-tune the teacher, optionally pick its checkpoint (select), "
        "measure I(X; F_T) and the teacher's sharpness, and distill the student; then per-arm means with Student-t "
        "intervals, paired differences against plain and verdicts. Each (arm, seed) is a resumable run folder; "
        "rerunning a killed study resumes it and skips finished runs; a rerun with more arms or seeds runs only "
        "those, one with other sharpness options measures only the sharpness again.",
    )
    S = argparse.SUPPRESS
    g = p.add_argument_group("what to compare")
    g.add_argument("--config", metavar="FILE", default=S, help="study settings from a YAML or JSON file; flags "
                   "override it (default: unset)")
    g.add_argument("--quick", action="store_true", default=S, help="tiny test models on digits, 2 seeds, 1 epoch "
                   "(seconds; a smoke test) (default: off)")
    _add(g, "--teacher", "required unless --quick or --config")
    _add(g, "--student", "required unless --quick or --config")
    _add(g, "--teacher-kwargs", "{}", type=json_dict("--teacher-kwargs"), metavar="JSON")
    _add(g, "--student-kwargs", "{}", type=json_dict("--student-kwargs"), metavar="JSON")
    _add(g, "--pretrained", "off", action="store_true")
    _add(g, "--dataset", "digits")
    _add(g, "--data-dir", "unset")
    _add(g, "--arms", " ".join(DEFAULT_ARMS), nargs="+", metavar="ARM")
    _add(g, "--seeds", "3", type=int)
    _add(g, "--first-seed", "0", type=int)
    _add(g, "--alpha", "0.85", type=float, nargs="+")
    _add(g, "--schedule", "exponential", nargs="+", choices=SCHEDULES)
    _add(g, "--rho", "0.05", type=float)
    _add(g, "--select", "off, the last one", action="store_true")
    s = p.add_argument_group("stage settings")
    _add(s, "--finetune", "none", nargs="+", type=key_values("--finetune"), metavar="KEY=VALUE")
    _add(s, "--distill", "none", nargs="+", type=key_values("--distill"), metavar="KEY=VALUE")
    _add(s, "--select-options", "epochs=2", nargs="+", type=key_values("--select-options"), metavar="KEY=VALUE")
    s.add_argument("--epochs", type=int, default=S, help="epochs of teachers and students (default: 10)")
    s.add_argument("--img-size", type=int, default=S,
                   help="input size of both stages (default: 32 for digits, else the model's)")
    s.add_argument("--batch-size", type=int, default=S, help="batch size of both stages (default: 64)")
    s.add_argument("--limit-train-batches", type=int, default=S, help="batches per epoch in both stages (default: all)")
    s.add_argument("--mi", nargs="+", type=key_values("--mi"), metavar="KEY=VALUE", default=S,
                   help="teacher_information options, e.g. method=ksg max_samples=1000 (default: gaussian, logits, "
                   "2000 samples)")
    s.add_argument("--no-mi", action="store_true", default=S, help="skip the MI measurement (default: measured)")
    defaults = " ".join(f"{k}={'study rho' if v is None else str(v).lower()}" for k, v in SHARPNESS_DEFAULTS.items())
    s.add_argument("--sharpness", nargs="+", type=key_values("--sharpness"), metavar="KEY=VALUE", default=S,
                   help=f"options of the teachers' sharpness measurement (SAM increase, top Hessian eigenvalue), e.g. "
                   f"iters=50 batches=8 (default: {defaults})")
    s.add_argument("--no-sharpness", action="store_true", default=S,
                   help="skip the sharpness measurement (default: measured)")
    r = p.add_argument_group("running")
    _add(r, "--confidence", "0.95", type=_confidence)
    _add(r, "--device", "auto")
    _add(r, "--amp", "off", action="store_true")
    _add(r, "--output", "runs/study")
    r.add_argument("--no-progress", dest="progress", action="store_false", default=S,
                   help="no " + _help("progress", "on"))
    p.set_defaults(func=run)


def options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~timm_remem.study.StudyConfig` settings given on the command line (the file's under them)."""
    # the top-level parser's own options (--debug) are not study settings
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "debug")}
    out: dict[str, Any] = load_config(given.pop("config")) if "config" in given else {}
    for key in ("finetune", "distill", "select_options", "mi", "sharpness"):
        if key in given:
            base = out.get(key) if isinstance(out.get(key), dict) else {}
            out[key] = {**base, **dict(given.pop(key))}
    both = {k: given.pop(k) for k in _BOTH if k in given}
    for key in ("finetune", "distill"):
        if both:
            out[key] = {**(out.get(key) or {}), **both}
    if given.pop("no_mi", False):
        out["mi"] = None
    if given.pop("no_sharpness", False):
        out["sharpness"] = None
    out.update(given)
    return out


def run(args: argparse.Namespace) -> int:
    """Run the study and print its table (``run_study`` printed it already with progress on); returns the exit code."""
    cfg = study_config(**options(args))
    result = _runner.run_study(cfg)
    if not cfg.progress:
        print(result.table)
        print("wrote: " + ", ".join(str(p) for p in result.files))
    return 0
