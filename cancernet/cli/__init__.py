"""python -m cancernet COMMAND (also the `cancernet` console script). Each group of commands is a
module here with a register(subparsers) function; GROUPS lists them. Config overrides follow one
rule: a `section.key=value` token is an override wherever it stands (cli/options.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from cancernet.cli import data, evaluate, slides, tools, train
from cancernet.cli.options import bare_key_hint, merge_aliases, split_overrides, takes_overrides
from cancernet.runtime.console import main_guard, setup_logging

GROUPS = (train, data, evaluate, slides, tools)
log = logging.getLogger("cancernet")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("cancernet")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def cmd_demo(args) -> int:
    """What `make demo` runs: synthetic patches and slides (made once), a CPU training run of
    configs/demo.yaml, the trained model over the slides; then the lines naming what to open."""
    patches, slides, out = Path(args.data_dir), Path(args.slides_dir), Path(args.out)
    if not (patches / "train_labels.csv").is_file():
        main(["synth", str(patches), "--n-train", "3000", "--n-test", "200", "--seed", "0"])
    if not (slides / "slides.csv").is_file():
        main(["synth-slides", str(slides), "--n", "2", "--rows", "36", "--cols", "48", "--seed", "0"])
    main(["train", "--config", "demo", f"data.root={patches}", f"train.out_dir={out}", *args.overrides])
    if not (out / "report" / "metrics.json").is_file():
        log.warning("the demo's training stopped before its report; the same command continues it")
        return 0
    best = out / "checkpoints" / "best.pt"
    code = main(
        ["evaluate-slides", str(slides / "slides"), "--checkpoint", str(best), "--labels", str(slides / "slides.csv")]
        + ["--masks", str(slides / "masks"), "--mask-downsample", "16", "--out", str(out / "slides")]
    )
    log.info("demo done: open %s (the patch report) and %s (the slides)", out / "report" / "index.html", out / "slides")
    return code


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the CPU demo (what `make demo` runs): synthetic data, a short training run, its report, two slides",
    )
    p.add_argument("--data-dir", default="data/synthetic", help="the synthetic patches (written when missing)")
    p.add_argument("--slides-dir", default="data/synthetic_slides", help="the synthetic slides (written when missing)")
    p.add_argument("--out", default="runs/demo", help="the run directory")
    takes_overrides(p, "train.epochs=1")
    p.set_defaults(func=cmd_demo)


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
    _add_demo(sub)
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
