"""The patch geometry, in one place: Kaggle/PCam patches are 96x96 RGB uint8, and their label is
about the centre 32x32 (label 1: tumour tissue there)."""

from __future__ import annotations

PATCH_SIZE = 96
PATCH_SHAPE = (PATCH_SIZE, PATCH_SIZE, 3)
LABEL_START, LABEL_SIDE = 32, 32  # the labelled centre: pixels [32, 64) in both axes
LABEL_END = LABEL_START + LABEL_SIDE


def label_box(crop: int | None = None, image_size: int = PATCH_SIZE) -> tuple[float, float]:
    """(start, side) in pixels of the labelled centre in a view of the patch cut to its centre
    `crop` px (data.crop) and resized to image_size."""
    crop = crop or PATCH_SIZE
    scale = image_size / crop
    return (LABEL_START - (PATCH_SIZE - crop) / 2) * scale, LABEL_SIDE * scale
