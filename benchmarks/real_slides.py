"""Slides made of genuine Kaggle/PCam patches (../shared/data), and what the slide path does on them.

    python benchmarks/real_slides.py mask OUT [--slides 40] [slide.key=value ...]
        the tissue mask on real-patch slides of two layouts (a small section in much glass; tissue
        filling ~80% of the slide): the share of tissue patches kept (normal, tumour), the share
        of kept tiles that are glass
    python benchmarks/real_slides.py cohort OUT --slides 400 [--test-slides 60] [--seed 0]
        a cohort for slide-level runs: OUT/slides/*.tif, OUT/slides.csv (slide,label,patient) of
        the training cohort and OUT/test.csv of held-out slides whose patches no training slide
        shares (each slide 8 x 8 patches; a positive one holds a connected focus of 5 tumour
        patches)

Patches come from the two archives, unpacked (`tar xJf ../shared/data/pcam-real-*.tar.xz -C
/tmp`): --patches /tmp/pcam-real-more-5000 (the default: not the 2,000 a patch model trains on).
Glass is real too: one of the sample's flattest blank patches (no stained pixel, intensity SD <
2.3) per slide, mirrored over it; they are left out of the tissue pool. Level 0 is the patches' 0.972 um/px.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

ROOTS = ("/tmp/pcam-real-2000", "/tmp/pcam-real-more-5000")
GLASS_SD = 2.3  # a blank patch flatter than this is glass (dust and folds make the others)


def read_pool(root: str) -> tuple[pd.DataFrame, np.ndarray]:
    labels = pd.read_csv(f"{root}/train_labels.csv", dtype={"id": str})
    patches = np.stack([tifffile.imread(f"{root}/train/{i}.tif") for i in labels["id"]])
    return labels, patches


def split_glass(patches: np.ndarray) -> np.ndarray:
    """True where a patch is blank glass: no stained pixel (99th percentile of HSV saturation
    under 0.05) and nearly flat."""
    img = patches.astype(np.float32)
    sat = (img.max(-1) - img.min(-1)) / np.maximum(img.max(-1), 1)
    return (np.quantile(sat.reshape(len(img), -1), 0.99, axis=1) < 0.05) & (img.std(axis=(1, 2)).mean(1) < GLASS_SD)


def layouts(rng: np.random.Generator, kind: str) -> np.ndarray:
    """A tissue mask on a grid of patch cells: a small section in much glass (`section`), or an 8 x 8
    core filling ~80% of a 9 x 9 slide (`core`: glass in its first row and column)."""
    from cancernet.wsi.synthetic import section_grid

    if kind == "section":
        return section_grid(rng, (16, 16), int(rng.integers(24, 40)))
    tissue = np.zeros((9, 9), bool)
    tissue[1:, 1:] = True
    return tissue


def mask_benchmark(out: Path, slides: int, overrides: list[str], seed: int) -> dict:
    import dataclasses

    from cancernet.config import SlideConfig, parse_overrides
    from cancernet.data.patch import PATCH_MPP
    from cancernet.wsi.slide import plan_slide
    from cancernet.wsi.synthetic import write_patch_slide

    labels, patches = read_pool(ROOTS[1])
    glass = split_glass(patches)
    tissue_ids = np.flatnonzero(~glass)
    rng = np.random.default_rng(seed)
    settings = dataclasses.replace(SlideConfig(stride=96), **parse_overrides(overrides).get("slide", {}))
    counts = {k: {"normal": [0, 0], "tumour": [0, 0], "kept": 0, "kept_glass": 0} for k in ("section", "core")}
    for i in range(slides):
        kind = ("section", "core")[i % 2]
        tissue = layouts(rng, kind)
        grid = np.full(tissue.shape, -1)
        grid[tissue] = rng.choice(tissue_ids, tissue.sum(), replace=False)
        background = patches[rng.choice(np.flatnonzero(glass))]
        path = write_patch_slide(out / f"{kind}_{i:03d}.tif", grid, patches, background)
        plan, _ = plan_slide(path, PATCH_MPP, settings, tile=96)
        kept = plan.tissue[: grid.shape[0], : grid.shape[1]]
        c = counts[kind]
        for label, name in ((0, "normal"), (1, "tumour")):
            here = tissue & (labels["label"].to_numpy()[np.maximum(grid, 0)] == label)
            c[name][0] += int((kept & here).sum())
            c[name][1] += int(here.sum())
        c["kept"] += int(kept.sum())
        c["kept_glass"] += int((kept & ~tissue).sum())
    report = {
        kind: {
            "slides": slides // 2,
            "normal_kept": round(c["normal"][0] / max(c["normal"][1], 1), 4),
            "tumour_kept": round(c["tumour"][0] / max(c["tumour"][1], 1), 4),
            "glass_share_of_kept": round(c["kept_glass"] / max(c["kept"], 1), 4),
            "tissue_patches": c["normal"][1] + c["tumour"][1],
        }
        for kind, c in counts.items()
    }
    return {"settings": dataclasses.asdict(settings), **report}


def cohort(out: Path, slides: int, test_slides: int, seed: int, focus: int = 5) -> None:
    """Training-cohort slides from 70% of the pool's patches, held-out slides from the other 30%
    (no patch in both): 8 x 8 patches on a one-patch margin of real glass; a positive slide holds
    a connected focus of `focus` tumour patches among normal ones, a negative one normal patches
    only; two slides per patient, one of each label. Patches are drawn without replacement within
    a slide and with replacement across slides of one side."""
    from cancernet.wsi.synthetic import focus_cells, write_patch_slide

    labels, patches = read_pool(ROOTS[1])
    glass = split_glass(patches)
    rng = np.random.default_rng(seed)
    label = labels["label"].to_numpy()
    pools = {}
    for kind in (0, 1):
        ids = rng.permutation(np.flatnonzero((label == kind) & ~glass))
        cut = int(0.7 * len(ids))
        pools["train", kind], pools["test", kind] = ids[:cut], ids[cut:]
    tissue = np.zeros((10, 10), bool)
    tissue[1:9, 1:9] = True
    rows = []
    for side, count in (("train", slides), ("test", test_slides)):
        for i in range(count):
            positive = i % 2
            grid = np.full(tissue.shape, -1)
            grid[tissue] = rng.choice(pools[side, 0], tissue.sum(), replace=False)
            focal = focus_cells(rng, tissue, focus) if positive else np.zeros_like(tissue)
            grid[focal] = rng.choice(pools[side, 1], focal.sum(), replace=False)
            name = f"{side}_{i:04d}"
            background = patches[rng.choice(np.flatnonzero(glass))]
            write_patch_slide(out / "slides" / f"{name}.tif", grid, patches, background)
            rows.append({"slide": name, "label": positive, "patient": f"{side}_p{i // 2:04d}", "side": side})
    frame = pd.DataFrame(rows)
    frame[frame["side"] == "train"].drop(columns="side").to_csv(out / "slides.csv", index=False)
    frame[frame["side"] == "test"].drop(columns="side").to_csv(out / "test.csv", index=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["mask", "cohort"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--slides", type=int, default=40)
    parser.add_argument("--test-slides", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "mask":
        print(json.dumps(mask_benchmark(args.out, args.slides, args.overrides, args.seed)))
    else:
        cohort(args.out, args.slides, args.test_slides, args.seed)


if __name__ == "__main__":
    main()
