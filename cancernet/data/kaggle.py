"""The Kaggle folder layout: train_labels.csv (id,label) and train/<id>.tif patches; its Source."""

from __future__ import annotations

import hashlib
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cancernet.data.config import DataConfig
from cancernet.data.packed import Pack, PackWriter, write_rows
from cancernet.data.patch import PATCH_SHAPE, pixel_hash, read_patch
from cancernet.data.source import Source
from cancernet.runtime.errors import BadImageError, DataError
from cancernet.runtime.signals import ignore_stop_signals


def labels_csv(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist (it must hold train_labels.csv and train/)")
    path = root / "train_labels.csv"
    if not path.is_file():
        raise DataError(f"{path} not found: data.root must hold train_labels.csv and train/")
    return path


def read_labels(root: str | Path, limit: int | None = None) -> pd.DataFrame:
    """The labels table (id: str, label: int), checked: no missing/duplicate ids, labels in {0,1}."""
    path = labels_csv(root)
    try:
        frame = pd.read_csv(path, dtype={"id": str}, keep_default_na=False, na_values={"label": [""]})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be parsed as CSV ({e})") from None
    missing_cols = {"id", "label"} - set(frame.columns)
    if missing_cols:
        raise DataError(f"{path}: missing column(s) {sorted(missing_cols)}; expected 'id,label'")
    blank = frame.index[frame["id"].str.strip() == ""]
    if len(blank):
        raise DataError(f"{path}: row {blank[0] + 2} has an empty id")
    check_ids(frame["id"], path, first_row=2)
    dup = frame["id"][frame["id"].duplicated()]
    if len(dup):
        raise DataError(f"{path}: duplicate id {dup.iloc[0]!r} ({len(dup)} duplicate rows)")
    labels = pd.to_numeric(frame["label"], errors="coerce")
    bad = frame.index[~labels.isin([0, 1])]
    if len(bad):
        row = frame.loc[bad[0]]
        raise DataError(f"{path}: id {row['id']!r} has label {row['label']!r}; labels must be 0 or 1")
    frame = frame.assign(label=labels.astype(np.int64))[["id", "label"]]
    return frame.head(limit).reset_index(drop=True) if limit else frame


def check_ids(ids: pd.Series, source: str | Path, first_row: int = 2) -> None:
    """Ids name files inside the data folder: a path separator, '.', '..' or a NUL byte is refused."""
    bad = ids.str.contains(r"[/\\\x00]", regex=True) | ids.isin([".", ".."]) | (ids != ids.str.strip())
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{source}: row {row + first_row} has id {ids.iloc[row]!r}; an id must be a plain file "
            "name (no path separators, no '.' or '..', no surrounding spaces)"
        )


def image_path(root: str | Path, image_id: str, folder: str = "train") -> Path:
    return Path(root) / folder / f"{image_id}.tif"


HASH_ID = re.compile(r"[0-9a-f]{40}")


def verifies_ids(mode: str, ids: list[str]) -> bool:
    """data.verify_ids: whether each patch's pixels must hash to its id (auto: when every id is a
    40-hex-digit SHA-1, as Kaggle's are); `on` with other ids names the first."""
    if mode == "off":
        return False
    odd = next((i for i in ids if not HASH_ID.fullmatch(i)), None)
    if odd is not None and mode == "on":
        raise DataError(f"data.verify_ids=on, but id {odd!r} is not a SHA-1 (40 hex digits) of its pixels")
    return odd is None


def check_patch(path: Path, image_id: str | None = None) -> np.ndarray:
    """read_patch, and with image_id: its pixels' SHA-1 must be the id (an altered or misnamed file)."""
    patch = read_patch(path)
    if image_id is not None and pixel_hash(patch) != image_id:
        raise BadImageError(path, f"its pixels do not hash to its id (SHA-1 {pixel_hash(patch)}): altered or misnamed")
    return patch


def _check_one(job: tuple[Path, str | None]) -> str | None:
    try:
        check_patch(*job)
    except BadImageError as e:
        return e.reason
    return None


def find_bad_images(root: str | Path, ids: list[str], workers: int = 0, verify: bool = False) -> dict[str, str]:
    """{id: reason} for every listed image that is missing, unusable or (verify) not its id's
    pixels; decodes all, in parallel."""
    jobs = [(image_path(root, i), i if verify else None) for i in ids]
    if workers > 1 and len(jobs) > 2000:
        with ProcessPoolExecutor(workers, initializer=ignore_stop_signals) as pool:
            reasons = list(pool.map(_check_one, jobs, chunksize=512))
    else:
        reasons = [_check_one(job) for job in jobs]
    return {i: r for i, r in zip(ids, reasons) if r is not None}


def _pack_chunk(job: tuple[str, str, list[str], int, bool]) -> dict[str, str]:
    """Decode ids into rows [start, start+len) of images.npy; return {id: reason} of bad ones."""
    root, images_file, ids, start, verify = job
    block = np.zeros((len(ids), *PATCH_SHAPE), np.uint8)
    bad = {}
    for i, image_id in enumerate(ids):
        try:
            block[i] = check_patch(image_path(root, image_id), image_id if verify else None)
        except BadImageError as e:
            bad[image_id] = e.reason
    write_rows(images_file, start, block)
    return bad


class KaggleFolder(Source):
    """train_labels.csv + train/<id>.tif: read file by file, or packed."""

    name, reads_files = "Kaggle folder", True

    def fingerprint(self, root: str) -> tuple[str, str]:
        csv = labels_csv(root)
        return str(csv), hashlib.sha256(csv.read_bytes()).hexdigest()

    def mtime(self, root: str) -> int:
        return labels_csv(root).stat().st_mtime_ns

    def table(self, cfg: DataConfig, pack: Pack | None) -> pd.DataFrame:
        return read_labels(cfg.root, cfg.limit)

    def image_path(self, cfg: DataConfig, image_id: str) -> Path:
        return image_path(cfg.root, image_id)

    def find_bad(self, cfg: DataConfig, ids: list[str], workers: int) -> dict[str, str]:
        return find_bad_images(cfg.root, ids, workers, verifies_ids(cfg.verify_ids, ids))

    def known_hashes(self, cfg: DataConfig, ids: list[str]) -> tuple[pd.Series, str] | None:
        if verifies_ids(cfg.verify_ids, ids):
            return pd.Series(ids, index=ids), "the ids (verified SHA-1s of the pixels)"
        return None

    def pack(self, cfg: DataConfig, writer: PackWriter, workers: int):
        frame = read_labels(cfg.root)  # the whole CSV: data.limit applies when reading the pack
        images = writer.allocate(len(frame))
        ids = frame["id"].tolist()
        chunk = max(1, min(2048, -(-len(ids) // (4 * max(1, workers)))))  # several per worker, at most 2048
        verify = verifies_ids(cfg.verify_ids, ids)
        jobs = [(str(cfg.root), str(images), ids[s : s + chunk], s, verify) for s in range(0, len(ids), chunk)]
        bad: dict[str, str] = {}
        with (
            ProcessPoolExecutor(max(1, workers)) as pool,
            tqdm(total=len(ids), desc="prepare", unit="img", disable=None) as bar,
        ):
            for job, result in zip(jobs, pool.map(_pack_chunk, jobs)):
                bad.update(result)
                bar.update(len(job[2]))
        if bad and cfg.on_bad_image == "fail":
            first = next(iter(bad))
            raise DataError(
                f"bad image {image_path(cfg.root, first)}: {bad[first]} ({len(bad)} bad image(s); "
                "nothing was packed; data.on_bad_image=skip packs the rest and lists them)"
            )
        return ids, frame["label"].to_numpy(), {"bad_images": bad, "ids_verified": verify}


SOURCE = KaggleFolder()
