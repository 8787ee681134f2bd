"""`extract-features`: a folder of slides to one feature file per slide, for slide-level (MIL) models.

Each slide's tissue (the tissue mask predict-slide uses) is cut into tiles of `tile` px at
`tile_mpp` microns per pixel (non-overlapping when stride = tile), and a backbone turns each tile
into a feature vector. Per slide, <out>/<slide>.h5 holds

    features  (N, D) float16   the backbone's features of each tile
    coords    (N, 2) int64     level-0 (x, y) of each tile's top-left corner
    attrs     settings (JSON: backbone, its fingerprint, preprocessing, mpp, tile, stride, the
              level read), slide, tiles, seconds

written under a temporary name and renamed, so a file is whole or absent. A slide whose file
holds the same settings is skipped: a stopped run continues where it was. Slides are dealt out
over all ranks of all nodes (rank r takes slides r, r + world, ...), each rank reading its
slide's tiles in loader workers; a bad slide costs one line and the others are still done.
<out>/slides.csv lists every slide of the run: tiles, seconds, status.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from cancernet.config import Config, SlideConfig
from cancernet.data.augment import Preprocess
from cancernet.engine.inference import Predictor, preprocessing, scoring_loader
from cancernet.engine.predict import autocast
from cancernet.models.classifier import build_model, embed, resolve_preprocessing, tumour_log_odds
from cancernet.runtime.atomic import atomic_path, write_text
from cancernet.runtime.distributed import DistInfo, gather_objects
from cancernet.runtime.errors import UserError
from cancernet.wsi.slide import Plan, plan_slide
from cancernet.wsi.tiles import UNREADABLE, SlideTiles, Waited, cat_blocks

log = logging.getLogger(__name__)
HUB_MPP = 0.5  # microns per pixel foundation models are trained at (20x)
TISSUE_KEYS = ("tissue_mpp", "min_saturation", "fill_holes_um2", "min_tissue")  # slide.* the tiles depend on


@dataclass
class Encoder:
    """A backbone with its preprocessing, and what the features depend on."""

    model: nn.Module  # a PatchClassifier: its features are what its head receives
    cfg: Config
    name: str  # --arch, or the checkpoint's path
    fingerprint: str  # sha256 of the backbone's weights (a checkpoint's, or the pretrained ones)
    tile_mpp: float
    tile: int
    source: str = "arch"  # or "checkpoint": a trained patch model, whose head also scores the tiles
    temperature: float = 1.0  # the checkpoint's, for its patch scores
    preprocess: Preprocess = field(repr=False, default=None)

    def settings(self, stride: int) -> dict:
        d = self.cfg.data
        return {
            "backbone": self.name,
            "source": self.source,
            "arch": self.cfg.model.arch,
            **({"model": dataclasses.asdict(self.cfg.model)} if self.source == "arch" else {}),
            "fingerprint": self.fingerprint,
            "preprocessing": {"mean": d.mean, "std": d.std, "image_size": d.image_size},
            "tile_mpp": self.tile_mpp,
            "tile": self.tile,
            "stride": stride,
        }


@dataclass
class Reading:
    """How a slide's tiles are read and run: the tissue mask and tiling (slide.*: stride, block,
    tissue), the level-0 resolution where the slide lacks it (--mpp), the batch, the reader
    processes and the precision."""

    slide: SlideConfig
    mpp: float | None = None
    batch_size: int = 256
    num_workers: int = 4
    amp: str = "off"


def _weights_sha256(model: nn.Module) -> str:
    """sha256 of the weights the features depend on: the classifier's, less its head (which only
    scores them; a random head of --arch, or a head retrained on a frozen backbone, changes nothing)."""
    head = next(name for name, module in model.named_modules() if module is model.head)
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name.startswith(f"{head}."):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_encoder(
    dist: DistInfo,
    checkpoint: str | None = None,
    cfg: Config | None = None,
    tile_mpp: float | None = None,
    tile: int | None = None,
) -> Encoder:
    """A trained patch model's backbone (checkpoint: its data.mpp and 96 px tiles by default), or
    cfg.model.arch with its pretrained weights (HUB_MPP and the weights' input size by default).
    A collective under torchrun."""
    if checkpoint is not None:
        predictor = Predictor.load(checkpoint, dist)
        c = predictor.cfg
        mpp = tile_mpp or c.data.mpp
        if mpp is None:
            raise UserError(f"checkpoint {checkpoint} does not record data.mpp: pass --tile-mpp")
        encoder = Encoder(
            predictor.model,
            c,
            str(Path(checkpoint).resolve()),
            _weights_sha256(predictor.model),  # not the file's: evaluate adds to it, the weights stay
            float(mpp),
            tile or 96,
            source="checkpoint",
            temperature=predictor.temperature,
        )
    else:
        cfg, _ = resolve_preprocessing(cfg)
        torch.manual_seed(0)  # the same weights on every rank where nothing pretrained is loaded
        model = build_model(cfg.model, cfg.data.image_size).to(dist.device).eval()
        fingerprint = _weights_sha256(model)
        encoder = Encoder(model, cfg, cfg.model.arch, fingerprint, tile_mpp or HUB_MPP, tile or cfg.data.image_size)
    encoder.preprocess = preprocessing(encoder.cfg, dist.device)
    return encoder


def encoder_of(made: dict, dist: DistInfo, backbone: str | None = None) -> Encoder:
    """The backbone a feature file's settings name (`backbone`: where its checkpoint is now, if it
    moved), rebuilt and checked: weights of another fingerprint, or other preprocessing or tiles,
    are refused naming what differs. A collective under torchrun."""
    from cancernet.config import Config, from_dict, merge

    if "tile" not in made or "fingerprint" not in made:
        raise UserError(f"features made with {made.get('backbone')!r} do not say how (not extract-features')")
    source = made.get("source", "checkpoint" if str(made["backbone"]).endswith(".pt") else "arch")
    if source == "checkpoint":
        path = backbone or made["backbone"]
        if not Path(path).is_file():
            raise UserError(
                f"the features' backbone checkpoint {path} does not exist: pass --backbone (where it is now)"
            )
        encoder = load_encoder(dist, path, tile_mpp=made["tile_mpp"], tile=made["tile"])
    else:
        recorded = {"model": made.get("model") or {"arch": made["arch"]}, "data": made.get("preprocessing", {})}
        cfg = from_dict(merge(Config().to_dict(), recorded))
        encoder = load_encoder(dist, None, cfg, made["tile_mpp"], made["tile"])
    now = encoder.settings(made["stride"])
    differ = sorted(k for k in now if k != "backbone" and k in made and now[k] != made[k])
    if differ:
        shown = "; ".join(f"{k}: {made[k]} then, {now[k]} now" for k in differ if k != "model")
        raise UserError(
            f"backbone {encoder.name} is not the one the features were made with ({', '.join(differ)} differ"
            f"{': ' + shown if shown else ''}); the model trained on them would read other features"
        )
    return encoder


def settings(encoder: Encoder, reading: Reading) -> dict:
    """What a slide's file depends on besides the slide: a file with the same is not made again."""
    return {
        **encoder.settings(reading.slide.stride),
        "mpp_given": reading.mpp,
        "tissue": {k: getattr(reading.slide, k) for k in TISSUE_KEYS},
    }


def _done_before(path: Path, settings: dict) -> dict | None:
    """The slides.csv row of a file made with these settings, else None (made again)."""
    import h5py

    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            if json.loads(f.attrs["settings"]) != settings:
                return None
            tiles, dim = f["features"].shape
            return {"tiles": tiles, "dim": dim, "seconds": round(float(f.attrs["seconds"]), 2)}
    except (OSError, KeyError, ValueError):
        return None


@dataclass
class SlideFeatures:
    """One slide's tiles and their features (in tile order), as read for extract-features and
    predict-slide with a MIL checkpoint."""

    plan: Plan
    thumb: Image.Image
    tiles: SlideTiles
    features: np.ndarray  # (N, D) float16
    log_odds: np.ndarray | None  # (N,) the patch model's own tumour log-odds, for a trained checkpoint
    seconds: float
    wait_s: float  # of which the model waited for the reader

    @property
    def coords(self) -> np.ndarray:
        """(N, 2) level-0 (x, y) of each tile's top-left corner."""
        x, y = self.plan.tile_origin(self.tiles.rows, self.tiles.cols)
        return np.stack([x, y], axis=1).astype(np.int64)


def slide_features(
    encoder: Encoder, path: Path, reading: Reading, device: torch.device, scores: bool = False
) -> SlideFeatures:
    """Every tissue tile of a slide through the backbone (scores: and the patch model's head), in
    this process's loader workers. The features stay on the device until the slide is done (no
    wait for it per batch). Raises UserError for a slide that cannot be read."""
    start, block = time.perf_counter(), reading.slide.block
    plan, thumb = plan_slide(path, encoder.tile_mpp, reading.slide, reading.mpp, tile=encoder.tile)
    tiles = SlideTiles(plan, block)
    batch = max(1, reading.batch_size // block**2)
    here = DistInfo(device=device)  # all the slide's tiles, in order
    loader = Waited(scoring_loader(tiles, here, batch, reading.num_workers, collate_fn=cat_blocks))
    parts, logits, order = [], [], []
    with torch.no_grad():
        for images, labels, index in loader:
            if (labels == UNREADABLE).any():
                raise UserError(f"slide {path}: OpenSlide could not read some of its tiles; truncated or corrupt?")
            images = images.to(device, non_blocking=True)
            with autocast(device, reading.amp):
                feats, out = embed(encoder.model, encoder.preprocess(images), with_logits=True)
            parts.append(feats.to(torch.float16))
            logits.append(tumour_log_odds(out.float(), encoder.temperature))
            order.append(index)
    n = len(tiles.rows)
    features, log_odds = np.empty((n, 0), np.float16), np.empty(n, np.float32)
    if parts:
        index = torch.cat(order).numpy()
        features = np.empty((n, parts[0].shape[1]), np.float16)
        features[index] = torch.cat(parts).cpu().numpy()
        log_odds[index] = torch.cat(logits).cpu().numpy()
    seconds = time.perf_counter() - start
    return SlideFeatures(plan, thumb, tiles, features, log_odds if scores else None, seconds, loader.seconds)


def extract_slide(encoder: Encoder, path: Path, out: Path, reading: Reading, device: torch.device) -> dict:
    """One slide's features into out/<slide>.h5; returns its slides.csv row. Raises UserError."""
    import h5py

    found = slide_features(encoder, path, reading, device)
    features, plan = found.features, found.plan
    read = {"level": plan.level, "slide_mpp": plan.mpp}
    target = out / f"{path.stem}.h5"
    with atomic_path(target) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features)
            f.create_dataset("coords", data=found.coords)
            f.attrs["settings"] = json.dumps(settings(encoder, reading))
            f.attrs["read"] = json.dumps(read)
            f.attrs["slide"] = str(path)
            f.attrs["seconds"] = found.seconds
    return {
        "slide": path.stem,
        "path": str(path),
        "tiles": len(features),
        "dim": int(features.shape[1]),
        "seconds": round(found.seconds, 2),
        "reader_wait_s": round(found.wait_s, 2),
        "status": "done",
    }


def extract_features(
    encoder: Encoder,
    slides: list[Path],
    out: Path,
    dist: DistInfo,
    reading: Reading,
    part: tuple[int, int] = (0, 1),
) -> list[dict]:
    """Every slide not done before of this job's part (k, n): slides k, k + n, ... (a Slurm array's
    task k of n), dealt out over the ranks; rank 0 writes slides.csv (slides.<k>-of-<n>.csv for a
    part). Returns every slide's row of the part (on every rank); a failed slide's row says why."""
    out.mkdir(parents=True, exist_ok=True)
    wanted = settings(encoder, reading)
    k, n = part
    rows = []
    for path in slides[k::n][dist.rank :: dist.world_size]:
        before = _done_before(out / f"{path.stem}.h5", wanted)
        if before is not None:
            log.info("slide %s: done before, skipped", path.name)
            rows.append({"slide": path.stem, "path": str(path), **before, "status": "skipped"})
            continue
        try:
            row = extract_slide(encoder, path, out, reading, dist.device)
        except UserError as e:
            log.error("%s", e)
            rows.append({"slide": path.stem, "path": str(path), "status": "failed", "error": str(e)})
            continue
        log.info(
            "slide %s: %d tiles x %d features in %.1fs (reader wait %.0f%%)",
            path.name,
            row["tiles"],
            row["dim"],
            row["seconds"],
            100 * row["reader_wait_s"] / max(row["seconds"], 1e-9),
        )
        rows.append(row)
    every = [r for part in gather_objects(rows, dist) for r in part]
    if dist.is_main:
        frame = pd.DataFrame(every).sort_values("slide")
        write_text(out / ("slides.csv" if n == 1 else f"slides.{k}-of-{n}.csv"), frame.to_csv(index=False))
    return every
