"""predict-slide with a slide-level (MIL) checkpoint: each slide's probability, and where the model looked.

The MIL checkpoint's best.pt names the features it was trained on (extract-features' settings:
the backbone, its weights' fingerprint, the tiles and their resolution, the tissue mask). Per
slide, those same tiles go through that same backbone (rebuilt and checked against the
fingerprint), the MIL model reads the bag, and OUT/<slide>/ gets

    slide.json     slide_prob, the label at the checkpoint's validation-chosen operating point,
                   attention statistics, the top tiles, timings, the settings it was made with
    tiles.csv      x, y (level-0 corner), row, col, attention (softmax weights: they sum to 1),
                   and prob: the patch model's P(tumour) when the backbone is a trained checkpoint
    attention.png  the attention over the thumbnail, beside the patch heatmap when there is one
    attention.npy  the attention relative to its maximum on the tile grid (NaN outside tissue);
    heatmap.npy    the patch heatmap on the same grid, when there is one
    thumbnail.jpg

written to a temporary folder and renamed; a slide done before with the same settings is
skipped. Slides are dealt out over the ranks by the slide driver (wsi/driver.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from cancernet.config import Config, SlideConfig
from cancernet.data.tile_features import TileSettings
from cancernet.engine import checkpoint
from cancernet.engine.predict import autocast
from cancernet.models.mil import build_mil
from cancernet.runtime.atomic import atomic_dir
from cancernet.runtime.distributed import DistInfo
from cancernet.runtime.errors import UserError
from cancernet.wsi.driver import RESULT, done_before
from cancernet.wsi.extract import TISSUE_KEYS, Encoder, Reading, SlideFeatures, encoder_of, plan_tiles, slide_features
from cancernet.wsi.slide import level0_mpp

log = logging.getLogger(__name__)
TOP_TILES = 5  # listed in slide.json


@dataclass
class SlideModel:
    """A slide-level (MIL) checkpoint with the backbone its features came from, as a slide scorer:
    what predict-slide and evaluate-slides call (its job, per folder)."""

    model: nn.Module
    cfg: Config
    dist: DistInfo
    checkpoint: str
    checkpoint_sha256: str
    encoder: Encoder
    features: TileSettings  # extract-features' settings the model was trained on
    threshold: float | None
    temperature: float = 1.0
    amp: str = "off"
    batch_size: int = 256
    num_workers: int = 4

    cell_map = "attention.npy"  # what evaluate-slides compares with tumour masks: where it looked
    cells_scored_by = "attention"
    tta = False

    @property
    def score_kind(self) -> str:
        return f"mil:{self.cfg.model.mil}"

    @property
    def slide_cfg(self) -> SlideConfig:
        """Tiles and tissue mask exactly as in the training features."""
        tissue = {k: v for k, v in (self.features.tissue or {}).items() if k in TISSUE_KEYS}
        return dataclasses.replace(SlideConfig(), stride=self.features.stride, **tissue)

    def settings(self, mpp: float) -> dict:
        """What a slide's outputs depend on besides the slide (a done slide with the same is skipped)."""
        return {
            "checkpoint": str(Path(self.checkpoint).resolve()),
            "checkpoint_sha256": self.checkpoint_sha256,
            "features": self.features.to_dict(),
            "mpp": mpp,
            "threshold": self.threshold,
            "temperature": self.temperature,
        }

    def job(self, out: Path, mpp: float | None = None) -> DiagnosisJob:
        return DiagnosisJob(self, Path(out), mpp)


def load_slide_model(
    ckpt: checkpoint.Checkpoint,
    dist: DistInfo,
    backbone: str | None = None,
    threshold: float | None = None,
    calibrated: bool = True,
    **kwargs,
) -> SlideModel:
    """ckpt from checkpoint.read_on_main (with its sha256); a collective under torchrun."""
    recorded, dim = ckpt.get(checkpoint.FEATURES) or {}, ckpt.get(checkpoint.FEATURE_DIM)
    if dim is None:
        raise UserError(f"slide-level checkpoint {ckpt.path} does not record its features' dimension")
    made = TileSettings.from_dict(recorded, f"slide-level checkpoint {ckpt.path}")
    cfg = ckpt.config()
    model = build_mil(cfg.model.mil, int(dim)).to(dist.device)
    checkpoint.load_weights_on_main(ckpt, model, dist)
    encoder = encoder_of(made, dist, backbone)
    if threshold is None:
        point = ckpt.operating_point(False)
        threshold = None if point is None else float(point["threshold"])
        if threshold is None:
            log.warning("MIL checkpoint %s holds no operating point: slides get a probability, no label", ckpt.path)
    temperature = ckpt.temperature(calibrated)
    return SlideModel(
        model.eval(), cfg, dist, str(ckpt.path), ckpt.get("sha256"), encoder, made, threshold, temperature, **kwargs
    )


def score_bag(sm: SlideModel, features: np.ndarray) -> tuple[float, np.ndarray]:
    """The slide's probability (at the checkpoint's temperature) and each tile's attention weight
    (softmax: they sum to 1)."""
    device = sm.dist.device
    with torch.no_grad(), autocast(device, sm.amp):
        logit, attention = sm.model(torch.from_numpy(features.astype(np.float32))[None].to(device))
    weights = torch.softmax(attention.float()[0], 0).cpu().numpy()
    return float(torch.sigmoid(logit.float()[0] / sm.temperature)), weights


def summarise(sm: SlideModel, path: Path, found: SlideFeatures, prob: float, weights: np.ndarray, mpp: float) -> dict:
    plan, coords = found.plan, found.coords
    top = np.argsort(-weights)[:TOP_TILES]
    entropy = float(-(weights * np.log(np.clip(weights, 1e-12, None))).sum() / max(math.log(len(weights)), 1e-12))
    label = None if sm.threshold is None else int(prob >= sm.threshold)
    return {
        "slide": str(path),
        "slide_prob": prob,
        "threshold": sm.threshold,
        "slide_label": label,
        "score": prob,  # what slide-level readers (evaluate-slides, aggregate scripts) read
        "score_kind": sm.score_kind,
        "temperature": sm.temperature,
        "attention_max": float(weights.max()),
        "attention_entropy": entropy,
        "top_tiles": [
            {"x": int(coords[i, 0]), "y": int(coords[i, 1]), "attention": float(weights[i])}
            | ({} if found.log_odds is None else {"prob": float(1 / (1 + np.exp(-found.log_odds[i])))})
            for i in top
        ],
        "tiles": int(len(weights)),
        "seconds": found.seconds,
        "reader_wait_s": found.wait_s,
        "mpp": plan.mpp,
        "tile_mpp": plan.train_mpp,
        "tile": plan.tile,
        "level": plan.level,
        "dimensions": list(plan.dimensions),
        "grid": list(plan.shape),
        "cell_um": plan.cell_um,
        "checkpoint": sm.checkpoint,
        "backbone": sm.encoder.name,
        "patch_heatmap": found.log_odds is not None,
        "settings": sm.settings(mpp),
    }


def write_outputs(target: Path, found: SlideFeatures, weights: np.ndarray, summary: dict) -> None:
    """Every file into a temporary folder, renamed to target when complete."""
    with atomic_dir(target) as tmp:
        _write_outputs(tmp, found, weights, summary)


def _write_outputs(tmp: Path, found: SlideFeatures, weights: np.ndarray, summary: dict) -> None:
    from cancernet.wsi.figures import attention_figure

    tiles, plan = found.tiles, found.plan
    grid = np.full(plan.shape, np.nan, dtype=np.float32)
    grid[tiles.rows, tiles.cols] = weights / weights.max()
    np.save(tmp / "attention.npy", grid)
    frame = pd.DataFrame({"x": found.coords[:, 0], "y": found.coords[:, 1], "row": tiles.rows, "col": tiles.cols})
    frame["attention"] = weights
    heatmap = None
    if found.log_odds is not None:
        frame["prob"] = 1 / (1 + np.exp(-found.log_odds.astype(np.float64)))
        heatmap = np.full(plan.shape, np.nan, dtype=np.float32)
        heatmap[tiles.rows, tiles.cols] = frame["prob"].to_numpy()
        np.save(tmp / "heatmap.npy", heatmap)
    frame.to_csv(tmp / "tiles.csv", index=False, float_format="%.6g")
    found.thumb.save(tmp / "thumbnail.jpg", quality=90)
    attention_figure(tmp / "attention.png", found.thumb, grid, heatmap, summary)
    (tmp / RESULT).write_text(json.dumps(summary, indent=2))


@dataclass
class DiagnosisJob:
    """predict-slide of one slide with a slide-level model into OUT/<slide>/ (the slide driver's job)."""

    model: SlideModel
    out: Path
    mpp: float | None = None  # --mpp: level 0's microns per pixel, for slides lacking it

    @property
    def reading(self) -> Reading:
        sm = self.model
        return Reading(sm.slide_cfg, self.mpp, sm.batch_size, sm.num_workers, sm.amp)

    def size(self, path: Path) -> int:
        if done_before(self.out / path.stem, self.model.settings(level0_mpp(path, self.mpp))):
            return 0
        return int(plan_tiles(self.model.encoder, path, self.reading)[0].tissue.sum())

    def run(self, path: Path) -> dict:
        """The slide's probability, attention and outputs, unless done before with the same settings."""
        sm, target, start = self.model, self.out / path.stem, time.perf_counter()
        row = {"slide": path.stem, "path": str(path)}
        slide_mpp = level0_mpp(path, self.mpp)
        if done_before(target, sm.settings(slide_mpp)):
            log.info("slide %s: done before (%s), skipped", path, target / RESULT)
            return {**row, "status": "skipped"}
        found = slide_features(sm.encoder, path, self.reading, sm.dist.device, scores=sm.encoder.source == "checkpoint")
        prob, weights = score_bag(sm, found.features)
        summary = summarise(sm, path, found, prob, weights, slide_mpp)
        summary["seconds"] = time.perf_counter() - start
        write_outputs(target, found, weights, summary)
        log.info(
            "slide %s: %d tiles in %.1fs (reader wait %.0f%%); P(tumour) %.3f%s, highest attention %.3f -> %s",
            path.name,
            summary["tiles"],
            summary["seconds"],
            100 * found.wait_s / max(summary["seconds"], 1e-9),
            prob,
            "" if summary["slide_label"] is None else f" -> {'tumour' if summary['slide_label'] else 'no tumour'}",
            summary["attention_max"],
            target,
        )
        return {**row, "status": "done", "tiles": summary["tiles"], "score": prob, "seconds": summary["seconds"]}
