"""Synthetic H&E-like patches in the exact Kaggle layout, with PCam's label meaning.

Positive: tumour-like nuclei (large, dark, pleomorphic, crowded) touching the centre 32x32: a
cluster there, or (SHEET_RATE of them) a sheet over the whole patch, as inside a tumour.
Negative: normal tissue, or tumour-like nuclei only outside the centre region, so a pipeline
that loses the centre (or mislabels) cannot score well.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cancernet.data.patch import LABEL_END, LABEL_START, PATCH_SIZE, pixel_hash, stamp

SIZE, CENTRE = PATCH_SIZE, (LABEL_START, LABEL_END)  # the label looks at pixels [32, 64) in both axes
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
SHEET_RATE = 0.35  # positives from inside a tumour (whole-slide heatmaps meet these); the rest are clusters
STROMA_COLOUR, NORMAL_COLOUR, TUMOUR_COLOUR = (
    np.array([232, 172, 205]),
    np.array([140, 95, 180]),
    np.array([75, 35, 125]),
)


def _nucleus(img: np.ndarray, cy: float, cx: float, a: float, b: float, angle: float, colour) -> None:
    """A soft-edged ellipse onto a float image of any size (centre in its pixel coordinates)."""
    h, w = img.shape[:2]
    r = int(max(a, b)) + 2  # only touch the nucleus' bounding box
    y0, y1, x0, x1 = max(int(cy) - r, 0), min(int(cy) + r + 1, h), max(int(cx) - r, 0), min(int(cx) + r + 1, w)
    if y0 >= y1 or x0 >= x1:
        return
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
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
        colour = TUMOUR_COLOUR * rng.uniform(0.75, 1.6) + rng.normal(0, 6, 3)
        _nucleus(img, cy, cx, a, b, rng.uniform(0, np.pi), colour)
        placed += 1


def _tumour_sheet(rng, img, count) -> None:
    """Tumour nuclei spread over the whole patch (a patch from inside a tumour), two in the centre."""
    for k in range(count):
        cy, cx = rng.uniform(*CENTRE, 2) if k < 2 else rng.uniform(0, SIZE, 2)
        a, b = rng.uniform(2.5, 6.5), rng.uniform(2.2, 5.0)
        colour = TUMOUR_COLOUR * rng.uniform(0.75, 1.6) + rng.normal(0, 6, 3)
        _nucleus(img, cy, cx, a, b, rng.uniform(0, np.pi), colour)


def render_patch(rng: np.random.Generator, label: int, outside_tumour: bool = False) -> np.ndarray:
    """One 96x96x3 uint8 patch; label 1 puts tumour nuclei in the centre 32x32."""
    stain = rng.normal(0, 8, 3)
    base = STROMA_COLOUR + stain
    # stroma texture: a few random low-frequency waves
    texture = sum(
        np.sin(_XX * rng.uniform(0.05, 0.3) + _YY * rng.uniform(0.05, 0.3) + rng.uniform(0, 6)) for _ in range(3)
    )
    img = base + texture[..., None] * rng.uniform(3, 9) + rng.normal(0, 4, (SIZE, SIZE, 3))
    img = img.astype(np.float32)
    for _ in range(rng.integers(15, 40)):  # normal nuclei: small, round, scattered
        colour = NORMAL_COLOUR + stain + rng.normal(0, 8, 3)
        r = rng.uniform(1.8, 3.0)
        _nucleus(img, *rng.uniform(0, SIZE, 2), r, r * rng.uniform(0.8, 1.2), 0.0, colour)
    if label == 1 and rng.random() < SHEET_RATE:  # inside a tumour: nuclei everywhere, the centre included
        _tumour_sheet(rng, img, rng.integers(18, 40))
    elif label == 1:  # some positives hold only a few tumour nuclei: the hard cases
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
    rng.bytes(20 * n)  # once random ids; drawn still, so that a seed keeps its labels and patches
    labels = (rng.random(n) < positive_rate).astype(np.int64)
    outside = (labels == 0) & (rng.random(n) < outside_rate)
    kind = labels + 2 * outside  # 0 normal, 1 tumour, 2 tumour outside the centre
    n_distinct = n if pool is None else min(n, pool)
    chunks = np.array_split(np.arange(n_distinct), max(1, workers * 4))
    jobs = [(seed * 100_003 + j, labels[c], outside[c]) for j, c in enumerate(chunks) if len(c)]
    with ProcessPoolExecutor(workers) as ex:
        rendered = [a for part in ex.map(_render_many, jobs) for a in part]
    if pool is not None:  # reuse a distinct patch of the same kind for every later image, stamped unique
        by_kind = {k: [rendered[i] for i in range(n_distinct) if kind[i] == k] for k in range(3)}
        rendered += [stamp(by_kind[kind[i]][i % len(by_kind[kind[i]])], i) for i in range(n_distinct, n)]
    ids = [pixel_hash(a) for a in rendered]  # as Kaggle's: the SHA-1 of the pixels
    paths = [out / ("train" if i < n_train else "test") / f"{ids[i]}.tif" for i in range(n)]
    batches = [(paths[i : i + 2000], rendered[i : i + 2000]) for i in range(0, n, 2000)]
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(_write_many, batches))
    frame = pd.DataFrame({"id": ids[:n_train], "label": labels[:n_train]})
    frame.to_csv(out / "train_labels.csv", index=False)
    pd.DataFrame({"id": ids[n_train:], "label": 0}).to_csv(out / "sample_submission.csv", index=False)
    return frame
