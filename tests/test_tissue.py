"""The tissue mask on slides made of genuine patches (tests/fixtures: 20 + 4 pale ones, and real
glass): it keeps the tissue, pale fat included, and drops the glass, whether the section is small
in much glass or fills most of the slide."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from cancernet.config import SlideConfig
from cancernet.data.patch import PATCH_MPP
from cancernet.wsi.slide import plan_slide
from cancernet.wsi.synthetic import section_grid, write_patch_slide

FIXTURES = Path(__file__).parent / "fixtures"


def real_patches() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(patches, labels, glass patches): the 20 of the real-format fixture and the 4 pale ones."""
    tables = [
        (FIXTURES / "pcam_real", pd.read_csv(FIXTURES / "pcam_real" / "train_labels.csv", dtype={"id": str})),
        (FIXTURES / "pcam_slide", pd.read_csv(FIXTURES / "pcam_slide" / "tissue_labels.csv", dtype={"id": str})),
    ]
    patches, labels = [], []
    for folder, table in tables:
        sub = "train" if folder.name == "pcam_real" else "tissue"
        patches += [tifffile.imread(folder / sub / f"{i}.tif") for i in table["id"]]
        labels += table["label"].tolist()
    glass = [tifffile.imread(p) for p in sorted((FIXTURES / "pcam_slide" / "glass").glob("*.tif"))]
    return np.stack(patches), np.array(labels), glass


def layout(kind: str, n: int) -> np.ndarray:
    """Where the n tissue patches go: a section of n cells in a 10 x 10 slide of glass, or a
    5 x 5 block filling 5/6 of a 6 x 5 slide (glass along its top)."""
    if kind == "section":
        return section_grid(np.random.default_rng(0), (10, 10), n)
    tissue = np.zeros((6, 5), bool)
    tissue[1:] = True
    return tissue


@pytest.mark.parametrize("kind", ["section", "core"])
@pytest.mark.parametrize("glass_index", [0, 1])
def test_the_tissue_mask_keeps_real_tissue_pale_fat_included_and_drops_the_glass(tmp_path, kind, glass_index):
    patches, labels, glass = real_patches()
    tissue = layout(kind, len(patches))
    grid = np.full(tissue.shape, -1)
    grid[tissue] = np.arange(tissue.sum()) % len(patches)  # the 5 x 5 block takes one patch twice
    path = write_patch_slide(tmp_path / "slide.tif", grid, patches, glass[glass_index])
    assert path.stat().st_size < 1_000_000  # a small slide
    plan, _ = plan_slide(path, PATCH_MPP, SlideConfig(stride=96), tile=96)  # 96 px tiles: one patch a cell
    kept = plan.tissue[: grid.shape[0], : grid.shape[1]]
    pale = np.isin(grid, np.arange(20, len(patches)))
    tumour = tissue & (labels[np.maximum(grid, 0)] == 1)
    assert kept[tissue].mean() >= 0.98 and kept[tumour].all(), np.argwhere(tissue & ~kept)
    assert kept[pale].all()  # fat and faint tissue, which a saturation threshold alone drops
    assert not (kept & ~tissue).any(), np.argwhere(kept & ~tissue)  # at most 1% of the kept tiles: none here
