"""The body of ``timm-remem push``, imported only when the command runs (it needs huggingface_hub, torch, timm)."""

from __future__ import annotations

import argparse
import json
import sys

from huggingface_hub import get_token

from ..errors import ConfigError, HubError, RememError
from ..hub import CONFIG_NAME, TeacherMetadata, check_repo_id, fetch_teacher_files, load_teacher, push_to_hub
from ..hub.errors import TOKEN_HELP

__all__ = ["push", "CLI_TOKEN_HELP"]

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


def push(args: argparse.Namespace) -> int:
    """The body of ``timm-remem push`` (see :func:`timm_remem.cli.push.run`); returns the exit code."""
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
