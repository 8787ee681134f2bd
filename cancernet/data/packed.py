"""The packed format: every patch of train_labels.csv in one uint8 array file, read by row.

<packed_dir>/images.npy    N x 96 x 96 x 3 uint8 (.npy: self-describing)
<packed_dir>/ids.txt       the N ids, in row order
<packed_dir>/labels.npy    N int64 labels
<packed_dir>/manifest.json count, shape, dtype, sha256 of the source (labels CSV, or the PCam
                           release's y files and meta CSVs), bad images, timings
<packed_dir>/meta.csv      PCam release only: id, split, group (slide) of every row

Rows are read with pread from the one file: all ranks of a node share a single copy in the OS
page cache, and nothing is mapped into a process, so a worker's RSS does not grow with the
dataset (a memory map would count every page it touched).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from ..config import DataConfig
from ..errors import BadImageError, DataError
from .kaggle import PATCH_SHAPE, image_path, labels_csv, read_labels, read_patch

log = logging.getLogger(__name__)
ROW_BYTES = int(np.prod(PATCH_SHAPE))
VERSION = 2


def pack_dir(cfg: DataConfig) -> Path:
    return Path(cfg.packed_dir) if cfg.packed_dir else Path(cfg.root) / "packed"


def npy_layout(path: Path) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a .npy file, from its header."""
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        return shape, dtype, f.tell()


def fingerprint(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def source_fingerprint(root: str, fmt: str) -> tuple[str, str]:
    """(what the pack was made from, its sha256): the labels CSV, or the PCam release's files."""
    if fmt == "pcam":
        from .pcam import release_fingerprint
        return f"PCam release {root}", release_fingerprint(Path(root))
    csv = labels_csv(root)
    return str(csv), fingerprint(csv)


def _source_mtime(cfg: DataConfig) -> int:
    if cfg.format == "pcam":
        from .pcam import release_file
        return max(release_file(Path(cfg.root), s, p).stat().st_mtime_ns for s in ("train", "valid", "test")
                   for p in ("y", "meta"))
    return labels_csv(cfg.root).stat().st_mtime_ns


@dataclass
class Pack:
    """An opened, verified pack."""

    path: Path
    ids: list[str]
    labels: np.ndarray
    bad_images: dict[str, str]
    offset: int  # byte offset of row 0 in images.npy

    @cached_property
    def row_of(self) -> dict[str, int]:
        return {image_id: row for row, image_id in enumerate(self.ids)}

    def read_rows(self, rows: np.ndarray, fd: int) -> np.ndarray:
        """(len(rows), 96, 96, 3) uint8; rows read in file order for locality."""
        out = np.empty((len(rows), *PATCH_SHAPE), np.uint8)
        order = np.argsort(rows, kind="stable")
        flat = out.reshape(len(rows), ROW_BYTES)
        for i in order:
            n = os.preadv(fd, [flat[i]], self.offset + int(rows[i]) * ROW_BYTES)
            if n != ROW_BYTES:
                raise DataError(f"{self.path / 'images.npy'} is truncated at row {rows[i]}; re-run prepare")
        return out

    def read_by_id(self, image_id: str) -> np.ndarray:
        fd = os.open(self.path / "images.npy", os.O_RDONLY)
        try:
            return self.read_rows(np.array([self.row_of[image_id]]), fd)[0]
        finally:
            os.close(fd)


def open_pack(cfg: DataConfig) -> Pack:
    """Open the pack for data.root, refusing one that is missing, partial or out of date."""
    path = pack_dir(cfg)
    manifest_path = path / "manifest.json"
    hint = "run `python -m cancernet prepare --config CFG` (same data.root/data.packed_dir)"
    if not manifest_path.is_file():
        raise DataError(f"no complete pack at {path} (data.format={cfg.format}): {hint}")
    return _open(path, str(cfg.root), "pcam" if cfg.format == "pcam" else "folder",
                 manifest_path.stat().st_mtime_ns, _source_mtime(cfg), hint)


@functools.lru_cache(maxsize=4)  # opened by several loaders; re-checked when either side changes
def _open(path: Path, root: str, fmt: str, manifest_mtime: int, source_mtime: int, hint: str) -> Pack:
    manifest = json.loads((path / "manifest.json").read_text())
    source, digest = source_fingerprint(root, fmt)
    if manifest.get("version") != VERSION or manifest.get("source_sha256") != digest:
        raise DataError(f"pack {path} was made from a different {source} (or an older cancernet); "
                        f"re-run prepare: {hint}")
    ids = (path / "ids.txt").read_text().split()
    labels = np.load(path / "labels.npy")
    shape, dtype, offset = npy_layout(path / "images.npy")
    if len(ids) != manifest["count"] or tuple(shape) != (manifest["count"], *PATCH_SHAPE) or dtype != np.uint8:
        raise DataError(f"pack {path} does not match its manifest; re-run prepare: {hint}")
    return Pack(path, ids, labels, manifest["bad_images"], offset)


class PackedDataset(Dataset):
    """Whole uint8 batches from the pack: dataset[list of indices] -> (images NCHW, labels, indices).

    Used with a BatchSampler as the loader's sampler (batch_size=None), so one call reads a batch.
    """

    def __init__(self, cfg: DataConfig, ids: list[str], labels: np.ndarray):
        self.pack = open_pack(cfg)
        self.rows = np.array([self.pack.row_of[i] for i in ids], dtype=np.int64)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self._fd = None  # opened lazily in each worker process

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, indices):
        if self._fd is None:
            self._fd = os.open(self.pack.path / "images.npy", os.O_RDONLY)
        indices = torch.as_tensor(indices, dtype=torch.int64)
        images = torch.from_numpy(self.pack.read_rows(self.rows[indices.numpy()], self._fd))
        return images.permute(0, 3, 1, 2), self.labels[indices], indices

    def __getstate__(self):
        return {**self.__dict__, "_fd": None}  # file descriptors do not cross processes


def _pack_chunk(job: tuple[str, str, list[str], int]) -> dict[str, str]:
    """Decode ids into rows [start, start+len) of images.npy; return {id: reason} of bad ones."""
    root, images_file, ids, start = job
    array = np.load(images_file, mmap_mode="r+")
    bad = {}
    for i, image_id in enumerate(ids):
        try:
            array[start + i] = read_patch(image_path(root, image_id))
        except BadImageError as e:
            bad[image_id] = e.reason
    array.flush()
    return bad


def prepare(cfg: DataConfig, workers: int, chunk: int = 2048) -> Path:
    """Pack every labelled image of data.root (or the PCam release there) into a temp folder,
    renamed when complete."""
    start_time = time.perf_counter()
    final = pack_dir(cfg)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a crashed earlier run restarts cleanly
    partial.mkdir(parents=True)
    try:
        if cfg.format == "pcam":
            from .pcam import pack_release
            fields = pack_release(cfg, partial, workers)
        else:
            fields = _pack_folder(cfg, partial, workers, chunk)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    source, digest = source_fingerprint(str(cfg.root), cfg.format)
    manifest = {"version": VERSION, "shape": list(PATCH_SHAPE), "dtype": "uint8", "source": source,
                "source_sha256": digest, **fields, "seconds": round(time.perf_counter() - start_time, 1),
                "workers": workers}
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=1))  # last: marks it complete
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    log.info("packed %d images (%d bad, skipped) into %s in %.1fs", manifest["count"], len(manifest["bad_images"]),
             final, manifest["seconds"])
    return final


def _pack_folder(cfg: DataConfig, partial: Path, workers: int, chunk: int) -> dict:
    frame = read_labels(cfg.root)  # the whole CSV: data.limit applies when reading the pack
    images = partial / "images.npy"
    np.lib.format.open_memmap(images, mode="w+", dtype=np.uint8, shape=(len(frame), *PATCH_SHAPE)).flush()
    ids = frame["id"].tolist()
    jobs = [(str(cfg.root), str(images), ids[s:s + chunk], s) for s in range(0, len(ids), chunk)]
    bad: dict[str, str] = {}
    with ProcessPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(ids), desc="prepare", unit="img", disable=None) as bar:
        for job, result in zip(jobs, pool.map(_pack_chunk, jobs)):
            bad.update(result)
            bar.update(len(job[2]))
    if bad and cfg.on_bad_image == "fail":
        first = next(iter(bad))
        raise DataError(f"bad image {image_path(cfg.root, first)}: {bad[first]} ({len(bad)} bad image(s); "
                        "nothing was packed; data.on_bad_image=skip packs the rest and lists them)")
    np.save(partial / "labels.npy", frame["label"].to_numpy())
    (partial / "ids.txt").write_text("\n".join(ids) + "\n")
    return {"count": len(ids), "bad_images": bad}
