"""`extract-features`: a folder of slides to one feature file per slide, for slide-level (MIL) models.

Each slide's tissue (the tissue mask predict-slide uses) is cut into tiles of `tile` px at
`tile_mpp` microns per pixel (non-overlapping when stride = tile), and a backbone turns each tile
into a feature vector: <out>/<slide>.h5 (data/tile_features.py: the features, their level-0
coordinates and the settings they were made with), whole or absent. A slide whose file holds the
same settings is skipped: a stopped run continues where it was. The slide driver
(wsi/driver.py) deals the slides over all ranks of all nodes by size, each rank reading its
slides' tiles in loader workers; a bad slide costs one line and the others are still done.
<out>/slides.csv lists every slide of the run: tiles, seconds, status.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from cancernet.config import Config, SlideConfig
from cancernet.data import tile_features
from cancernet.data.augment import Preprocess
from cancernet.data.tile_features import TileSettings
from cancernet.engine.inference import Predictor, preprocessing, scoring_loader
from cancernet.engine.predict import autocast
from cancernet.models.classifier import build_model, embed, resolve_preprocessing, tumour_log_odds
from cancernet.runtime.distributed import DistInfo
from cancernet.runtime.errors import UserError
from cancernet.wsi.driver import drive
from cancernet.wsi.slide import Plan, plan_slide
from cancernet.wsi.tiles import UNREADABLE, SlideTiles, Waited, cat_blocks

log = logging.getLogger(__name__)
HUB_MPP = 0.5  # microns per pixel foundation models are trained at (20x)
TISSUE_KEYS = (
    "tissue_mpp",
    "min_saturation",
    "min_texture",
    "fill_holes_um2",
    "min_tissue",
)  # slide.* the tiles depend on


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

    def settings(self, stride: int, reading: Reading | None = None) -> TileSettings:
        """What its features of a slide depend on (reading: and how the slide is read)."""
        d = self.cfg.data
        return TileSettings(
            backbone=self.name,
            source=self.source,
            arch=self.cfg.model.arch,
            model=dataclasses.asdict(self.cfg.model) if self.source == "arch" else None,
            fingerprint=self.fingerprint,
            preprocessing={"mean": d.mean, "std": d.std, "image_size": d.image_size},
            tile_mpp=self.tile_mpp,
            tile=self.tile,
            stride=stride,
            mpp_given=reading.mpp if reading else None,
            tissue={k: getattr(reading.slide, k) for k in TISSUE_KEYS} if reading else None,
        )


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


def encoder_of(made: TileSettings, dist: DistInfo, backbone: str | None = None) -> Encoder:
    """The backbone a feature file's settings name (`backbone`: where its checkpoint is now, if it
    moved), rebuilt and checked: weights of another fingerprint, or other preprocessing or tiles,
    are refused naming what differs. A collective under torchrun."""
    from cancernet.config import Config, from_dict, merge

    if made.source == "checkpoint":
        path = backbone or made.backbone
        if not Path(path).is_file():
            raise UserError(
                f"the features' backbone checkpoint {path} does not exist: pass --backbone (where it is now)"
            )
        encoder = load_encoder(dist, path, tile_mpp=made.tile_mpp, tile=made.tile)
    else:
        recorded = {"model": made.model or {"arch": made.arch}, "data": made.preprocessing}
        cfg = from_dict(merge(Config().to_dict(), recorded))
        encoder = load_encoder(dist, None, cfg, made.tile_mpp, made.tile)
    now = encoder.settings(made.stride)
    differ = made.differences(now, TileSettings.BACKBONE)
    if differ:
        then, current = made.to_dict(), now.to_dict()
        shown = "; ".join(f"{k}: {then[k]} then, {current[k]} now" for k in differ if k != "model")
        raise UserError(
            f"backbone {encoder.name} is not the one the features were made with ({', '.join(differ)} differ"
            f"{': ' + shown if shown else ''}); the model trained on them would read other features"
        )
    return encoder


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


def plan_tiles(encoder: Encoder, path: Path, reading: Reading) -> tuple[Plan, Image.Image]:
    """The slide's tissue tiles as this backbone reads them (and the thumbnail of its tissue mask)."""
    return plan_slide(path, encoder.tile_mpp, reading.slide, reading.mpp, tile=encoder.tile)


def slide_features(
    encoder: Encoder, path: Path, reading: Reading, device: torch.device, scores: bool = False
) -> SlideFeatures:
    """Every tissue tile of a slide through the backbone (scores: and the patch model's head), in
    this process's loader workers. The features stay on the device until the slide is done (no
    wait for it per batch). Raises UserError for a slide that cannot be read."""
    start, block = time.perf_counter(), reading.slide.block
    plan, thumb = plan_tiles(encoder, path, reading)
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


@dataclass
class ExtractJob:
    """extract-features of one slide into OUT/<slide>.h5 (the slide driver's job)."""

    encoder: Encoder
    out: Path
    reading: Reading
    device: torch.device

    @property
    def settings(self) -> TileSettings:
        return self.encoder.settings(self.reading.slide.stride, self.reading)

    def size(self, path: Path) -> int:
        if tile_features.TileFeatures(tile_features.path_of(self.out, path.stem)).done_with(self.settings):
            return 0
        return int(plan_tiles(self.encoder, path, self.reading)[0].tissue.sum())

    def run(self, path: Path) -> dict:
        """The slide's features, unless its file holds them with these settings; its slides.csv row."""
        target = tile_features.TileFeatures(tile_features.path_of(self.out, path.stem))
        row = {"slide": path.stem, "path": str(path)}
        if target.done_with(self.settings):
            log.info("slide %s: done before, skipped", path.name)
            tiles, dim = target.shape
            return {**row, "tiles": tiles, "dim": dim, "seconds": round(target.seconds, 2), "status": "skipped"}
        scored = self.encoder.source == "checkpoint"  # a trained patch model: its head's log-odds too
        found = slide_features(self.encoder, path, self.reading, self.device, scores=scored)
        read = {"level": found.plan.level, "slide_mpp": found.plan.mpp}
        extra = {"log_odds": found.log_odds} if scored else None
        tile_features.write(
            target.path, found.features, found.coords, self.settings, read, str(path), found.seconds, extra
        )
        tiles, dim = found.features.shape
        log.info(
            "slide %s: %d tiles x %d features in %.1fs (reader wait %.0f%%)",
            path.name,
            tiles,
            dim,
            found.seconds,
            100 * found.wait_s / max(found.seconds, 1e-9),
        )
        seconds, wait_s = round(found.seconds, 2), round(found.wait_s, 2)
        return {**row, "tiles": tiles, "dim": dim, "seconds": seconds, "reader_wait_s": wait_s, "status": "done"}


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
    part) and gets every slide's row of the part (a failed slide's says why), the others their own."""
    k, n = part
    table = "slides.csv" if n == 1 else f"slides.{k}-of-{n}.csv"
    return drive(ExtractJob(encoder, Path(out), reading, dist.device), slides[k::n], Path(out), dist, table)
