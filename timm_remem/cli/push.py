"""``timm-remem push``: publish a saved teacher on the Hugging Face Hub, loadable by plain timm."""

from __future__ import annotations

import argparse
import json
import math
import sys

from huggingface_hub import get_token

from ..errors import ConfigError, HubError, RememError
from ..hub import CONFIG_NAME, TeacherMetadata, check_repo_id, fetch_teacher_files, load_teacher, push_to_hub
from ..hub.errors import TOKEN_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "push",
        help="publish a teacher folder on the Hugging Face Hub (one commit, loadable with timm 'hf-hub:')",
        description="Load a teacher written by timm_remem.save_pretrained (a folder, 'local-dir:DIR' or "
        "'hf-hub:namespace/name'), check it, and upload it to REPO_ID in one commit with a ReMem model card. "
        "Metadata recorded in its config.json is kept unless overridden by the options below. The token comes "
        "from --token, HF_TOKEN or `hf auth login`.",
    )
    p.add_argument("source", help="teacher folder, 'local-dir:DIR' or 'hf-hub:namespace/name[@revision]'")
    p.add_argument("repo_id", help="destination 'namespace/name' on the Hub")
    p.add_argument("--no-merge", dest="merge", action="store_false",
                   help="keep the ReMem factors as separate tensors (loadable with timm_remem.load_teacher only) "
                   "instead of folding them into the weights")
    p.add_argument("--private", action="store_true", help="create the repository private (if it does not exist)")
    p.add_argument("--token", default=None, help="Hugging Face token with the write role")
    p.add_argument("--revision", default=None, help="branch to commit to (default main; created if missing)")
    p.add_argument("--commit-message", default=None, help="commit title")
    p.add_argument("--timeout", type=_seconds("--timeout", strict=True), default=None, metavar="SECONDS",
                   help="seconds without a byte before a Hub request fails (default: TIMM_REMEM_HUB_TIMEOUT or 10)")
    p.add_argument("--retry-budget", type=_seconds("--retry-budget"), default=None, metavar="SECONDS",
                   help="seconds of retries after a first failed request (default: TIMM_REMEM_HUB_RETRY_BUDGET "
                   "or 45)")
    meta = p.add_argument_group("teacher metadata (recorded in config.json and on the model card)")
    meta.add_argument("--base-model", default=None, help="Hub id of the pretrained checkpoint it was tuned from")
    meta.add_argument("--dataset", default=None, help="fine-tuning dataset, e.g. cifar100")
    meta.add_argument("--rho", type=float, default=None, help="SAM radius used for fine-tuning")
    meta.add_argument("--adaptive", default=None, action=argparse.BooleanOptionalAction,
                      help="whether SAM was adaptive (ASAM)")
    meta.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs")
    meta.add_argument("--teacher-accuracy", type=float, default=None, help="teacher top-1 accuracy (%%)")
    meta.add_argument("--student-accuracy", action="append", default=[], metavar="MODEL=ACC",
                      help="top-1 accuracy (%%) of a student distilled from it, e.g. resnet18=78.5 (repeatable)")
    meta.add_argument("--license", default=None, help="license of the weights, e.g. apache-2.0")
    p.set_defaults(func=run)


def _seconds(flag: str, strict: bool = False):
    """An argparse type: a finite number of seconds (> 0 when ``strict``, else >= 0), refused naming ``flag``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
            raise argparse.ArgumentTypeError(f"{flag} expects a number of seconds {'> 0' if strict else '>= 0'}, "
                                             f"got {text!r}")
        return value
    return parse


# The library's advice names the ``token=`` argument; on the command line it is the --token flag.
CLI_TOKEN_HELP = "pass --token TOKEN, set the HF_TOKEN environment variable or run `hf auth login`"


def _students(pairs: list[str]) -> dict[str, float]:
    students = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            students[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ConfigError(f"--student-accuracy expects MODEL=ACCURACY (e.g. resnet18=78.5), got {pair!r}.")
    return students


def _fail(message: str, code: int) -> int:
    print(f"timm-remem push: error: {message.replace(TOKEN_HELP, CLI_TOKEN_HELP)}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    """Load ``args.source``, push it to ``args.repo_id`` and print the commit URL; returns the exit code (2: bad
    input such as a flag, the source or no token; 1: the Hub failed)."""
    try:
        students = _students(args.student_accuracy)
        check_repo_id(args.repo_id)
        limits = {"timeout": args.timeout, "retry_budget": args.retry_budget}
        folder = fetch_teacher_files(args.source, token=args.token, **limits)
        if not (args.token or get_token()):
            raise ConfigError(f"pushing to {args.repo_id!r} needs a Hugging Face token with the write role: "
                              f"{CLI_TOKEN_HELP}.")
        remem = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8")).get("remem") or {}
        known = {name: remem[name] for name in TeacherMetadata.__dataclass_fields__ if remem.get(name) is not None}
        overrides = {
            "base_model": args.base_model, "dataset": args.dataset, "rho": args.rho, "adaptive": args.adaptive,
            "epochs": args.epochs, "teacher_accuracy": args.teacher_accuracy, "license": args.license,
        }
        known.update({k: v for k, v in overrides.items() if v is not None})
        if students:
            known["student_accuracies"] = {**known.get("student_accuracies", {}), **students}
        teacher = load_teacher(folder)
        url = push_to_hub(teacher, args.repo_id, merge=args.merge, private=args.private, token=args.token,
                          revision=args.revision, commit_message=args.commit_message,
                          metadata=TeacherMetadata(**known), **limits)
    except HubError as err:  # the Hub failed: a runtime failure
        return _fail(str(err), 1)
    except RememError as err:  # a bad flag, source folder or metadata
        return _fail(str(err), 2)
    print(url)
    return 0
