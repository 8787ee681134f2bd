"""Option groups several commands share, and the one rule for config overrides."""

from __future__ import annotations

import argparse
import os
import re

# A `section.key=value` token is a config override wherever it stands on the command line.
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


# `epochs=3`: a config key's name without its section (an option's value, `--x=y`, starts with -)
BARE_KEY = re.compile(r"^([A-Za-z_]\w*)=")


def bare_key_hint(argv: list[str]) -> str | None:
    """For a token like `epochs=3` that names a config key without its section: the line that says
    which section holds it (a file named `a=b.svs` is not a key, and passes)."""
    from cancernet.config.describe import section_of

    for token in argv:
        m = BARE_KEY.match(token)
        sections = section_of(m.group(1)) if m else []
        if sections:
            value = token.split("=", 1)[1]
            spelled = " or ".join(f"{s}.{m.group(1)}={value}" for s in sections)
            return f"{token}: a config override names its section: {spelled}"
    return None


ALIAS = "_as_option"  # the hidden `--NAME` spelling of a positional argument NAME


def positional(p, name: str, help: str, many: bool = False) -> None:
    """What a command works on (slides, images, a run) is positional; `--NAME VALUE` is accepted
    too, unlisted (earlier versions spelled it so, and DESIGN.md's contract still does)."""
    p.add_argument(name, nargs="*" if many else "?", help=help)
    p.add_argument(f"--{name}", dest=name + ALIAS, nargs="+" if many else None, help=argparse.SUPPRESS)


def merge_aliases(parser, args) -> None:
    """Fold each `--NAME` given into NAME; refuse a command whose NAME is given neither way."""
    for key in [k for k in vars(args) if k.endswith(ALIAS)]:
        name, value = key.removesuffix(ALIAS), getattr(args, key)
        delattr(args, key)
        if value is not None:
            setattr(args, name, [*(getattr(args, name) or []), *value] if isinstance(value, list) else value)
        if not getattr(args, name):
            parser.error(f"{args.command}: give {name.upper()} (see cancernet {args.command} --help)")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the other arguments, the config overrides in their order): the one override rule."""
    overrides = [a for a in argv if OVERRIDE.match(a)]
    return [a for a in argv if not OVERRIDE.match(a)], overrides


def takes_overrides(p, example: str = "train.device=cpu") -> None:
    """The command accepts section.key=value overrides (anywhere on its line)."""
    p.set_defaults(overrides=[])
    p.epilog = f"Config overrides (section.key=value, e.g. {example}) may stand anywhere on the line."


def config_option(p) -> None:
    p.add_argument("--config", required=True, help="a YAML file, or a shipped config's name (base, pcam, demo, ...)")


def device_options(p, workers_help: str = "loader processes") -> None:
    """Where and how a checkpoint runs: batch, workers, device, precision."""
    p.add_argument("--batch-size", type=int, default=256, help="per process")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help=workers_help)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when there is one")
    p.add_argument(
        "--amp",
        choices=["auto", "bf16", "fp16", "off"],
        default="auto",
        help="precision (auto: bf16 where the device computes it natively, as train.amp=auto)",
    )


def tta_option(p, help: str = "average over the 8 dihedral views") -> None:
    p.add_argument("--tta", action="store_true", help=help)


def calibration_option(p) -> None:
    p.add_argument("--no-calibration", action="store_true", help="ignore the checkpoint's fitted temperature")


def slide_mpp_option(p) -> None:
    p.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="level-0 microns per pixel of every slide given: for slides whose metadata lack it (or are wrong)",
    )
