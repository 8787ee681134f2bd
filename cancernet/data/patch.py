"""The patch geometry, in one place: Kaggle/PCam patches are 96x96 RGB uint8, and their label is
about the centre 32x32 (label 1: tumour tissue there)."""

from __future__ import annotations

import hashlib

import numpy as np

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
