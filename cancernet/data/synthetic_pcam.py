"""A synthetic PCam release (data/pcam.py's layout), and optionally the Kaggle-layout set it
would become: every distinct patch once, named by the SHA-1 of its pixels, the labelled ones in
train_labels.csv and the others in test/ (as Kaggle made its set from PCam without duplicates).

Like the real release it holds exact duplicates (`duplicates` of the patches repeat an earlier
one, sometimes on another slide or in another split), which the Kaggle set drops.
"""

from __future__ import annotations

import gzip
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from cancernet.data.patch import PATCH_SHAPE, pixel_hash, stamp
from cancernet.data.synthetic import _render_many, _write_many

SPLITS = ("train", "valid", "test")


def _render(seed: tuple, labels: np.ndarray, workers: int) -> list[np.ndarray]:
    """Patches for labels; seed: a tuple (every block its own stream, none shared by accident)."""
    pieces = np.array_split(np.arange(len(labels)), max(1, workers * 2))
    jobs = [([*seed, k], labels[p], np.zeros(len(p), bool)) for k, p in enumerate(pieces) if len(p)]
    with ProcessPoolExecutor(workers) as ex:
        return [a for piece in ex.map(_render_many, jobs) for a in piece]


def write_pcam_release(
    out: str | Path,
    n_train: int,
    n_valid: int,
    n_test: int,
    seed: int = 0,
    gzip_files: bool = False,
    workers: int = 1,
    pool: int | None = None,
    per_slide: int = 25,
    chunk: int = 8192,
    duplicates: float = 0.0,
    kaggle: str | Path | None = None,
    kaggle_test_share: float = 0.2,
) -> dict:
    """Write the release to out (x/y .h5, or .h5.gz, and meta CSVs); with kaggle, also the matching
    Kaggle-layout set there. Every `per_slide` consecutive patches of a split share a slide (normal
    slides hold only normal patches); no slide spans two splits, except through duplicates. pool:
    render only this many distinct patches and reuse them, each copy stamped unique (scale runs).
    Returns the counts (patches per split, duplicates, Kaggle train/test sizes)."""
    import h5py

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = {"train": n_train, "valid": n_valid, "test": n_test}
    cache: dict[int, list[np.ndarray]] = {0: [], 1: []}  # with pool: distinct renders per label
    earlier: list[tuple[np.ndarray, int]] = []  # patches a later one may duplicate exactly
    seen: set[str] = set()
    kaggle_rows, serial, n_duplicates = [], 0, 0
    kaggle_rng = np.random.default_rng([seed, 1])  # its own stream: the release is the same with or without it
    if kaggle is not None:
        for folder in ("train", "test"):
            (Path(kaggle) / folder).mkdir(parents=True, exist_ok=True)
    for s_index, (split, n) in enumerate(sizes.items()):
        # slides are tumour slides (60% tumour patches) or normal ones (none), as in Camelyon16
        tumour_slide = rng.random(n // per_slide + 1) < 0.6
        labels = ((rng.random(n) < 0.75) & tumour_slide[np.arange(n) // per_slide]).astype(np.uint8)
        stem = out / f"camelyonpatch_level_2_split_{split}"
        with h5py.File(f"{stem}_x.h5", "w") as fx:
            x = fx.create_dataset("x", (n, *PATCH_SHAPE), dtype=np.uint8)
            for start in range(0, n, chunk):
                part = labels[start : start + chunk]
                if pool and min(len(c) for c in cache.values()) >= pool // 2:
                    block = [
                        stamp(cache[int(v)][(start + i) % len(cache[int(v)])], serial + i) for i, v in enumerate(part)
                    ]
                else:
                    block = _render((seed, s_index, start), part, workers)
                    for array, v in zip(block, part) if pool else ():
                        if len(cache[int(v)]) < pool // 2:
                            cache[int(v)].append(array)
                serial += len(part)
                for i in np.flatnonzero(rng.random(len(part)) < duplicates) if earlier else ():
                    block[i], part[i] = earlier[rng.integers(len(earlier))]  # an exact copy, its label too
                    n_duplicates += 1
                earlier = (earlier + list(zip(block[:64], part[:64].tolist())))[-512:]
                x[start : start + len(part)] = np.stack(block)
                if kaggle is not None:
                    kaggle_rows += _kaggle_block(
                        block, part, seen, Path(kaggle), kaggle_rng, kaggle_test_share, workers
                    )
        with h5py.File(f"{stem}_y.h5", "w") as fy:
            fy.create_dataset("y", data=labels.reshape(n, 1, 1, 1))
        slides = [f"synthetic_{split}_{i // per_slide:05d}" for i in range(n)]
        pd.DataFrame(
            {
                "coord_y": rng.integers(0, 100_000, n),
                "coord_x": rng.integers(0, 100_000, n),
                "tumor_patch": labels.astype(bool),
                "center_tumor_patch": labels.astype(bool),
                "wsi": slides,
            }
        ).to_csv(f"{stem}_meta.csv")
        if gzip_files:
            for part_name in ("x", "y"):
                plain = Path(f"{stem}_{part_name}.h5")
                with open(plain, "rb") as src, gzip.open(f"{plain}.gz", "wb", compresslevel=1) as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
                plain.unlink()
    counts = {**sizes, "duplicates": n_duplicates}
    if kaggle is not None:
        table = pd.DataFrame(kaggle_rows, columns=["id", "label", "labelled"])
        table[table["labelled"]][["id", "label"]].to_csv(Path(kaggle) / "train_labels.csv", index=False)
        table[~table["labelled"]][["id"]].assign(label=0).to_csv(Path(kaggle) / "sample_submission.csv", index=False)
        counts.update(kaggle_train=int(table["labelled"].sum()), kaggle_test=int((~table["labelled"]).sum()))
    return counts


def _kaggle_block(block, labels, seen: set, root: Path, rng, test_share: float, workers: int) -> list[tuple]:
    """The block's patches not seen before, written as Kaggle names them; (id, label, labelled) rows."""
    rows, paths, arrays = [], [], []
    for array, label in zip(block, labels):
        image_id = pixel_hash(array)
        if image_id in seen:
            continue  # a duplicate: Kaggle's set holds each patch once
        seen.add(image_id)
        labelled = bool(rng.random() >= test_share)
        rows.append((image_id, int(label), labelled))
        paths.append(root / ("train" if labelled else "test") / f"{image_id}.tif")
        arrays.append(array)
    batches = [(paths[i : i + 2000], arrays[i : i + 2000]) for i in range(0, len(paths), 2000)]
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(_write_many, batches))
    return rows
