"""predict-slide: a checkpoint over whole slides, sharded over ranks, one folder of outputs per slide.

Per slide, rank 0 plans (level, cells, tissue) and every rank scores its share of the blocks
with the project's evaluate loop (preprocessing, TTA, temperature, gather); rank 0 writes
OUT/<slide>/ atomically, so a folder of slides resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
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
from cancernet.runtime.distributed import DistInfo, broadcast_object
from cancernet.runtime.errors import DataError, UserError
from cancernet.wsi.slide import SLIDE_SUFFIXES, Plan, level0_mpp, plan_slide, write_pyramid
from cancernet.wsi.tiles import UNREADABLE, SlideTiles, Waited, cat_blocks

log = logging.getLogger(__name__)
RESULT = "slide.json"  # written last: its presence marks a slide done


@dataclass
class Scorer:
    """What is the same for every slide: the model and how its scores are made and read."""

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


def list_slides(inputs: list[str]) -> list[Path]:
    """Slide files, and the slides of folders (by suffix, sorted); one name (stem) per slide."""
    slides = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file())
            if not found:
                raise DataError(f"no slides ({', '.join(SLIDE_SUFFIXES)}) in {item}")
            slides += found
        elif item.exists():
            slides.append(item)
        else:
            raise DataError(f"slide {item} does not exist")
    names: dict[str, Path] = {}
    for p in slides:
        if p.stem in names and names[p.stem] != p:
            raise DataError(f"slides {names[p.stem]} and {p} share the name {p.stem!r}: their outputs would collide")
        names[p.stem] = p
    return list(names.values())


def score_slide(scorer: Scorer, plan: Plan) -> tuple[SlideTiles, dict, float]:
    """Every rank: score its blocks; all ranks get every tile's probability (in tile order)."""
    s, dist = scorer.cfg.slide, scorer.dist
    tiles = SlideTiles(plan, s.block)
    batch = max(1, scorer.batch_size // s.block**2)
    loader = Waited(scoring_loader(tiles, dist, batch, scorer.num_workers, collate_fn=cat_blocks))
    from cancernet.runtime.console import progress_bar

    bar = progress_bar(scorer.cfg.train.progress, dist.is_main, len(loader), Path(plan.path).stem)
    try:
        rows = evaluate(
            scorer.model, loader, scorer.preprocess, dist, scorer.amp, scorer.tta, scorer.temperature, progress=bar
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
    """Rank 0: every file into a temporary folder, renamed to OUT/<slide> when complete."""
    from cancernet.wsi.figures import heatmap_figure

    prob = heatmap[tiles.rows, tiles.cols]
    tmp = target.with_name(f".{target.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
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
    if target.exists():  # an earlier, unfinished attempt's leftovers (complete folders were skipped)
        shutil.rmtree(target)
    os.replace(tmp, target)


def overlay_rgba(heatmap: np.ndarray) -> np.ndarray:
    """The map coloured (transparent outside tissue), one pixel per cell, for QuPath's overlay."""
    from matplotlib import colormaps

    rgba = colormaps["inferno"](np.nan_to_num(heatmap, nan=0.0), bytes=True)
    rgba[..., 3] = np.where(np.isfinite(heatmap), 255, 0)
    return rgba


def done_before(target: Path, settings: dict) -> str | None:
    """'skipped' when target holds a complete result made with these settings."""
    try:
        saved = json.loads((target / RESULT).read_text()).get("settings")
    except (OSError, ValueError):
        return None
    if saved == settings:
        return "skipped"
    changed = sorted(k for k in settings if saved is None or saved.get(k) != settings[k])
    log.info("slide %s: done before with other settings (%s); predicting it again", target.name, ", ".join(changed))
    return None


def predict_slides(
    scorer: Scorer,
    slides: list[Path],
    out: Path,
    mpp: float | None = None,
    tiff: bool = False,
    geojson: bool = False,
) -> dict[str, list]:
    """Each slide not yet done; a bad slide costs one line and the others are still done."""
    dist, done = scorer.dist, {"done": [], "skipped": [], "failed": []}
    out = Path(out)
    for path in slides:
        target, state, start = out / path.stem, None, time.perf_counter()
        if dist.is_main:
            try:  # the resolution the slide is read at is one of its settings: --mpp, else its metadata
                state = done_before(target, scorer.settings(level0_mpp(path, mpp)))
                if state is None:
                    plan, thumb = plan_slide(path, scorer.train_mpp, scorer.cfg.slide, mpp)
            except UserError as e:
                state = str(e)
        state = broadcast_object(state, dist)
        if state == "skipped":
            log.info("slide %s: done before (%s), skipped", path, target / RESULT)
            done["skipped"].append(path)
            continue
        if state is not None:
            log.error("%s", state)
            done["failed"].append((path, state))
            continue
        plan = broadcast_object(plan if dist.is_main else None, dist)
        tiles, rows, wait_s = score_slide(scorer, plan)
        bad = np.flatnonzero(rows["label"] == UNREADABLE)
        if len(bad):
            x, y = plan.tile_origin(tiles.rows[bad[0]], tiles.cols[bad[0]])
            message = (
                f"slide {path}: OpenSlide could not read {len(bad)} of {len(rows['label'])} tiles, the first at "
                f"level-0 ({x}, {y}): truncated or corrupt?"
            )
            log.error("%s", message)
            done["failed"].append((path, message))
            continue
        if dist.is_main:
            heatmap = np.full(plan.shape, np.nan, dtype=np.float32)
            heatmap[tiles.rows, tiles.cols] = rows["prob"]
            summary = summarise(scorer, plan, heatmap, time.perf_counter() - start, wait_s, tiles.read_share())
            write_outputs(target, plan, thumb, tiles, heatmap, summary, tiff, geojson)
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
        done["done"].append(path)
    return done
