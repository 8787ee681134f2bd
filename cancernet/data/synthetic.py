"""Synthetic H&E-like patches in the exact Kaggle layout, with PCam's label meaning.

Positive: tumour-like nuclei (large, dark, pleomorphic, crowded) touching the centre 32x32.
Negative: normal tissue, or tumour-like nuclei only outside the centre region, so a pipeline
that loses the centre (or mislabels) cannot score well.
"""

from __future__ import annotations

import gzip
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .patch import LABEL_END, LABEL_START, PATCH_SHAPE, PATCH_SIZE

SIZE, CENTRE = PATCH_SIZE, (LABEL_START, LABEL_END)  # the label looks at pixels [32, 64) in both axes
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def _nucleus(img: np.ndarray, cy: float, cx: float, a: float, b: float, angle: float, colour) -> None:
    r = int(max(a, b)) + 2  # only touch the nucleus' bounding box
    y0, y1, x0, x1 = max(int(cy) - r, 0), min(int(cy) + r + 1, SIZE), max(int(cx) - r, 0), min(int(cx) + r + 1, SIZE)
    if y0 >= y1 or x0 >= x1:
        return
    dy, dx = _YY[y0:y1, x0:x1] - cy, _XX[y0:y1, x0:x1] - cx
    c, s = np.cos(angle), np.sin(angle)
    q = ((dx * c + dy * s) / a) ** 2 + ((-dx * s + dy * c) / b) ** 2
    alpha = np.clip((1.0 - q) * 3.0, 0, 1)[..., None]  # soft edge
    window = img[y0:y1, x0:x1]
    window *= 1 - alpha
    window += alpha * colour


def _tumour_cluster(rng, img, centre, count, avoid_centre: bool) -> None:
    placed, tries = 0, 0
    while placed < count and tries < 200:
        tries += 1
        # a positive's first nucleus sits on the cluster centre, inside the centre 32x32
        cy, cx = centre + (rng.normal(0, 7, 2) if placed or avoid_centre else 0)
        a, b = rng.uniform(2.5, 6.5), rng.uniform(2.2, 5.0)  # overlaps normal nuclei at the low end
        r = max(a, b) + 1
        lo, hi = CENTRE[0] - r, CENTRE[1] + r
        if avoid_centre and lo < cy < hi and lo < cx < hi:
            continue
        if not (r <= cy < SIZE - r and r <= cx < SIZE - r) and rng.random() < 0.7:
            continue
        colour = np.array([75, 35, 125]) * rng.uniform(0.75, 1.6) + rng.normal(0, 6, 3)
        _nucleus(img, cy, cx, a, b, rng.uniform(0, np.pi), colour)
        placed += 1


def render_patch(rng: np.random.Generator, label: int, outside_tumour: bool = False) -> np.ndarray:
    """One 96x96x3 uint8 patch; label 1 puts tumour nuclei in the centre 32x32."""
    stain = rng.normal(0, 8, 3)
    base = np.array([232, 172, 205]) + stain
    # stroma texture: a few random low-frequency waves
    texture = sum(
        np.sin(_XX * rng.uniform(0.05, 0.3) + _YY * rng.uniform(0.05, 0.3) + rng.uniform(0, 6)) for _ in range(3)
    )
    img = base + texture[..., None] * rng.uniform(3, 9) + rng.normal(0, 4, (SIZE, SIZE, 3))
    img = img.astype(np.float32)
    for _ in range(rng.integers(15, 40)):  # normal nuclei: small, round, scattered
        colour = np.array([140, 95, 180]) + stain + rng.normal(0, 8, 3)
        r = rng.uniform(1.8, 3.0)
        _nucleus(img, *rng.uniform(0, SIZE, 2), r, r * rng.uniform(0.8, 1.2), 0.0, colour)
    if label == 1:  # some positives hold only a few tumour nuclei: the hard cases
        _tumour_cluster(rng, img, rng.uniform(38, 58, 2), rng.integers(1, 15), avoid_centre=False)
    elif outside_tumour:  # up to the edge of the centre box, never inside it
        edge = rng.uniform(6, 28)
        side = rng.integers(4)
        along = rng.uniform(10, 86)
        centre = [(edge, along), (SIZE - edge, along), (along, edge), (along, SIZE - edge)][side]
        _tumour_cluster(rng, img, np.array(centre), rng.integers(7, 15), avoid_centre=True)
    return np.clip(img, 0, 255).astype(np.uint8)


def _render_many(args: tuple[int, np.ndarray, np.ndarray]) -> list[np.ndarray]:
    seed, labels, outside = args
    rng = np.random.default_rng(seed)
    return [render_patch(rng, int(label), bool(o)) for label, o in zip(labels, outside)]


def _write_many(args: tuple[list[Path], list[np.ndarray]]) -> None:
    for path, array in zip(*args):
        Image.fromarray(array).save(path, format="TIFF")


def write_dataset(
    out: str | Path,
    n_train: int,
    n_test: int,
    seed: int = 0,
    positive_rate: float = 0.4,
    outside_rate: float = 0.3,
    pool: int | None = None,
    workers: int = 1,
) -> pd.DataFrame:
    """Write train/, test/, train_labels.csv and sample_submission.csv under out.

    pool: render only this many distinct patches per class and reuse them (for scale tests).
    """
    out = Path(out)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "test").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    ids = [rng.bytes(20).hex() for _ in range(n)]
    labels = (rng.random(n) < positive_rate).astype(np.int64)
    outside = (labels == 0) & (rng.random(n) < outside_rate)
    kind = labels + 2 * outside  # 0 normal, 1 tumour, 2 tumour outside the centre
    n_distinct = n if pool is None else min(n, pool)
    chunks = np.array_split(np.arange(n_distinct), max(1, workers * 4))
    jobs = [(seed * 100_003 + j, labels[c], outside[c]) for j, c in enumerate(chunks) if len(c)]
    with ProcessPoolExecutor(workers) as ex:
        rendered = [a for part in ex.map(_render_many, jobs) for a in part]
    if pool is not None:  # reuse a distinct patch of the same kind for every later image
        by_kind = {k: [rendered[i] for i in range(n_distinct) if kind[i] == k] for k in range(3)}
        rendered += [by_kind[kind[i]][i % len(by_kind[kind[i]])] for i in range(n_distinct, n)]
    paths = [out / ("train" if i < n_train else "test") / f"{ids[i]}.tif" for i in range(n)]
    batches = [(paths[i : i + 2000], rendered[i : i + 2000]) for i in range(0, n, 2000)]
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(_write_many, batches))
    frame = pd.DataFrame({"id": ids[:n_train], "label": labels[:n_train]})
    frame.to_csv(out / "train_labels.csv", index=False)
    pd.DataFrame({"id": ids[n_train:], "label": 0}).to_csv(out / "sample_submission.csv", index=False)
    return frame


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
) -> dict:
    """A synthetic dataset in PCam's release layout (x/y .h5, or .h5.gz, and meta CSVs: data/pcam.py).

    Patches come from the synthetic Kaggle renderer; every `per_slide` consecutive patches of a
    split share a slide id (normal slides hold only normal patches), and no slide spans two
    splits. pool: render only this many distinct patches and reuse them (for scale runs).
    """
    import h5py

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = {"train": n_train, "valid": n_valid, "test": n_test}
    cache: dict[int, list[np.ndarray]] = {0: [], 1: []}  # with pool: distinct renders per label, reused
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
                    rendered = [cache[int(v)][(start + i) % len(cache[int(v)])] for i, v in enumerate(part)]
                else:
                    pieces = np.array_split(np.arange(len(part)), max(1, workers * 2))
                    jobs = [
                        (seed * 1000 + s_index * 100 + start + k, part[p], np.zeros(len(p), bool))
                        for k, p in enumerate(pieces)
                        if len(p)
                    ]
                    with ProcessPoolExecutor(workers) as ex:
                        rendered = [a for piece in ex.map(_render_many, jobs) for a in piece]
                    for array, v in zip(rendered, part) if pool else ():
                        if len(cache[int(v)]) < pool // 2:
                            cache[int(v)].append(array)
                x[start : start + len(part)] = np.stack(rendered)
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
            for part in ("x", "y"):
                plain = Path(f"{stem}_{part}.h5")
                with open(plain, "rb") as src, gzip.open(f"{plain}.gz", "wb", compresslevel=1) as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
                plain.unlink()
    return {split: n for split, n in sizes.items()}
