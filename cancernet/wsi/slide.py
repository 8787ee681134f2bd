"""A slide through OpenSlide, and the plan of what to read from it: level, cell grid, tissue.

Lengths come in three units: level-0 pixels of the slide, pixels of the level read, and
training pixels (the patch resolution `data.mpp`, in which tiles are 96 px and the stride and
cells are counted). `scale` = training pixel / level-0 pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from cancernet.config import SlideConfig
from cancernet.data.patch import PATCH_SIZE
from cancernet.runtime.errors import DataError

TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF, both byte orders
# what OpenSlide reads (https://openslide.org/formats/); a folder argument is searched for these
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")


PATCH_SIDE_MAX = 512  # an image no larger than this each way is a patch (96-512 px), not a slide


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of an image PIL reads, else None."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except Exception:  # noqa: BLE001  (any failure: not an image PIL reads)
        return None


def open_slide(path: Path):
    """An openslide.OpenSlide, or a DataError naming the file."""
    import openslide

    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic in TIFF_MAGIC:  # what most slide formats are; a broken directory chain lands here
            size = _image_size(path)
            if size and max(size) <= PATCH_SIDE_MAX:
                raise DataError(
                    f"slide {path}: a {size[0]} x {size[1]} image, a patch rather than a slide; "
                    "patches are scored by `python -m cancernet predict FOLDER --checkpoint ...`"
                ) from None
            raise DataError(
                f"slide {path}: a TIFF that OpenSlide cannot open ({path.stat().st_size:,} bytes): "
                "truncated or corrupt?"
            ) from None
        raise DataError(f"slide {path}: not a format OpenSlide reads (or not a slide)") from None
    except (openslide.OpenSlideError, OSError) as e:
        raise DataError(
            f"slide {path}: unreadable ({str(e).strip() or type(e).__name__}); truncated or corrupt?"
        ) from None


def slide_mpp(slide, path: Path, override: float | None) -> float:
    """Microns per level-0 pixel: --mpp, else the slide's own (OpenSlide reads the vendors' fields
    and a TIFF's resolution tags); refuse without either."""
    if override is not None:
        return float(override)
    props = slide.properties
    try:
        x, y = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
    except (KeyError, ValueError):
        raise DataError(
            f"slide {path}: its metadata hold no microns per pixel (openslide.mpp-x); pass --mpp (level 0's)"
        ) from None
    if x <= 0 or y <= 0:
        raise DataError(f"slide {path}: microns per pixel {x}, {y} are not positive; pass --mpp")
    if abs(x - y) > 0.02 * max(x, y):
        raise DataError(f"slide {path}: pixels are not square ({x} x {y} um); pass --mpp to use one value")
    return (x + y) / 2


def tissue_mask(thumb: Image.Image, um_per_px: float, cfg: SlideConfig) -> np.ndarray:
    """Tissue of an RGB thumbnail: stained (HSV saturation above slide.min_saturation) or textured
    (the brightness's standard deviation over 3 x 3 pixels above slide.min_texture, one pixel in from
    the texture's edge, so that the step from tissue to glass is not itself taken for tissue);
    holes up to slide.fill_holes_um2 filled.

    A fixed threshold, not Otsu's: with little glass in view Otsu's threshold splits the tissue
    itself. Texture keeps pale tissue (fat, faint staining), which at the thumbnail's resolution
    is barely more saturated than glass but is not flat as glass is (docs/SLIDES.md, measured on
    slides of real patches)."""
    hsv = np.asarray(thumb.convert("HSV")).astype(np.float32)
    saturation, brightness = hsv[..., 1], hsv[..., 2]
    mask = saturation > cfg.min_saturation * 255
    if cfg.min_texture:
        mean = ndimage.uniform_filter(brightness, 3)
        variance = ndimage.uniform_filter(brightness * brightness, 3) - mean * mean
        textured = np.sqrt(np.maximum(variance, 0)) > cfg.min_texture
        mask |= ndimage.binary_erosion(textured, np.ones((3, 3), bool))
    holes, n = ndimage.label(~mask)
    if n:
        area = ndimage.sum_labels(np.ones_like(mask), holes, index=np.arange(1, n + 1)) * um_per_px**2
        edge = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
        small = np.flatnonzero(area <= cfg.fill_holes_um2) + 1
        mask |= np.isin(holes, np.setdiff1d(small, edge))
    return mask


def cell_share(mask: np.ndarray, px_per_cell: float, shape: tuple[int, int]) -> np.ndarray:
    """The share of each cell (a grid of shape, px_per_cell mask pixels a side) that mask covers;
    beyond the mask's edge counts as uncovered."""
    rows, cols = shape
    need = (max(mask.shape[0], math.ceil(rows * px_per_cell)), max(mask.shape[1], math.ceil(cols * px_per_cell)))
    padded = np.zeros(need, np.float32)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    share = Image.fromarray(padded).resize(
        (cols, rows), Image.Resampling.BOX, box=(0, 0, cols * px_per_cell, rows * px_per_cell)
    )
    return np.asarray(share)


@dataclass
class Plan:
    """What predict-slide reads from one slide: the level, the grid of cells, the tissue cells."""

    path: str
    mpp: float  # level 0, microns per pixel
    train_mpp: float
    level: int  # the level tiles are read from
    downsample: float  # of that level
    dimensions: tuple[int, int]  # level 0 (width, height)
    stride: int  # training pixels; cells are stride x stride
    tissue: np.ndarray  # (rows, cols) bool: the cells scored
    thumb_mpp: float  # of the thumbnail the mask was drawn on
    tile: int = PATCH_SIZE  # training pixels per tile side; a tile is centred on its cell

    @property
    def scale(self) -> float:
        """Level-0 pixels per training pixel."""
        return self.train_mpp / self.mpp

    @property
    def shape(self) -> tuple[int, int]:
        return self.tissue.shape

    @property
    def cell_um(self) -> float:
        return self.stride * self.train_mpp

    def tile_origin(self, row: np.ndarray, col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 (x, y) of the top-left corner of the tiles centred on these cells."""
        margin = (self.tile - self.stride) // 2
        x = np.rint((col * self.stride - margin) * self.scale).astype(np.int64)
        y = np.rint((row * self.stride - margin) * self.scale).astype(np.int64)
        return x, y


def reading_level(slide, mpp: float, train_mpp: float) -> int:
    """The coarsest level at least as fine as the training resolution (tiles are then shrunk)."""
    fine_enough = [i for i, d in enumerate(slide.level_downsamples) if mpp * d <= train_mpp * 1.001]
    return max(fine_enough) if fine_enough else 0


def level0_mpp(path: Path, override: float | None = None) -> float:
    """The level-0 microns per pixel a slide is read at (opens it: a DataError names a bad file)."""
    slide = open_slide(path)
    try:
        return slide_mpp(slide, path, override)
    finally:
        slide.close()


def plan_slide(
    path: Path, train_mpp: float, cfg: SlideConfig, mpp: float | None = None, tile: int = PATCH_SIZE
) -> tuple[Plan, Image.Image]:
    """The plan of a slide, and the thumbnail its tissue mask was drawn on. tile: training pixels
    per tile (cells are slide.stride apart; stride = tile gives non-overlapping tiles, as MIL uses)."""
    slide = open_slide(path)
    try:
        level0_mpp = slide_mpp(slide, path, mpp)
        width, height = slide.dimensions
        if level0_mpp > train_mpp * 1.25:
            raise DataError(
                f"slide {path}: level 0 is {level0_mpp:.3g} um/px, coarser than the model's training "
                f"resolution {train_mpp:.3g} um/px; tiles would have to be enlarged"
            )
        level = reading_level(slide, level0_mpp, train_mpp)
        cell0 = cfg.stride * train_mpp / level0_mpp  # level-0 pixels per cell
        cols, rows = int(width / cell0 + 0.5), int(height / cell0 + 0.5)  # edge cells at least half on the slide
        if not rows or not cols:
            raise DataError(f"slide {path}: {width}x{height} px is smaller than one cell")
        size = max(1, round(width * level0_mpp / cfg.tissue_mpp)), max(1, round(height * level0_mpp / cfg.tissue_mpp))
        try:
            thumb = slide.get_thumbnail(size).convert("RGB")
        except Exception as e:  # openslide.OpenSlideError, or a decoder's error on a truncated file
            raise DataError(
                f"slide {path}: unreadable ({str(e).strip() or type(e).__name__}); truncated or corrupt?"
            ) from None
        thumb_mpp = width * level0_mpp / thumb.width
        mask = tissue_mask(thumb, thumb_mpp, cfg)
        tissue = cell_share(mask, cell0 * thumb.width / width, (rows, cols)) >= max(cfg.min_tissue, 1e-6)
        if not tissue.any():
            raise DataError(
                f"slide {path}: no tissue found (see slide.min_saturation and slide.min_texture in docs/SLIDES.md)"
            )
        plan = Plan(
            path=str(path),
            mpp=level0_mpp,
            train_mpp=train_mpp,
            level=level,
            downsample=float(slide.level_downsamples[level]),
            dimensions=(width, height),
            stride=cfg.stride,
            tissue=tissue,
            thumb_mpp=thumb_mpp,
            tile=tile,
        )
        return plan, thumb
    finally:
        slide.close()


def write_pyramid(path: Path, image: np.ndarray, mpp: float | None, tile: int = 256, compression: str = "zlib") -> None:
    """A tiled pyramidal TIFF (levels halving until one tile) with resolution tags (none when mpp
    is None): OpenSlide reads it as a generic TIFF with its microns per pixel; QuPath opens it too."""
    import tifffile

    levels = max(1, math.ceil(math.log2(max(image.shape[:2]) / tile)) + 1)
    extra = {"extrasamples": ["unassalpha"]} if image.ndim == 3 and image.shape[2] == 4 else {}
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as tif:
        level_img = image
        for i in range(levels):
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * 2**i)
                extra.update(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
            tif.write(
                level_img,
                tile=(tile, tile),
                compression=compression,
                photometric="rgb" if level_img.ndim == 3 else "minisblack",
                subfiletype=0 if i == 0 else 1,
                metadata=None,
                **extra,
            )
            h, w = level_img.shape[:2]
            if i + 1 < levels:
                level_img = np.asarray(
                    Image.fromarray(level_img).resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BOX)
                )
