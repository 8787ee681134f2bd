"""data.format, registered in one place: which source a format reads, and whether from its own
files or from the pack `prepare` made of it.

A new source is one module with a Source (data/source.py) plus one line in FORMATS.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cancernet.data import kaggle, pcam
from cancernet.data.config import DataConfig
from cancernet.data.packed import Pack, PackWriter, open_pack, stage
from cancernet.data.source import Source
from cancernet.runtime.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Format:
    source: Source
    packed: bool  # read from the pack (python -m cancernet prepare), else from the source's files


FORMATS: dict[str, Format] = {
    "folder": Format(kaggle.SOURCE, packed=False),
    "packed": Format(kaggle.SOURCE, packed=True),
    "pcam": Format(pcam.SOURCE, packed=True),
}


def check_format(name: str, key: str = "data.format") -> str:
    if name not in FORMATS:
        close = difflib.get_close_matches(name, FORMATS, n=2)
        raise ConfigError(
            f"config key '{key}': {name!r} is not a data format (known: {', '.join(FORMATS)})"
            + (f"; did you mean {close[0]}?" if close else "")
        )
    return name


def format_of(cfg: DataConfig) -> Format:
    return FORMATS[check_format(cfg.format)]


def pack_dir(cfg: DataConfig) -> Path:
    return Path(cfg.packed_dir) if cfg.packed_dir else Path(cfg.root) / "packed"


def _hint(cfg: DataConfig) -> str:
    keys = [f"data.root={cfg.root}"] + [f"data.format={cfg.format}"] * (cfg.format != "folder")
    keys += [f"data.packed_dir={cfg.packed_dir}"] * bool(cfg.packed_dir)
    return f"run `python -m cancernet prepare {' '.join(keys)}`"


def open_source_pack(cfg: DataConfig) -> Pack:
    """The pack of data.root, refused when missing, partial or made from other data; read from
    its copy in data.stage_dir when that is set (copied there first, once per node)."""
    source, path = format_of(cfg).source, pack_dir(cfg)
    manifest = path / "manifest.json"
    mtime = manifest.stat().st_mtime_ns if manifest.is_file() else 0
    source_mtime = source.mtime(str(cfg.root)) if mtime else 0
    staged = os.path.expandvars(cfg.stage_dir) if cfg.stage_dir else None
    return _open(path, cfg.format, str(cfg.root), mtime, source_mtime, _hint(cfg), staged)


@functools.lru_cache(maxsize=4)  # opened by several loaders; re-checked when either side changes
def _open(path: Path, fmt: str, root: str, manifest_mtime: int, source_mtime: int, hint: str, staged: str | None):
    if not manifest_mtime:
        return open_pack(path, "", "", hint)  # raises: no complete pack
    pack = open_pack(path, *FORMATS[fmt].source.fingerprint(root), hint)
    return dataclasses.replace(pack, path=stage(pack, Path(staged))) if staged else pack


def prepare(cfg: DataConfig, workers: int) -> Path:
    """Pack every labelled patch of data.root's source (whatever data.limit says) into pack_dir."""
    start = time.perf_counter()
    source = format_of(cfg).source
    with PackWriter(pack_dir(cfg)) as writer:
        ids, labels, fields = source.pack(cfg, writer, workers)
        what, digest = source.fingerprint(str(cfg.root))
        final = writer.finish(
            ids,
            labels,
            {
                "source": what,
                "source_sha256": digest,
                **fields,
                "seconds": round(time.perf_counter() - start, 1),
                "workers": workers,
            },
        )
    log.info(
        "packed %d images (%d bad, skipped) into %s in %.1fs",
        len(ids),
        len(fields["bad_images"]),
        final,
        time.perf_counter() - start,
    )
    return final


def reader(cfg: DataConfig) -> Callable[[str], np.ndarray]:
    """id -> (96, 96, 3) uint8 patch, from the pack or the source's files."""
    fmt = format_of(cfg)
    if fmt.packed:
        return open_source_pack(cfg).read_by_id
    return functools.partial(fmt.source.read, cfg)
