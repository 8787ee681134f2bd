"""Fields of the config's section dataclasses: a choice among values, a bounded number. The
config (cancernet/config.py) reads their metadata when it checks a value."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def choice(default: Any, *options: Any) -> Any:
    return field(default=default, metadata={"choices": options})


def bounded(default: Any, lo: float | None = None, hi: float | None = None, hi_open: bool = False) -> Any:
    """A number in [lo, hi] (or [lo, hi) with hi_open); None stays allowed where the type allows it."""
    return field(default=default, metadata={"range": (lo, hi, hi_open)})
