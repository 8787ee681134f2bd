"""The packed container: N patches in one uint8 array file, read by row. It knows no source:
what fills it (a Kaggle folder, a PCam release) is each source's packer (data/formats.py).

<pack>/images.npy    N x 96 x 96 x 3 uint8 (.npy: self-describing)
<pack>/ids.txt       the N ids, in row order
<pack>/labels.npy    N int64 labels
<pack>/manifest.json count, shape, dtype, what the pack was made from and its sha256, bad
                     images, timings (written last: it marks the pack complete)
<pack>/...           files a source adds (PCam: meta.csv with each id's split and slide)

Rows are read with pread from the one file: all ranks of a node share a single copy in the OS
page cache, and nothing is mapped into a process, so a worker's RSS does not grow with the
dataset (a memory map would count every page it touched). Rows are written with pwrite, for
the same reason (the written pages of a map count as the writer's memory).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from cancernet.data.patch import PATCH_SHAPE
from cancernet.runtime.atomic import partial_dir, publish
from cancernet.runtime.errors import DataError

ROW_BYTES = int(np.prod(PATCH_SHAPE))
VERSION = 2
log = logging.getLogger(__name__)


def npy_layout(path: Path) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a .npy file, from its header."""
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        return shape, dtype, f.tell()


class Rows:
    """Rows of one .npy file read by index with pread, the ids in row order: the pack's patches
    here, the frozen backbone's features in data/stored.py. A subclass sets FILE (in its folder
    `path`), DTYPE, row_shape, REDO (what fixes a truncated file), and has path, ids, offset."""

    FILE: str
    DTYPE: type
    REDO: str
    path: Path
    ids: list[str]
    offset: int  # byte offset of row 0 in the file

    @property
    def row_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @cached_property
    def row_of(self) -> dict[str, int]:
        return {image_id: row for row, image_id in enumerate(self.ids)}

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape)) * np.dtype(self.DTYPE).itemsize

    def read_rows(self, rows: np.ndarray, fd: int) -> np.ndarray:
        """(len(rows), *row_shape), read in file order for locality; fd: the file opened O_RDONLY."""
        out = np.empty((len(rows), *self.row_shape), self.DTYPE)
        flat, size = out.reshape(len(rows), -1).view(np.uint8), self.row_bytes
        for i in np.argsort(rows, kind="stable"):
            if os.preadv(fd, [flat[i]], self.offset + int(rows[i]) * size) != size:
                raise DataError(f"{self.path / self.FILE} is truncated at row {rows[i]}; {self.REDO}")
        return out

    def read_by_id(self, image_id: str) -> np.ndarray:
        fd = os.open(self.path / self.FILE, os.O_RDONLY)
        try:
            return self.read_rows(np.array([self.row_of[image_id]]), fd)[0]
        finally:
            os.close(fd)


@dataclass
class Pack(Rows):
    """An opened, verified pack."""

    FILE, DTYPE, REDO = "images.npy", np.uint8, "re-run prepare"
    path: Path
    ids: list[str]
    labels: np.ndarray
    bad_images: dict[str, str]
    offset: int

    @property
    def row_shape(self) -> tuple[int, ...]:
        return PATCH_SHAPE


def open_pack(path: Path, source: str, digest: str, hint: str) -> Pack:
    """The pack at path, refused unless it is complete, of this version, and made from `source`
    whose sha256 is `digest` now."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"no complete pack at {path}: {hint}")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("version") != VERSION or manifest.get("source_sha256") != digest:
        raise DataError(
            f"pack {path} was made from a different {source} (or an older cancernet); re-run prepare: {hint}"
        )
    ids = (path / "ids.txt").read_text().split()
    labels = np.load(path / "labels.npy")
    shape, dtype, offset = npy_layout(path / "images.npy")
    if len(ids) != manifest["count"] or tuple(shape) != (manifest["count"], *PATCH_SHAPE) or dtype != np.uint8:
        raise DataError(f"pack {path} does not match its manifest; re-run prepare: {hint}")
    return Pack(path, ids, labels, manifest["bad_images"], offset)


def stage(pack: Pack, stage_dir: Path) -> Path:
    """A copy of the pack in stage_dir (node-local storage), made once per node: the first process
    to take the lock copies (into a temporary folder, renamed when whole); the others wait for it
    and reuse it, as do later runs while the pack's manifest is unchanged. Returns its path, or the
    pack's own when stage_dir lacks the room (one line says so: staging only makes reads faster)."""
    manifest = (pack.path / "manifest.json").read_bytes()
    key = json.loads(manifest)["source_sha256"][:16]
    staged = Path(stage_dir) / f"cancernet-pack-{key}"
    Path(stage_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(stage_dir) / f"cancernet-pack-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the node's other processes wait here while one copies
        if _is_copy(staged, pack.path, manifest):
            return staged
        start = time.perf_counter()
        shutil.rmtree(staged, ignore_errors=True)
        need = sum(f.stat().st_size for f in pack.path.iterdir() if f.is_file())
        free = shutil.disk_usage(stage_dir).free
        if need > free:
            log.warning(
                "data.stage_dir=%s: the pack needs %.1f GiB, %.1f GiB are free: reading it from %s instead",
                stage_dir,
                need / 2**30,
                free / 2**30,
                pack.path,
            )
            return pack.path
        partial = partial_dir(staged)
        for f in sorted(pack.path.iterdir(), key=lambda f: f.name == "manifest.json"):  # the manifest last
            if f.is_file():
                shutil.copyfile(f, partial / f.name)
        if not _is_copy(partial, pack.path, manifest):
            raise DataError(f"data.stage_dir={stage_dir}: the copy of {pack.path} differs from it (disk full?)")
        publish(partial, staged)
        log.info("staged the pack (%.1f GiB) in %s in %.1f s", need / 2**30, staged, time.perf_counter() - start)
        return staged


def _is_copy(copy: Path, original: Path, manifest: bytes) -> bool:
    """copy holds original's files at their sizes, with the same manifest (the pack's identity)."""
    if not (copy / "manifest.json").is_file() or (copy / "manifest.json").read_bytes() != manifest:
        return False
    sizes = {f.name: f.stat().st_size for f in original.iterdir() if f.is_file()}
    return all((copy / name).is_file() and (copy / name).stat().st_size == size for name, size in sizes.items())


def write_rows(images_file: str | Path, start: int, block: np.ndarray) -> None:
    """pwrite rows [start, start + len(block)) of images.npy (from any process)."""
    _, _, offset = npy_layout(Path(images_file))
    block = np.ascontiguousarray(block, dtype=np.uint8)
    fd = os.open(images_file, os.O_WRONLY)
    try:
        if os.pwrite(fd, block.data, offset + start * ROW_BYTES) != block.nbytes:
            raise DataError(f"{images_file}: short write (disk full?)")
    finally:
        os.close(fd)


class PackWriter:
    """Builds a pack in <pack>.partial/ and renames it over <pack> when complete, so a half-written
    pack is never used; a crashed earlier attempt is cleared first. A context manager: on an
    error the partial folder is removed."""

    def __init__(self, final: Path):
        self.final, self.path = Path(final), None

    def __enter__(self) -> PackWriter:
        self.path = partial_dir(self.final)
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None:
            shutil.rmtree(self.path, ignore_errors=True)

    @property
    def images(self) -> Path:
        return self.path / "images.npy"

    def allocate(self, count: int) -> Path:
        """Create images.npy for count rows (sparse until written); returns its path."""
        np.lib.format.open_memmap(self.images, mode="w+", dtype=np.uint8, shape=(count, *PATCH_SHAPE)).flush()
        return self.images

    def finish(self, ids: list[str], labels: np.ndarray, manifest: dict) -> Path:
        """Write ids, labels and the manifest (last: it marks the pack complete), then rename."""
        np.save(self.path / "labels.npy", np.asarray(labels, dtype=np.int64))
        (self.path / "ids.txt").write_text("\n".join(ids) + "\n")
        manifest = {"version": VERSION, "shape": list(PATCH_SHAPE), "dtype": "uint8", "count": len(ids), **manifest}
        (self.path / "manifest.json").write_text(json.dumps(manifest, indent=1))
        publish(self.path, self.final)
        return self.final
