"""PatchCamelyon's official HDF5 release (Veeling et al. 2018): slide-disjoint splits and slide ids.

<root>/camelyonpatch_level_2_split_{train,valid,test}_x.h5[.gz]   dataset 'x': (N, 96, 96, 3) uint8
<root>/camelyonpatch_level_2_split_{train,valid,test}_y.h5[.gz]   dataset 'y': (N, 1, 1, 1) uint8
<root>/camelyonpatch_level_2_split_{train,valid,test}_meta.csv   index, coord_y, coord_x, tumor_patch,
                                                                  center_tumor_patch, wsi

`prepare` streams every split into the packed format (one pack; ids `<split>_<row>`, and a
meta.csv with each id's split and slide), so training reads it through the fast path unchanged.
The .h5 files may be gzip-compressed, as the release is distributed; they are read through a
gzip stream, never decompressed to disk. `PcamRelease` is its Source.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import logging
import struct
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from cancernet.data.config import DataConfig
from cancernet.data.packed import Pack, PackWriter, write_rows
from cancernet.data.patch import PATCH_SHAPE, pixel_hash
from cancernet.data.source import Source
from cancernet.runtime.errors import DataError

log = logging.getLogger(__name__)
RELEASE_SPLITS = {"train": "train", "valid": "val", "test": "test"}  # release name -> ours
META_COLUMNS = ["coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"]


def release_file(root: Path, split: str, part: str) -> Path:
    """The x/y file of a split (.h5 or .h5.gz), or the meta CSV; DataError if it is missing."""
    stem = Path(root) / f"camelyonpatch_level_2_split_{split}_{part}"
    candidates = [stem.with_suffix(".csv")] if part == "meta" else [stem.with_suffix(".h5"), Path(f"{stem}.h5.gz")]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(
        f"PCam release at {root}: {candidates[0].name}{' (or .h5.gz)' if part != 'meta' else ''} "
        "is missing (data.root must hold the release's x/y .h5 files and meta CSVs)"
    )


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def hdf5_size(header: bytes) -> int | None:
    """The file size an HDF5 superblock at offset 0 records (base + end-of-file address), or None."""
    if len(header) < 64 or header[:8] != HDF5_SIGNATURE:
        return None
    version = header[8]
    if version in (0, 1):
        width, first = header[13], 24 if version == 0 else 28
    elif version in (2, 3):
        width, first = header[9], 12
    else:
        return None
    if width not in (2, 4, 8):
        return None
    fmt = {2: "<H", 4: "<I", 8: "<Q"}[width]
    base = struct.unpack_from(fmt, header, first)[0]
    eof = struct.unpack_from(fmt, header, first + 2 * width)[0]
    return base + eof


class SizedGzip(gzip.GzipFile):
    """A gzip stream that answers "seek to the end" without decompressing the whole file.

    HDF5 asks for the file's size twice on open; a plain GzipFile answers by decompressing
    everything (about a minute each for the 7 GB train split). The size comes from the HDF5
    superblock and must agree with gzip's trailer (size mod 2**32); otherwise the plain
    (slow, correct) seek is used. The stream moves to the end only if read there.
    """

    def __init__(self, path: Path):
        super().__init__(path, "rb")
        self.size, self._end = None, None
        with open(path, "rb") as raw:
            raw.seek(-4, io.SEEK_END)
            trailer = struct.unpack("<I", raw.read(4))[0]
        header = self.read(64)
        super().seek(0)
        size = hdf5_size(header)
        if size is not None and size % 2**32 == trailer:
            self.size = size

    def _settle(self) -> None:
        if self._end is not None:
            super().seek(self._end)
            self._end = None

    def seek(self, offset, whence=io.SEEK_SET):
        if whence == io.SEEK_END and self.size is not None:
            self._end = self.size + offset
            return self._end
        if whence == io.SEEK_CUR and self._end is not None:
            offset, whence = self._end + offset, io.SEEK_SET
        self._end = None
        return super().seek(offset, whence)

    def tell(self):
        return self._end if self._end is not None else super().tell()

    def read(self, size=-1):
        self._settle()
        return super().read(size)

    def readinto(self, b):
        self._settle()
        return super().readinto(b)


@contextlib.contextmanager
def open_dataset(path: Path, name: str):
    """The HDF5 dataset `name` of path (read through a gzip stream for .gz), errors naming the file."""
    import h5py

    try:
        with contextlib.ExitStack() as stack:
            source = stack.enter_context(SizedGzip(path)) if path.suffix == ".gz" else path
            handle = stack.enter_context(h5py.File(source, "r"))
            if name not in handle:
                raise DataError(f"{path}: no dataset '{name}' (found {list(handle)})")
            yield handle[name]
    except DataError:
        raise
    except (OSError, EOFError, zlib.error, ValueError, KeyError) as e:
        raise DataError(
            f"{path}: cannot be read as the PCam release's HDF5 ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'truncated'}); a truncated download?"
        ) from None


def read_release_labels(path: Path) -> np.ndarray:
    """The labels of one split's y file (N,), checked to be 0 or 1."""
    with open_dataset(path, "y") as y:
        if y.dtype != np.uint8 or y.ndim != 4 or y.shape[1:] != (1, 1, 1):
            raise DataError(f"{path}: dataset 'y' is {y.dtype} {y.shape}; expected uint8 (N, 1, 1, 1)")
        labels = y[:].reshape(-1).astype(np.int64)
    bad = np.flatnonzero(~np.isin(labels, (0, 1)))
    if len(bad):
        raise DataError(f"{path}: row {bad[0]} has label {labels[bad[0]]}; labels must be 0 or 1")
    return labels


def read_meta(path: Path, n: int) -> pd.DataFrame:
    try:
        meta = pd.read_csv(path, index_col=0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be parsed as CSV ({e})") from None
    missing = [c for c in META_COLUMNS if c not in meta.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected {', '.join(META_COLUMNS)}")
    if len(meta) != n:
        raise DataError(f"{path}: {len(meta)} rows, but the split's x/y files hold {n} patches")
    return meta


def release_fingerprint(root: Path) -> str:
    """sha256 over the release's y files and meta CSVs (small), and the x files' sizes."""
    digest = hashlib.sha256()
    for split in RELEASE_SPLITS:
        for part in ("y", "meta"):
            digest.update(release_file(root, split, part).read_bytes())
        digest.update(str(release_file(root, split, "x").stat().st_size).encode())
    return digest.hexdigest()


def check_release(root: Path) -> dict[str, tuple[np.ndarray, pd.DataFrame]]:
    """{split: (labels, meta)} of a complete, consistent release; DataError naming the bad file."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist (data.format=pcam: the PCam release folder)")
    out = {}
    for split in RELEASE_SPLITS:
        x_path, y_path, meta_path = (release_file(root, split, p) for p in ("x", "y", "meta"))
        labels = read_release_labels(y_path)
        with open_dataset(x_path, "x") as x:
            if x.dtype != np.uint8 or tuple(x.shape[1:]) != PATCH_SHAPE:
                raise DataError(f"{x_path}: dataset 'x' is {x.dtype} {x.shape}; expected uint8 (N, 96, 96, 3)")
            if x.shape[0] != len(labels):
                raise DataError(f"{x_path} holds {x.shape[0]} patches but {y_path.name} {len(labels)} labels")
        out[split] = (labels, read_meta(meta_path, len(labels)))
    return out


def stream_split(x_path: Path, chunk: int = 4096):
    """(first row, block) of one split's x, a chunk at a time: one chunk in memory, whatever the
    split's size, read through a gzip stream for .h5.gz."""
    with open_dataset(Path(x_path), "x") as x:
        for s in range(0, x.shape[0], chunk):
            yield s, np.ascontiguousarray(x[s : s + chunk])


def hash_split(x_path: str, chunk: int = 4096) -> list[str]:
    """The SHA-1 of every patch's pixels of one split (what Kaggle named its patches by)."""
    return [pixel_hash(patch) for _, block in stream_split(Path(x_path), chunk) for patch in block]


def _copy_split(job: tuple[str, str, int, int]) -> list[str]:
    """Stream one split's x into rows [start, start + n) of images.npy; the rows' pixel hashes."""
    x_path, images_file, start, chunk = job
    hashes = []
    for s, block in stream_split(Path(x_path), chunk):
        write_rows(images_file, start + s, block)
        hashes += [pixel_hash(patch) for patch in block]
    return hashes


class PcamRelease(Source):
    """PCam's HDF5 release: always packed; its own slide-disjoint splits and slide ids."""

    name, fixed_splits = "PCam release", True

    def fingerprint(self, root: str) -> tuple[str, str]:
        return f"PCam release {root}", release_fingerprint(Path(root))

    def mtime(self, root: str) -> int:
        return max(release_file(Path(root), s, p).stat().st_mtime_ns for s in RELEASE_SPLITS for p in ("y", "meta"))

    def pack(self, cfg: DataConfig, writer: PackWriter, workers: int, chunk: int = 4096):
        root = Path(cfg.root)
        release = check_release(root)
        ids, labels, meta = [], [], []
        for split, (split_labels, split_meta) in release.items():
            ours = RELEASE_SPLITS[split]
            split_ids = [f"{ours}_{i:06d}" for i in range(len(split_labels))]
            ids += split_ids
            labels.append(split_labels)
            meta.append(
                pd.DataFrame({"id": split_ids, "split": ours, "group": split_meta["wsi"].astype(str).to_numpy()})
            )
        images = writer.allocate(len(ids))
        starts = np.cumsum([0] + [len(release[s][0]) for s in RELEASE_SPLITS])[:-1]
        jobs = [
            (str(release_file(root, s, "x")), str(images), int(start), chunk)
            for s, start in zip(RELEASE_SPLITS, starts)
        ]
        with ProcessPoolExecutor(max(1, min(workers, len(jobs)))) as pool:
            hashes = [h for split_hashes in pool.map(_copy_split, jobs) for h in split_hashes]
        pd.concat(meta).assign(sha1=hashes).to_csv(writer.path / "meta.csv", index=False)
        return (
            ids,
            np.concatenate(labels),
            {
                "source_kind": "pcam",
                "bad_images": {},
                "splits": {RELEASE_SPLITS[s]: int(len(release[s][0])) for s in RELEASE_SPLITS},
            },
        )

    def table(self, cfg: DataConfig, pack: Pack | None) -> pd.DataFrame:
        """id, label, split (the release's), group (slide) of the prepared pack; data.limit takes the
        first rows of every split in proportion to its size."""
        meta = pd.read_csv(pack.path / "meta.csv", dtype={"id": str, "group": str})
        table = meta.assign(label=pack.labels)[["id", "label", "split", "group"]]
        if cfg.limit:
            share = cfg.limit / len(table)
            table = pd.concat(
                [part.head(max(1, round(share * len(part)))) for _, part in table.groupby("split", sort=False)]
            )
        log.info(
            "PCam release splits (not data.val_fraction/test_fraction): %s; %d slides",
            {k: int(v) for k, v in table["split"].value_counts().items()},
            table["group"].nunique(),
        )
        return table.reset_index(drop=True)


SOURCE = PcamRelease()
