"""Tiles of a slide's tissue cells, read a block of cells at a time in loader workers.

Tiles overlap (96 px every 32 px: each pixel is in 9 tiles), so one region per block of
`slide.block` x `slide.block` cells is read, shrunk to training resolution once, and cut into
the tiles of its tissue cells: a fraction of the pixels that tile-by-tile reads decode.
"""

from __future__ import annotations

import time

import numpy as np
import openslide
import torch
from PIL import Image
from torch.utils.data import Dataset

from cancernet.wsi.slide import Plan, open_slide

UNREADABLE = -2  # the label of tiles whose region OpenSlide failed to read


def block_order(tissue: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, list[slice]]:
    """Rows and columns of the tissue cells, block by block, and each block's slice of them."""
    rows, cols = np.nonzero(tissue)
    key = (rows // block) * (tissue.shape[1] // block + 1) + cols // block
    order = np.lexsort((cols, rows, key))
    rows, cols, key = rows[order], cols[order], key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], len(key)]
    return rows, cols, [slice(int(a), int(b)) for a, b in zip(starts, ends)]


def to_rgb(region: Image.Image) -> np.ndarray:
    """OpenSlide's RGBA (transparent beyond the slide's edges) over white."""
    rgba = np.asarray(region)
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.float32) / 255
    return (rgba[..., :3] * a + 255 * (1 - a) + 0.5).astype(np.uint8)


class SlideTiles(Dataset):
    """Item i: the tiles of block i as (uint8 (k, 3, 96, 96), labels (k,), tile index (k,)).

    Labels are -1, or UNREADABLE for a block OpenSlide could not read (so that every rank learns
    of it after the gather, instead of one rank raising inside a collective).
    """

    def __init__(self, plan: Plan, block: int):
        self.plan = plan
        self.rows, self.cols, self.blocks = block_order(plan.tissue, block)
        self.slide = None  # opened in each worker: an OpenSlide handle does not cross processes

    def __len__(self) -> int:
        return len(self.blocks)

    def box(self, cells: slice) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """The block's bounding box of tiles: level-0 origin, size at the level read, and size at
        training resolution."""
        p, stride = self.plan, self.plan.stride
        r0, r1 = self.rows[cells].min(), self.rows[cells].max()
        c0, c1 = self.cols[cells].min(), self.cols[cells].max()
        x0, y0 = p.tile_origin(r0, c0)
        width, height = int((c1 - c0) * stride + p.tile), int((r1 - r0) * stride + p.tile)
        at_level = p.scale / p.downsample  # pixels of the level read per training pixel
        size = max(1, round(width * at_level)), max(1, round(height * at_level))
        return (int(x0), int(y0)), size, (width, height)

    def read_share(self) -> float:
        """Pixels read per pixel of the cells scored (reading tile by tile: (96/stride)^2, 9)."""
        read = sum(w * h for _, (w, h), _ in map(self.box, self.blocks))
        cell = self.plan.stride * self.plan.scale / self.plan.downsample  # a cell's side at the level read
        return read / (len(self.rows) * cell * cell)

    def region(self, cells: slice) -> np.ndarray:
        """The block's bounding box of tiles, at training resolution (H, W, 3)."""
        (x0, y0), size, (width, height) = self.box(cells)
        if self.slide is None:
            self.slide = open_slide(self.plan.path)
        rgb = to_rgb(self.slide.read_region((x0, y0), self.plan.level, size))
        if size != (width, height):
            rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR))
        return rgb

    def __getitem__(self, i: int):
        cells = self.blocks[i]
        index = torch.arange(cells.start, cells.stop)
        try:
            rgb = self.region(cells)
        except (openslide.OpenSlideError, OSError):  # a tile that does not decode: the caller names the slide
            blank = torch.zeros((len(index), 3, self.plan.tile, self.plan.tile), dtype=torch.uint8)
            return blank, torch.full((len(index),), UNREADABLE), index
        top = (self.rows[cells] - self.rows[cells].min()) * self.plan.stride
        left = (self.cols[cells] - self.cols[cells].min()) * self.plan.stride
        side = self.plan.tile
        tiles = np.stack([rgb[y : y + side, x : x + side] for y, x in zip(top, left)])
        return torch.from_numpy(tiles).permute(0, 3, 1, 2), torch.full((len(index),), -1), index


def cat_blocks(items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels, index = zip(*items)
    return torch.cat(images), torch.cat(labels), torch.cat(index)


class Waited:
    """Iterates a loader, adding up the seconds the consumer spent waiting for its next batch."""

    def __init__(self, loader):
        self.loader, self.seconds = loader, 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - start
            yield batch
