"""docs/img/tissue_mask.png: what the tissue mask keeps on a slide of real patches, and what its
slide.* settings change.

    python benchmarks/tissue_figure.py

The slide: the 24 real patches of tests/fixtures (4 of them pale fat and faint tissue) filling
most of a 6 x 5 slide of real glass, one patch a cell (96 px tiles at the patches' 0.972 um/px).
Each panel marks in green the cells the mask would score, with the shipped settings and with one
setting changed.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_tissue import layout, real_patches  # noqa: E402

from cancernet.config import SlideConfig  # noqa: E402
from cancernet.data.patch import PATCH_MPP  # noqa: E402
from cancernet.wsi.slide import plan_slide  # noqa: E402
from cancernet.wsi.synthetic import write_patch_slide  # noqa: E402

PANELS = [
    ("shipped: stained or textured", {}),
    ("slide.min_texture=0: stained only", {"min_texture": 0.0}),
    ("slide.min_saturation=0.15: stained more", {"min_saturation": 0.15, "min_texture": 0.0}),
    ("slide.min_tissue=0.9: cells nearly full", {"min_tissue": 0.9}),
]


def main() -> None:
    patches, _, glass = real_patches()
    tissue = layout("core", len(patches))
    grid = np.full(tissue.shape, -1)
    grid[tissue] = np.arange(tissue.sum()) % len(patches)
    pale = np.isin(grid, np.arange(20, len(patches)))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_patch_slide(Path(tmp) / "slide.tif", grid, patches, glass[0])
        image = np.asarray(Image.open(path).convert("RGB"))
        fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 4.6))
        for ax, (title, change) in zip(axes, PANELS):
            settings = dataclasses.replace(SlideConfig(stride=96), **change)
            kept = plan_slide(path, PATCH_MPP, settings, tile=96)[0].tissue[: grid.shape[0], : grid.shape[1]]
            ax.imshow(image)
            for r, c in np.argwhere(kept):
                ax.add_patch(plt.Rectangle((c * 96, r * 96), 96, 96, color="lime", alpha=0.25, lw=0))
            for r, c in np.argwhere(pale):
                ax.add_patch(plt.Rectangle((c * 96 + 2, r * 96 + 2), 92, 92, fill=False, ec="orange", lw=2))
            lost = int((tissue & ~kept).sum())
            ax.set_title(
                f"{title}\n{int(kept[tissue].sum())}/{int(tissue.sum())} tissue cells, {lost} lost", fontsize=9
            )
            ax.axis("off")
        fig.suptitle("green: scored cells; orange: pale tissue (fat, faint stain); top row: glass", fontsize=10)
        fig.tight_layout()
        fig.savefig(ROOT / "docs" / "img" / "tissue_mask.png", dpi=80)


if __name__ == "__main__":
    main()
