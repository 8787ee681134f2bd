"""A synthetic whole slide: the synthetic patches' tissue drawn as one continuous section, with
tumour nuclei clustered on the cells of a known region, written as a tiled pyramidal TIFF.

The region is given on the grid of 32 px training cells, so the truth of each heatmap cell is
known exactly; background is near-white glass that the tissue mask must leave out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cancernet.data.patch import LABEL_END, LABEL_START, PATCH_MPP
from cancernet.data.synthetic import NORMAL_COLOUR, STROMA_COLOUR, TUMOUR_COLOUR, _nucleus
from cancernet.wsi.slide import write_pyramid

CELL = LABEL_END - LABEL_START  # 32 training pixels
STRIP = 8 * CELL  # rows rendered at a time (memory stays small for large slides)


def ellipse(shape: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
    """Cells (rows, cols) inside an axis-aligned ellipse (centre and radii in cells)."""
    rr, cc = np.mgrid[0 : shape[0], 0 : shape[1]]
    return ((rr + 0.5 - centre[0]) / radii[0]) ** 2 + ((cc + 0.5 - centre[1]) / radii[1]) ** 2 <= 1


def render_section(rng: np.random.Generator, tissue: np.ndarray, tumour: np.ndarray) -> np.ndarray:
    """uint8 RGB at training resolution (rows*32, cols*32); tissue and tumour are cell masks."""
    rows, cols = tissue.shape
    height, width = rows * CELL, cols * CELL
    stain = rng.normal(0, 8, 3)
    waves = [(rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3), rng.uniform(0, 6)) for _ in range(3)]
    amplitude = rng.uniform(3, 9)
    tissue_px = np.kron(tissue, np.ones((CELL, CELL), bool))
    # normal nuclei, as in the patches (15-40 per 96x96): uniform over the tissue
    n_normal = rng.poisson(27.5 / 96**2 * tissue_px.sum())
    ys, xs = rng.uniform(0, height, n_normal), rng.uniform(0, width, n_normal)
    keep = tissue_px[ys.astype(int), xs.astype(int)]
    normal = [
        (y, x, r, r * rng.uniform(0.8, 1.2), 0.0, NORMAL_COLOUR + stain + rng.normal(0, 8, 3))
        for y, x, r in zip(ys[keep], xs[keep], rng.uniform(1.8, 3.0, keep.sum()))
    ]
    # tumour: a sheet of tumour nuclei over the tumour cells (each cell holds some, as a positive's centre)
    tumour_nuclei = []
    for r, c in zip(*np.nonzero(tumour & tissue)):
        for _ in range(rng.integers(3, 7)):
            cy, cx = (r + rng.uniform(0.1, 0.9)) * CELL, (c + rng.uniform(0.1, 0.9)) * CELL
            a, b = rng.uniform(2.5, 6.5), rng.uniform(2.2, 5.0)
            colour = TUMOUR_COLOUR * rng.uniform(0.75, 1.6) + rng.normal(0, 6, 3)
            tumour_nuclei.append((cy, cx, a, b, rng.uniform(0, np.pi), colour))
    nuclei = normal + tumour_nuclei  # tumour drawn last, over the normal ones (as in the patches)
    centres_y = np.array([n[0] for n in nuclei]) if nuclei else np.zeros(0)
    out = np.empty((height, width, 3), np.uint8)
    for top in range(0, height, STRIP):
        bottom = min(top + STRIP, height)
        yy, xx = np.mgrid[top:bottom, 0:width].astype(np.float32)
        texture = sum(np.sin(xx * fx + yy * fy + phase) for fx, fy, phase in waves)
        img = (STROMA_COLOUR + stain) + texture[..., None] * amplitude + rng.normal(0, 4, (bottom - top, width, 3))
        img = img.astype(np.float32)
        for i in np.flatnonzero((centres_y > top - 10) & (centres_y < bottom + 10)):
            cy, cx, a, b, angle, colour = nuclei[i]
            _nucleus(img, cy - top, cx, a, b, angle, colour)
        glass = ~tissue_px[top:bottom]
        img[glass] = 242 + rng.normal(0, 2, (glass.sum(), 3))
        out[top:bottom] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def write_slide(
    path: str | Path,
    tissue: np.ndarray,
    tumour: np.ndarray,
    mpp: float = 0.486,
    train_mpp: float = PATCH_MPP,
    seed: int = 0,
    resolution: bool = True,
) -> Path:
    """A pyramidal TIFF whose level 0 is mpp um/px (the section rendered at train_mpp, enlarged)."""
    section = render_section(np.random.default_rng(seed), tissue, tumour)
    h, w = section.shape[:2]
    factor = train_mpp / mpp
    level0 = np.asarray(
        Image.fromarray(section).resize((round(w * factor), round(h * factor)), Image.Resampling.BICUBIC)
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_pyramid(path, level0, mpp if resolution else None)
    return path


def write_slide_set(
    out: str | Path,
    n: int,
    rows: int = 48,
    cols: int = 64,
    mpp: float = 0.486,
    seed: int = 0,
    tumour_rate: float = 0.5,
    mask_downsample: int = 16,
):
    """OUT/slides/slide_<i>.tif, OUT/masks/slide_<i>.png (tumour mask at mask_downsample, for
    tumour slides) and OUT/slides.csv (slide,label): what evaluate-slides takes."""
    import pandas as pd

    out = Path(out)
    rng = np.random.default_rng(seed)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        label = int((i + 1) * tumour_rate // 1 > i * tumour_rate // 1)  # tumour_rate of them, spread out
        # tissue: a large off-centre section plus a smaller one; glass around both
        tissue = ellipse(
            (rows, cols),
            (rows * rng.uniform(0.4, 0.55), cols * rng.uniform(0.3, 0.45)),
            (rows * rng.uniform(0.3, 0.4), cols * rng.uniform(0.22, 0.3)),
        )
        tissue |= ellipse((rows, cols), (rows * rng.uniform(0.3, 0.7), cols * 0.8), (rows * 0.2, cols * 0.12))
        tumour = np.zeros_like(tissue)
        if label:
            r, c = np.argwhere(tissue)[rng.integers(tissue.sum())]
            tumour = ellipse((rows, cols), (r + 0.5, c + 0.5), rng.uniform(2.5, 6, 2)) & tissue
        name = f"slide_{i:03d}"
        path = write_slide(out / "slides" / f"{name}.tif", tissue, tumour, mpp=mpp, seed=seed * 1000 + i)
        if label:
            factor = PATCH_MPP / mpp * CELL / mask_downsample  # mask pixels per cell
            size = round(cols * factor), round(rows * factor)
            Image.fromarray(tumour.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST).save(
                out / "masks" / f"{name}.png"
            )
        records.append({"slide": path.name, "label": label})
    frame = pd.DataFrame(records)
    frame.to_csv(out / "slides.csv", index=False)
    return frame


def write_patch_slide(
    path: str | Path,
    grid: np.ndarray,
    patches: np.ndarray,
    glass: np.ndarray,
    mpp: float = PATCH_MPP,
) -> Path:
    """A pyramidal TIFF made of real patches: grid (rows, cols) holds an index into patches
    (N, 96, 96, 3) per cell, or -1 for glass, which is the glass patch `glass` (96, 96, 3) mirrored
    over the slide (one background, continuous at its seams, as a scanner's). Level 0 is the
    patches' own resolution (mpp), so a 96 px tile at it is one patch."""
    size = patches.shape[1]
    rows, cols = grid.shape
    reps = (-(-rows // 2), -(-cols // 2))  # a patch and its mirror image, repeated
    pair = np.concatenate([glass, glass[::-1]], 0)
    pair = np.concatenate([pair, pair[:, ::-1]], 1)
    image = np.tile(pair, (*reps, 1))[: rows * size, : cols * size].copy()
    for r, c in np.argwhere(grid >= 0):
        image[r * size : (r + 1) * size, c * size : (c + 1) * size] = patches[grid[r, c]]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_pyramid(path, image, mpp)
    return path


def section_grid(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """A connected blob of `cells` cells (a random growth from the centre) in a grid of shape:
    a small tissue section in much glass. Returns a bool mask."""
    mask = np.zeros(shape, bool)
    mask[shape[0] // 2, shape[1] // 2] = True
    while mask.sum() < cells:
        r, c = np.argwhere(mask)[rng.integers(mask.sum())]
        dr, dc = ((0, 1), (1, 0), (0, -1), (-1, 0))[rng.integers(4)]
        r, c = min(max(r + dr, 1), shape[0] - 2), min(max(c + dc, 1), shape[1] - 2)
        mask[r, c] = True
    return mask


def focus_cells(rng: np.random.Generator, tissue: np.ndarray, size: int) -> np.ndarray:
    """A connected focus of `size` tissue cells (a random walk that stays on tissue): where a
    positive slide's tumour patches go. Returns a bool mask."""
    focus = np.zeros_like(tissue)
    focus[tuple(np.argwhere(tissue)[rng.integers(tissue.sum())])] = True
    while focus.sum() < min(size, tissue.sum()):
        r, c = np.argwhere(focus)[rng.integers(focus.sum())]
        dr, dc = ((0, 1), (1, 0), (0, -1), (-1, 0))[rng.integers(4)]
        if 0 <= r + dr < tissue.shape[0] and 0 <= c + dc < tissue.shape[1] and tissue[r + dr, c + dc]:
            focus[r + dr, c + dc] = True
    return focus
