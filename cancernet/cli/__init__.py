"""python -m cancernet COMMAND (also the `cancernet` console script). Each group of commands is a
module here with a register(subparsers) function; GROUPS lists them. Config overrides follow one
rule: a `section.key=value` token is an override wherever it stands (cli/options.py)."""

from __future__ import annotations

import argparse
import os
import sys

from cancernet.cli import data, evaluate, slides, tools, train
from cancernet.cli.options import split_overrides
from cancernet.runtime.console import main_guard, setup_logging

GROUPS = (train, data, evaluate, slides, tools)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cancernet",
        description="cancernet: train, evaluate and apply cancer classifiers on histopathology patches and slides.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(rest)
    if overrides and not hasattr(args, "overrides"):
        parser.error(f"{args.command} takes no config overrides: {' '.join(overrides)}")
    if hasattr(args, "overrides"):
        args.overrides = overrides
    setup_logging(int(os.environ.get("RANK", 0)))
    return args.func(args)


def entry() -> None:
    """The `cancernet` console script."""
    sys.exit(main_guard(main))
