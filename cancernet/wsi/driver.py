"""The one driver of the slide commands: predict-slide (either kind of checkpoint), evaluate-slides
and extract-features.

A job (what to do with one slide) says how big each slide is and does it. The driver deals the
slides over the ranks by size, largest first, each to the rank with the least work so far; each
rank then works through its own slides without a collective, so a rank with little work never
waits in one (where the process group's timeout would end the job) while another still works.
When a rank is done it writes its rows to a file and waits for the others by polling the output
folder; rank 0 merges every rank's rows into the output's slides table once all are there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from cancernet.runtime.atomic import write_text
from cancernet.runtime.distributed import DistInfo, barrier, broadcast_object, gather_objects
from cancernet.runtime.errors import DataError, UserError
from cancernet.wsi.slide import SLIDE_SUFFIXES

log = logging.getLogger(__name__)
RESULT = "slide.json"  # a predict-slide output folder's last file: its presence marks the slide done
POLL_S = 1.0  # how often a finished rank looks for the others' rows


class SlideJob(Protocol):
    def size(self, path: Path) -> int:
        """The slide's work in tiles (0: done before, or it cannot be read: it fails quickly)."""

    def run(self, path: Path) -> dict:
        """Do the slide; its row of the slides table (slide, path, status: done, skipped or failed)."""


def list_slides(inputs: Iterable[str | Path]) -> list[Path]:
    """Slide files, and the slides of folders (by suffix, sorted); one name (stem) per slide."""
    slides = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file())
            if not found:
                raise DataError(f"no slides ({', '.join(SLIDE_SUFFIXES)}) in {item}")
            slides += found
        elif item.exists():
            slides.append(item)
        else:
            raise DataError(f"slide {item} does not exist")
    names: dict[str, Path] = {}
    for p in slides:
        if p.stem in names and names[p.stem] != p:
            raise DataError(f"slides {names[p.stem]} and {p} share the name {p.stem!r}: their outputs would collide")
        names[p.stem] = p
    return list(names.values())


def done_before(target: Path, settings: dict) -> bool:
    """Whether an output folder holds a complete result (slide.json) made with these settings."""
    try:
        saved = json.loads((target / RESULT).read_text()).get("settings")
    except (OSError, ValueError):
        return False
    if saved == settings:
        return True
    changed = sorted(k for k in settings if saved is None or saved.get(k) != settings[k])
    log.info("slide %s: done before with other settings (%s); doing it again", target.name, ", ".join(changed))
    return False


def deal(sizes: list[int], world_size: int) -> list[list[int]]:
    """Slide indices per rank: largest first, each to the rank with the least work so far (ties
    to the lowest rank); a rank's slides in that order."""
    load, shares = np.zeros(world_size), [[] for _ in range(world_size)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = int(np.argmin(load))
        shares[rank].append(i)
        load[rank] += max(sizes[i], 1)
    return shares


def failed_row(path: Path, error: UserError) -> dict:
    log.error("%s", error)
    return {"slide": path.stem, "path": str(path), "status": "failed", "error": str(error)}


def drive(job: SlideJob, slides: list[Path], out: Path, dist: DistInfo, table: str = "slides.csv") -> list[dict]:
    """Every slide through job, dealt over the ranks by size; rank 0 writes out/table with every
    slide's row and returns them all (the other ranks: their own)."""
    out.mkdir(parents=True, exist_ok=True)
    token = broadcast_object(secrets.token_hex(6), dist)  # names this run's row files (a collective, at the start)
    sizes = [0] * len(slides)
    if dist.is_distributed:  # one rank does every slide: no need to size them
        measured = {i: _size(job, slides[i]) for i in range(dist.rank, len(slides), dist.world_size)}
        for part in gather_objects(measured, dist):
            for i, size in part.items():
                sizes[i] = size
    mine = deal(sizes, dist.world_size)[dist.rank]
    rows = []
    for i in mine:
        try:
            rows.append(job.run(slides[i]))
        except UserError as e:  # a bad slide costs one line; the others are still done
            rows.append(failed_row(slides[i], e))
    every = _merge(rows, out, dist, token) if dist.is_distributed else rows
    if dist.is_main:
        frame = pd.DataFrame(every)
        frame = frame.sort_values("slide") if len(frame) else frame
        write_text(out / table, frame.to_csv(index=False))
    return every


def _size(job: SlideJob, path: Path) -> int:
    try:
        return job.size(path)
    except UserError:
        return 0  # it fails again, quickly, where it is dealt


def _merge(rows: list[dict], out: Path, dist: DistInfo, token: str) -> list[dict]:
    """Every rank's rows on rank 0 (its own elsewhere), exchanged through files in out/.ranks: no
    rank waits in a collective for a rank still working."""
    folder = out / ".ranks"
    folder.mkdir(exist_ok=True)
    write_text(folder / f"{token}.{dist.rank}.json", json.dumps(rows, default=str))
    files = [folder / f"{token}.{r}.json" for r in range(dist.world_size)]
    done = folder / f"{token}.done"
    _wait_for([*files] if dist.is_main else [done], "rows of every rank" if dist.is_main else "rank 0's merge")
    every = rows
    if dist.is_main:
        every = [row for f in files for row in json.loads(f.read_text())]
        write_text(done, "")
    barrier(dist)  # every rank is here already: returns at once
    if dist.is_main:
        for f in [*files, done]:
            f.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()  # unless another run's rows are there too
    return every


def _wait_for(paths: list[Path], what: str) -> None:
    start, said = time.monotonic(), 0.0
    while not all(p.exists() for p in paths):
        waited = time.monotonic() - start
        if waited - said >= 60:
            log.info("waiting for the %s (%.0f min so far)", what, waited / 60)
            said = waited
        time.sleep(POLL_S)
