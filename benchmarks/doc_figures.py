"""Regenerate the figures in docs/img.

    python benchmarks/doc_figures.py RUN_DIR      # a finished run (docs use the real-sample cpu_real run)

- stain_augmentation.jpg: the 20 real fixture patches' first six under HED stain augmentation
  (configs/cpu_real.yaml's strength, and twice that), nothing else, so the stain effect shows alone
- example_report.png: six of RUN_DIR's report figures side by side
- example_gradcam.jpg, example_sample_grid.jpg, example_augmentation.jpg: RUN_DIR's figures
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from cancernet.config import load_config
from cancernet.data.augment import Augment
from cancernet.data.kaggle import read_patch
from cancernet.evaluate.grids import augmentation_grid

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
FIXTURE = ROOT / "tests" / "fixtures" / "pcam_real"


def stain_figure() -> None:
    cfg = load_config(ROOT / "configs" / "cpu_real.yaml")
    ids = pd.read_csv(FIXTURE / "train_labels.csv", dtype={"id": str})["id"].head(6)
    originals = np.stack([read_patch(FIXTURE / "train" / f"{i}.tif") for i in ids])
    images = torch.from_numpy(originals).permute(0, 3, 1, 2)
    views, labels = [], []
    for scale in (1, 2):
        data = dataclasses.replace(
            cfg.data,
            augment="none",
            jitter=0.0,
            hue=0.0,
            stain="hed",
            image_size=96,
            stain_sigma=cfg.data.stain_sigma * scale,
            stain_bias=cfg.data.stain_bias * scale,
            mean=[0.0, 0.0, 0.0],
            std=[1.0, 1.0, 1.0],
        )
        augment = Augment(data, seed=0)
        for epoch in range(3):
            out = augment(images, torch.arange(len(images)), epoch)
            views.append((out.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
            labels.append(f"{'x2, ' if scale == 2 else ''}draw {epoch + 1}")
    figure = augmentation_grid(
        originals,
        views,
        f"HED stain only (σ {cfg.data.stain_sigma:g}, bias "
        f"{cfg.data.stain_bias:g}; last three columns twice as strong), "
        "real PCam patches (tests/fixtures, CC0)",
    )
    for ax, label in zip(figure.axes[1 : len(views) + 1], labels):
        ax.set_title(label, fontsize=8)
    figure.savefig(IMG / "stain_augmentation.jpg", dpi=90, pil_kwargs={"quality": 85})  # photos: JPEG


def montage(run: Path) -> None:
    names = ["history_loss", "history_auc_lr", "confusion_matrix", "roc", "reliability", "prediction_distribution"]
    tiles = [Image.open(run / "report" / f"{n}.png").convert("RGB") for n in names]
    width = 440
    tiles = [t.resize((width, round(t.height * width / t.width))) for t in tiles]
    height = max(t.height for t in tiles)
    sheet = Image.new("RGB", (3 * width, 2 * height), "white")
    for k, tile in enumerate(tiles):
        sheet.paste(tile, ((k % 3) * width, (k // 3) * height))
    sheet.save(IMG / "example_report.png")
    for name in ("gradcam", "sample_grid", "augmentation"):  # photos: JPEG keeps the docs small
        Image.open(run / "report" / f"{name}.png").convert("RGB").save(IMG / f"example_{name}.jpg", quality=85)


if __name__ == "__main__":
    stain_figure()
    if len(sys.argv) > 1:
        montage(Path(sys.argv[1]))
