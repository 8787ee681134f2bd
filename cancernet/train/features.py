"""train.feature_cache: a frozen backbone's features, computed once per (image, view) and stored.

When only the head trains, the backbone's forward pass is the whole cost of a run (a ViT-L at
224 px), and it gives the same features for the same input every epoch. So all ranks compute
them once, for every image and every view the augmentation can draw (the 8 dihedral views, or
the image itself with data.augment=none), into a store keyed by a fingerprint of what they
depend on: the backbone's weights, the preprocessing, the view set and the image set. The head
then trains on stored features (the view a sample gets is the one the uncached run would have
drawn, from the same keyed hash), validation and test read view 0, and another run on the same
backbone (another seed, lr or head) reuses the store.

<cache>/<fingerprint>/features.npy  (N, views, D) float16, rows in ids.txt's order
<cache>/<fingerprint>/ids.txt       the N ids
<cache>/<fingerprint>/manifest.json what the fingerprint covers, N, views, D (written last)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from cancernet.config import Config
from cancernet.data.augment import dihedral
from cancernet.data.stored import FeatureStore, open_store
from cancernet.engine.predict import autocast
from cancernet.models.classifier import embed
from cancernet.runtime.atomic import partial_dir, publish
from cancernet.runtime.distributed import DistInfo, all_reduce_sum, barrier
from cancernet.runtime.errors import ConfigError, UserError

log = logging.getLogger(__name__)
VIEWS = {"dihedral": 8, "none": 1}  # the augmentations whose every outcome can be stored


def decide(cfg: Config) -> tuple[bool, str]:
    """(use the cache, why) for train.feature_cache=auto|on|off; `on` that cannot be honoured
    is a ConfigError naming what prevents it."""
    mode, d = cfg.train.feature_cache, cfg.data
    if mode == "off":
        return False, "train.feature_cache=off"
    blockers = []
    if not cfg.model.freeze_backbone:
        blockers.append("model.freeze_backbone=false (the backbone trains)")
    if d.augment not in VIEWS:
        blockers.append(f"data.augment={d.augment} (random rotations cannot be stored)")
    if d.stain != "none":
        blockers.append(f"data.stain={d.stain} (colour changes every epoch)")
    if d.jitter or d.hue:
        blockers.append(f"data.jitter={d.jitter:g}/data.hue={d.hue:g} (colour changes every epoch)")
    if blockers and mode == "on":
        raise ConfigError(f"config key 'train.feature_cache': on, but {'; '.join(blockers)}")
    if blockers:
        return False, "; ".join(blockers)
    return True, f"frozen backbone, {VIEWS[d.augment]} view(s) per image"


@dataclass
class HeadOnStoredFeatures:
    """This run trains the head alone, on its frozen backbone's stored features: the loaders read
    the store's rows (engine.loaders.make_loader), the loop trains and validation scores `head`
    of the model, checkpoints still hold the whole model."""

    store: FeatureStore

    @staticmethod
    def part(model: nn.Module) -> nn.Module:
        """What runs on the loaders' inputs: the model's head."""
        return model.head


def head_on_stored_features(
    cfg: Config, dist: DistInfo, model: nn.Module, table: pd.DataFrame
) -> HeadOnStoredFeatures | None:
    """train.feature_cache decided (and logged), the store built when it is on. A collective."""
    cached, why = decide(cfg)
    log.info("feature cache %s: %s", "on" if cached else "off", why)
    return HeadOnStoredFeatures(build_store(cfg, dist, model, table)) if cached else None


def fingerprint(cfg: Config, model: nn.Module, ids: list[str]) -> tuple[str, dict]:
    """(key, what it covers): the frozen weights' sha256, the preprocessing, the views, the images."""
    weights = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if not name.startswith(f"net.{model.head_name}."):
            weights.update(name.encode())
            weights.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    d = cfg.data
    covers = {
        "arch": cfg.model.arch,
        "backbone_sha256": weights.hexdigest(),
        "preprocess": {"mean": d.mean, "std": d.std, "image_size": d.image_size, "crop": d.crop},
        "views": VIEWS[d.augment],
        "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "amp": cfg.train.amp,
    }
    return hashlib.sha256(json.dumps(covers, sort_keys=True).encode()).hexdigest()[:20], covers


def cache_root(cfg: Config) -> Path:
    return Path(cfg.train.feature_cache_dir) if cfg.train.feature_cache_dir else Path(cfg.data.root) / "features"


def build_store(cfg: Config, dist: DistInfo, model: nn.Module, table: pd.DataFrame) -> FeatureStore:
    """The store for this run's backbone and images: opened when a run already filled it, else
    filled by all ranks together (each its share of the images), then opened. A collective."""
    ids = sorted(table["id"])
    key, covers = fingerprint(cfg, model, ids)
    folder = cache_root(cfg) / key
    store = open_store(folder)
    if store is not None:
        log.info("feature cache: reusing %s (%d images x %d views x %d)", folder, len(ids), store.views, store.dim)
        return store
    start = time.perf_counter()
    partial = folder.with_name(folder.name + ".partial")  # partial_dir's name: every rank writes into it
    views = VIEWS[cfg.data.augment]
    dim = _feature_dim(cfg, model, dist)
    if dist.is_main:
        partial_dir(folder)
        np.lib.format.open_memmap(partial / "features.npy", "w+", np.float16, (len(ids), views, dim)).flush()
        (partial / "ids.txt").write_text("\n".join(ids) + "\n")
    barrier(dist)
    missing = float(not (partial / "features.npy").is_file())  # every rank must see rank 0's file
    if all_reduce_sum(torch.tensor([missing], device=dist.device), dist).item() > 0:
        raise UserError(
            f"train.feature_cache_dir {cache_root(cfg)} is not on a filesystem that every rank shares "
            "(a rank cannot see the store rank 0 made); point it at a shared folder"
        )
    _fill(cfg, dist, model, table.set_index("id").loc[ids].reset_index(), partial, views, dim)
    barrier(dist)
    if dist.is_main:
        manifest = {
            **covers,
            "count": len(ids),
            "views": views,
            "dim": dim,
            "seconds": round(time.perf_counter() - start, 1),
        }
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=1))
        publish(partial, folder)
        log.info(
            "feature cache: %d images x %d views x %d features in %.1f s -> %s",
            len(ids),
            views,
            dim,
            time.perf_counter() - start,
            folder,
        )
    barrier(dist)
    return open_store(folder)


def _feature_dim(cfg: Config, model: nn.Module, dist: DistInfo) -> int:
    size = cfg.data.image_size
    with torch.no_grad():
        return int(embed(model.eval(), torch.zeros(1, 3, size, size, device=dist.device)).shape[1])


def _fill(cfg: Config, dist: DistInfo, model: nn.Module, table: pd.DataFrame, folder: Path, views: int, dim: int):
    """This rank's rows: images rank, rank + world, ...; every view of each; pwrite into the file."""
    from cancernet.data.packed import npy_layout
    from cancernet.engine.inference import preprocessing, scoring_loader
    from cancernet.engine.loaders import image_dataset

    dataset, batched = image_dataset(cfg, table["id"].tolist(), table["label"].to_numpy())
    loader = scoring_loader(dataset, dist, cfg.train.eval_batch_size, cfg.data.num_workers, batched)
    preprocess = preprocessing(cfg, dist.device)
    _, _, offset = npy_layout(folder / "features.npy")
    fd = os.open(folder / "features.npy", os.O_WRONLY)
    model.eval()
    try:
        with torch.no_grad():
            for images, _, index in loader:
                images, parts = images.to(dist.device), []
                for k in range(views):  # made as Augment makes them; the backbone under train.amp, as in training
                    view = (
                        dihedral(images, torch.full((len(images),), k, device=images.device)) if views > 1 else images
                    )
                    with autocast(dist.device, cfg.train.amp):
                        parts.append(embed(model, preprocess(view)).float())
                block = torch.stack(parts, 1).to(torch.float16).cpu().numpy()
                for row, values in zip(index.tolist(), block):
                    os.pwrite(fd, values.tobytes(), offset + row * views * dim * 2)
    finally:
        os.fsync(fd)
        os.close(fd)
