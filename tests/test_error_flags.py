"""Every command-line flag the package tells users about exists.

Messages recommend flags ("Resume with gradient clipping (--resume --clip-grad 1.0)", "choose another --output"); one
recommended ``--val-fraction 0.2``, which no command accepted. This test reads every string literal of
``timm_remem/**/*.py`` with ``ast`` (error messages, help texts, f-string parts and docstrings alike), collects the
``--flag`` tokens and checks that each one is an option of at least one ``timm-remem`` command, with the parsers built
exactly as the command line builds them (``timm_remem.cli.build_parser``). Flags of other programs quoted on purpose
are listed in ``OTHER_PROGRAMS`` with the reason; an entry that is no longer quoted anywhere fails the test too, so the
list cannot rot.
"""

from __future__ import annotations

import argparse
import ast
import re
from collections import defaultdict
from pathlib import Path

import timm_remem
from timm_remem.cli import build_parser

PACKAGE = Path(timm_remem.__file__).resolve().parent
# A flag: two dashes, then lower-case letters, digits, dashes (and underscores, so torchrun's --nproc_per_node is read
# whole). Not preceded by a word character or a dash, so "a--b" and "---" are not flags.
FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9_-]*")

# Flags of other programs (or placeholders), quoted on purpose, with the reason.
OTHER_PROGRAMS = {
    "--nproc_per_node": "torchrun's option (timm_remem.distributed, the training commands, resume's world-size error)",
    "--max-restarts": "torchrun's option, quoted by the help and docs of --resume auto",
    "--opt-kwargs": "timm's train.py option, quoted by timm_remem.sam.registry (rho through timm's own script)",
    "--no-x": "a placeholder in cli/_config_flags.py's docstring: the --no-<field> form of a boolean field",
}


def flags_in_source(source: str, origin: str) -> dict[str, set[str]]:
    """``{flag: {"origin:line", ...}}`` for every flag token in the string literals of ``source``.

    A token ending in ``-`` is a prefix the code completes (``"--no-" + name``), not a flag, and is skipped.
    """
    found: dict[str, set[str]] = defaultdict(set)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            for token in FLAG.findall(node.value):
                if not token.endswith("-"):
                    found[token].add(f"{origin}:{node.lineno}")
    return found


def package_flags() -> dict[str, set[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for path in sorted(PACKAGE.rglob("*.py")):
        for token, where in flags_in_source(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE))).items():
            found[token] |= where
    return found


def command_flags() -> dict[str, set[str]]:
    """``{flag: {command, ...}}`` over ``timm-remem`` itself and every sub-command."""
    parser = build_parser()
    accepted: dict[str, set[str]] = defaultdict(set)
    for flag in parser._option_string_actions:
        accepted[flag].add("timm-remem")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for flag in sub._option_string_actions:
                    accepted[flag].add(name)
    return accepted


def test_every_flag_a_message_recommends_exists():
    accepted = command_flags()
    unknown = {flag: sorted(where) for flag, where in package_flags().items()
               if flag not in accepted and flag not in OTHER_PROGRAMS}
    assert not unknown, (
        "these flags are named in timm_remem's strings but no timm-remem command accepts them (fix the text, or add "
        f"the flag to OTHER_PROGRAMS with the reason if it belongs to another program): {unknown}"
    )


def test_every_allow_listed_flag_is_still_quoted_and_is_not_ours():
    found, accepted = package_flags(), command_flags()
    assert not [flag for flag in OTHER_PROGRAMS if flag not in found], "OTHER_PROGRAMS lists flags quoted nowhere"
    assert not [flag for flag in OTHER_PROGRAMS if flag in accepted], "OTHER_PROGRAMS lists a timm-remem flag"


def test_the_scan_sees_the_flags_of_real_messages():
    """The scan is not vacuous: it finds flags in error messages, f-strings included, and all of them are known."""
    found, accepted = package_flags(), command_flags()
    for flag in ("--clip-grad", "--resume", "--output", "--num-classes", "--help", "--debug", "--version"):
        assert flag in accepted, flag
    for flag in ("--clip-grad", "--resume", "--output", "--num-classes"):
        assert flag in found, flag
    assert len(found) >= 20


def test_the_scan_would_have_caught_the_val_fraction_advice():
    source = 'raise ConfigError(f"{root!r} has no validation folder, or use val_fraction=0.2 (--val-fraction 0.2)")'
    found = flags_in_source(source, "example.py")
    assert set(found) == {"--val-fraction"} and "--val-fraction" not in command_flags()
    assert "--no-" not in flags_in_source('flag = "--no-" + name', "example.py")  # a prefix, not a flag
