"""Option groups several commands share, and the one rule for config overrides."""

from __future__ import annotations

import os
import re

# A `section.key=value` token is a config override wherever it stands on the command line.
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


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
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
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
