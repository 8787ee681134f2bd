"""Logging setup, progress bars and the one-line error exit shared by every entry point."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from cancernet.runtime.errors import UserError


def setup_logging(rank: int = 0) -> None:
    """Rank 0 logs at INFO, other ranks at WARNING, each line tagged with its rank."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        force=True,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )


def main_guard(main: Callable[[], int]) -> int:
    """Run main; a UserError becomes 'error: <message>' on stderr and exit code 2."""
    try:
        return main()
    except KeyboardInterrupt:  # a second Ctrl-C (the first stops at a checkpoint), or one before training
        print("interrupted: stopped at once; a resume continues from the last checkpoint", file=sys.stderr, flush=True)
        return 130
    except UserError as e:
        rank = os.environ.get("RANK", "0")
        # an error re-raised from a loader worker carries its traceback: keep the last line
        message = str(e).strip().splitlines()[-1].split("Error: ", 1)[-1] if "\n" in str(e) else str(e)
        print(f"error{'' if rank == '0' else f' (rank {rank})'}: {message}", file=sys.stderr, flush=True)
        return 2


def progress_bar(mode: str, here: bool, total: int, desc: str):
    """tqdm where `here` (rank 0) and mode (train.progress) says: auto = when stderr is a terminal
    (not in Slurm logs)."""
    from tqdm import tqdm

    show = {"on": True, "off": False, "auto": sys.stderr.isatty()}[mode]
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True) if show and here else None
