"""predict-slide with a patch checkpoint: a tumour heatmap over each whole slide, one folder of
outputs per slide.

The slides are dealt over the ranks (wsi/driver.py); per slide, its rank plans it (level, cells,
tissue), scores every tissue tile with the project's evaluate loop (preprocessing, TTA,
temperature) and writes OUT/<slide>/ atomically, so a folder of slides resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from cancernet.config import Config
from cancernet.engine import checkpoint
from cancernet.engine.inference import Predictor, preprocessing, scoring_loader
from cancernet.engine.predict import evaluate
from cancernet.runtime.atomic import atomic_dir
from cancernet.runtime.distributed import DistInfo
from cancernet.runtime.errors import DataError, UserError
from cancernet.wsi.driver import RESULT, done_before
from cancernet.wsi.slide import Plan, level0_mpp, plan_slide, write_pyramid
from cancernet.wsi.tiles import UNREADABLE, SlideTiles, Waited, cat_blocks

log = logging.getLogger(__name__)


@dataclass
class Scorer:
    """A patch checkpoint as a slide scorer: the model and how its scores are made and read,
    the same for every slide. What predict-slide and evaluate-slides call (its job, per folder)."""

    model: nn.Module
    cfg: Config
    dist: DistInfo
    checkpoint: str
    train_mpp: float
    amp: str = "off"
    tta: bool = False
    temperature: float = 1.0
    threshold: float | None = None
    batch_size: int = 256
    num_workers: int = 4
    checkpoint_sha256: str | None = None  # of the file: a checkpoint retrained at the same path differs
    tiff: bool = False  # also heatmap.tif
    geojson: bool = False  # also tumour.geojson

    cell_map = "heatmap.npy"  # what evaluate-slides compares with tumour masks
    cells_scored_by = "P(tumour)"

    @property
    def score_kind(self) -> str:
        return self.cfg.slide.score

    def job(self, out: Path, mpp: float | None = None) -> HeatmapJob:
        return HeatmapJob(self, Path(out), mpp)

    def settings(self, mpp: float) -> dict:
        """What a slide's outputs depend on besides the slide: a done slide is skipped only when its
        slide.json holds these same settings (another checkpoint, the same one retrained, or
        another stride predicts it again)."""
        path = Path(self.checkpoint)
        return {
            "checkpoint": str(path.resolve()) if path.is_file() else self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "train_mpp": self.train_mpp,
            "mpp": mpp,
            "tta": self.tta,
            "temperature": self.temperature,
            "threshold": self.threshold,
            "slide": dataclasses.asdict(self.cfg.slide),
        }

    @property
    def preprocess(self) -> nn.Module:
        return preprocessing(self.cfg, self.dist.device)


def train_mpp_of(ckpt: checkpoint.Checkpoint, override: float | None) -> float:
    """The patch resolution the checkpoint was trained at; older checkpoints do not record it."""
    if override is not None:
        return float(override)
    data = ckpt.config_dict.get("data", {})
    if data.get("mpp") is None:
        raise UserError(
            f"checkpoint {ckpt.path} does not record the resolution it was trained at (data.mpp; saved by an "
            "older cancernet): pass --train-mpp (0.972 for Kaggle/PCam patches)"
        )
    return float(data["mpp"])


def load_scorer(
    path: str | Path,
    dist: DistInfo,
    overrides: list[str],
    train_mpp: float | None,
    ckpt: checkpoint.Checkpoint | None = None,
    **kwargs,
) -> Scorer:
    """A Scorer for a checkpoint (ckpt: as read_on_main read it already); overrides (slide.*=...,
    train.progress=...) adjust its config."""
    predictor = Predictor.load(path, dist, overrides, kwargs.pop("calibrated", True), ckpt)
    threshold = kwargs.pop("threshold", None)
    if threshold is None:
        try:
            threshold = predictor.threshold(kwargs.get("tta", False))
        except UserError as e:
            log.warning("tumour area not measured: %s", e)
    return Scorer(
        model=predictor.model,
        cfg=predictor.cfg,
        dist=dist,
        checkpoint=str(path),
        checkpoint_sha256=predictor.sha256,
        train_mpp=train_mpp_of(predictor.ckpt, train_mpp),
        temperature=predictor.temperature,
        threshold=threshold,
        **kwargs,
    )


def score_slide(scorer: Scorer, plan: Plan) -> tuple[SlideTiles, dict, float]:
    """Every tile's probability (in tile order), read and scored by this rank alone."""
    s, dist = scorer.cfg.slide, scorer.dist
    tiles = SlideTiles(plan, s.block)
    batch = max(1, scorer.batch_size // s.block**2)
    here = DistInfo(device=dist.device)  # the whole slide on this rank
    loader = Waited(scoring_loader(tiles, here, batch, scorer.num_workers, collate_fn=cat_blocks))
    from cancernet.runtime.console import progress_bar

    bar = progress_bar(scorer.cfg.train.progress, dist.is_main, len(loader), Path(plan.path).stem)
    try:
        rows = evaluate(
            scorer.model, loader, scorer.preprocess, here, scorer.amp, scorer.tta, scorer.temperature, progress=bar
        )
    finally:
        if bar is not None:
            bar.close()
    return tiles, rows, loader.seconds


def summarise(
    scorer: Scorer, plan: Plan, heatmap: np.ndarray, seconds: float, wait_s: float, read_share: float
) -> dict:
    s = scorer.cfg.slide
    probs = np.sort(heatmap[np.isfinite(heatmap)])[::-1]
    top = probs[: s.top_k]
    cell_mm2 = (plan.cell_um / 1000) ** 2
    tumour = None if scorer.threshold is None else int((probs >= scorer.threshold).sum())
    out = {
        "slide": plan.path,
        "score": float(top.mean() if s.score == "top_k_mean" else probs[0]),
        "score_kind": s.score,
        "max": float(probs[0]),
        "top_k": s.top_k,
        "top_k_mean": float(top.mean()),
        "threshold": scorer.threshold,
        "tumour_cells": tumour,
        "tumour_area_mm2": None if tumour is None else tumour * cell_mm2,
        "tissue_cells": int(len(probs)),
        "tissue_area_mm2": len(probs) * cell_mm2,
        "tiles": int(len(probs)),
        "seconds": seconds,
        "tiles_per_s": len(probs) / max(seconds, 1e-9),
        "reader_wait_s": wait_s,
        "pixels_read_per_cell_pixel": read_share,
        "mpp": plan.mpp,
        "train_mpp": plan.train_mpp,
        "level": plan.level,
        "downsample": plan.downsample,
        "dimensions": list(plan.dimensions),
        "stride": plan.stride,
        "cell_um": plan.cell_um,
        "grid": list(plan.shape),
        "tta": scorer.tta,
        "temperature": scorer.temperature,
        "checkpoint": scorer.checkpoint,
        "world_size": scorer.dist.world_size,
        "settings": scorer.settings(plan.mpp),
    }
    return out


def write_outputs(
    target: Path, plan: Plan, thumb, tiles: SlideTiles, heatmap: np.ndarray, summary: dict, tiff: bool, geojson: bool
):
    """Every file into a temporary folder, renamed to OUT/<slide> when complete."""
    with atomic_dir(target) as tmp:
        _write_outputs(tmp, plan, thumb, tiles, heatmap, summary, tiff, geojson)


def _write_outputs(tmp: Path, plan: Plan, thumb, tiles: SlideTiles, heatmap: np.ndarray, summary: dict, tiff, geojson):
    from cancernet.wsi.figures import heatmap_figure

    prob = heatmap[tiles.rows, tiles.cols]
    np.save(tmp / "heatmap.npy", heatmap)
    x, y = plan.tile_origin(tiles.rows, tiles.cols)
    frame = pd.DataFrame({"x": x, "y": y, "row": tiles.rows, "col": tiles.cols, "prob": prob})
    frame.to_csv(tmp / "tiles.csv", index=False, float_format="%.6g")
    thumb.save(tmp / "thumbnail.jpg", quality=90)
    heatmap_figure(tmp / "heatmap.png", thumb, heatmap, summary)
    if tiff:
        write_pyramid(tmp / "heatmap.tif", overlay_rgba(heatmap), plan.cell_um)
    if geojson and summary["threshold"] is not None:  # regions at the operating point, for QuPath
        from cancernet.wsi.geojson import tumour_regions

        (tmp / "tumour.geojson").write_text(json.dumps(tumour_regions(heatmap, summary["threshold"], plan)))
    (tmp / RESULT).write_text(json.dumps(summary, indent=2))


def overlay_rgba(heatmap: np.ndarray) -> np.ndarray:
    """The map coloured (transparent outside tissue), one pixel per cell, for QuPath's overlay."""
    from matplotlib import colormaps

    rgba = colormaps["inferno"](np.nan_to_num(heatmap, nan=0.0), bytes=True)
    rgba[..., 3] = np.where(np.isfinite(heatmap), 255, 0)
    return rgba


@dataclass
class HeatmapJob:
    """predict-slide of one slide into OUT/<slide>/ (the slide driver's job)."""

    scorer: Scorer
    out: Path
    mpp: float | None = None  # --mpp: level 0's microns per pixel, for slides lacking it

    def size(self, path: Path) -> int:
        scorer = self.scorer
        if done_before(self.out / path.stem, scorer.settings(level0_mpp(path, self.mpp))):
            return 0
        plan, _ = plan_slide(path, scorer.train_mpp, scorer.cfg.slide, self.mpp)
        return int(plan.tissue.sum())

    def run(self, path: Path) -> dict:
        """The slide's heatmap and outputs, unless done before with the same settings; its row."""
        scorer, target, start = self.scorer, self.out / path.stem, time.perf_counter()
        row = {"slide": path.stem, "path": str(path)}
        if done_before(target, scorer.settings(level0_mpp(path, self.mpp))):
            log.info("slide %s: done before (%s), skipped", path, target / RESULT)
            return {**row, "status": "skipped"}
        plan, thumb = plan_slide(path, scorer.train_mpp, scorer.cfg.slide, self.mpp)
        tiles, rows, wait_s = score_slide(scorer, plan)
        bad = np.flatnonzero(rows["label"] == UNREADABLE)
        if len(bad):
            x, y = plan.tile_origin(tiles.rows[bad[0]], tiles.cols[bad[0]])
            raise DataError(
                f"slide {path}: OpenSlide could not read {len(bad)} of {len(rows['label'])} tiles, the first at "
                f"level-0 ({x}, {y}): truncated or corrupt?"
            )
        heatmap = np.full(plan.shape, np.nan, dtype=np.float32)
        heatmap[tiles.rows, tiles.cols] = rows["prob"]
        summary = summarise(scorer, plan, heatmap, time.perf_counter() - start, wait_s, tiles.read_share())
        write_outputs(target, plan, thumb, tiles, heatmap, summary, scorer.tiff, scorer.geojson)
        log.info(
            "slide %s: %d tiles in %.1fs (%.0f tiles/s, reader wait %.0f%%); max %.3f, top-%d mean %.3f%s -> %s",
            path.name,
            summary["tiles"],
            summary["seconds"],
            summary["tiles_per_s"],
            100 * wait_s / max(summary["seconds"], 1e-9),
            summary["max"],
            summary["top_k"],
            summary["top_k_mean"],
            "" if summary["tumour_area_mm2"] is None else f", tumour {summary['tumour_area_mm2']:.3f} mm2",
            target,
        )
        return {
            **row,
            "status": "done",
            "tiles": summary["tiles"],
            "score": summary["score"],
            "seconds": summary["seconds"],
        }
