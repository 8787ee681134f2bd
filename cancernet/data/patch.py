"""The patch geometry, in one place: Kaggle/PCam patches are 96x96 RGB uint8, and their label is
about the centre 32x32 (label 1: tumour tissue there)."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from cancernet.runtime.errors import BadImageError

PATCH_SIZE = 96
PATCH_SHAPE = (PATCH_SIZE, PATCH_SIZE, 3)
LABEL_START, LABEL_SIDE = 32, 32  # the labelled centre: pixels [32, 64) in both axes
LABEL_END = LABEL_START + LABEL_SIDE
PATCH_MPP = 0.972  # microns per pixel: Camelyon16's 0.243 um/px level 0, downsampled 4x (PCam's 10x)


def label_box(crop: int | None = None, image_size: int = PATCH_SIZE) -> tuple[float, float]:
    """(start, side) in pixels of the labelled centre in a view of the patch cut to its centre
    `crop` px (data.crop) and resized to image_size."""
    crop = crop or PATCH_SIZE
    scale = image_size / crop
    return (LABEL_START - (PATCH_SIZE - crop) / 2) * scale, LABEL_SIDE * scale


def pixel_hash(patch: np.ndarray) -> str:
    """SHA-1 of a patch's raw pixels (96x96x3 uint8, row-major): every Kaggle id is this of its patch."""
    return hashlib.sha1(np.ascontiguousarray(patch, dtype=np.uint8).tobytes()).hexdigest()


def stamp(patch: np.ndarray, serial: int) -> np.ndarray:
    """A copy made unique by writing serial into its first two pixels (reused synthetic renders)."""
    out = patch.copy()
    out[0, 0] = (serial & 255, (serial >> 8) & 255, (serial >> 16) & 255)
    out[0, 1, 0] = (serial >> 24) & 255
    return out


def read_patch(path: str | Path) -> np.ndarray:
    """Decode one patch to a (96, 96, 3) uint8 array, or raise BadImageError saying why."""
    path = Path(path)
    if not path.is_file():
        raise BadImageError(path, "file is missing")
    try:
        with warnings.catch_warnings(), Image.open(path) as im:
            warnings.simplefilter("ignore")  # PIL's warnings on damaged files; we raise instead
            im.load()  # full decode: a truncated file fails here, not halfway through training
            if im.mode != "RGB":
                raise BadImageError(path, f"mode is {im.mode}, expected RGB")
            array = np.array(im)
    except BadImageError:
        raise
    except Exception as e:  # PIL raises several types for unreadable/truncated files
        raise BadImageError(path, f"cannot be decoded ({e})") from None
    if array.shape != PATCH_SHAPE:
        raise BadImageError(path, f"size is {array.shape[1]}x{array.shape[0]}, expected 96x96")
    return array
