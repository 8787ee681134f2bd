"""python -m cancernet COMMAND (also the `cancernet` console script). Each group of commands is a
module here with a register(subparsers) function; GROUPS lists them. Config overrides follow one
rule: a `section.key=value` token is an override wherever it stands (cli/options.py)."""

from __future__ import annotations

import argparse
import os
import sys

from cancernet.cli import data, evaluate, slides, tools, train
from cancernet.cli.options import bare_key_hint, merge_aliases, split_overrides
from cancernet.runtime.console import main_guard, setup_logging

GROUPS = (train, data, evaluate, slides, tools)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("cancernet")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cancernet",
        description="cancernet: train, evaluate and apply cancer classifiers on histopathology patches and slides.",
        epilog="`cancernet COMMAND --help` for a command's arguments; `cancernet config` for every config key.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    for action in sub._choices_actions:  # every command: its one-line help as its description, defaults shown
        command = sub.choices[action.dest]
        command.description = command.description or action.help
        command.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else list(argv))
    hint = bare_key_hint(rest)
    if hint:  # `epochs=3`: a config key without its section
        parser.error(hint)
    args = parser.parse_args(rest)
    merge_aliases(parser, args)
    if overrides and not hasattr(args, "overrides"):
        parser.error(f"{args.command} takes no config overrides: {' '.join(overrides)}")
    if hasattr(args, "overrides"):
        args.overrides = overrides
    setup_logging(int(os.environ.get("RANK", 0)))
    return args.func(args)


def entry() -> None:
    """The `cancernet` console script."""
    sys.exit(main_guard(main))
