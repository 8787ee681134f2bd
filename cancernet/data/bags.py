"""Bags for slide-level (MIL) runs: one slide's tile features (data/tile_features.py) per sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from cancernet.data import tile_features
from cancernet.data.tile_features import TileSettings
from cancernet.runtime.errors import ConfigError, DataError


def read_slide_labels(path: str | Path, features: str | Path) -> tuple[pd.DataFrame, TileSettings]:
    """(id (the slide), label, group (its patient, or the slide), tiles of every slide of the
    labels CSV (slide,label[,patient]); the features' settings). A missing folder, slides
    without a feature file, and feature files made with different settings are refused, named."""
    path, features = Path(path), Path(features)
    if not path.is_file():
        raise DataError(f"data.slides_csv {path} does not exist (columns slide,label[,patient])")
    if not features.is_dir():
        raise DataError(f"data.features {features} is not a folder (extract-features --out writes one)")
    frame = pd.read_csv(path, dtype={"slide": str, "patient": str})
    if not {"slide", "label"} <= set(frame.columns):
        raise DataError(f"{path}: needs columns slide,label (and optionally patient)")
    frame["slide"] = frame["slide"].map(lambda s: Path(s).stem)
    if frame["slide"].duplicated().any():
        raise DataError(f"{path}: slide {frame['slide'][frame['slide'].duplicated()].iloc[0]!r} is listed twice")
    if not frame["label"].isin([0, 1]).all():
        raise DataError(f"{path}: labels must be 0 or 1")
    missing = [s for s in frame["slide"] if not tile_features.path_of(features, s).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(
            f"{len(missing)} slide(s) of {path} have no feature file in data.features={features}: {shown} "
            "(run extract-features on them, or leave them out of the labels)"
        )
    tiles, settings = tile_features.check_alike(features, list(frame["slide"]))
    group = frame["patient"] if "patient" in frame.columns else frame["slide"]
    table = pd.DataFrame(
        {"id": frame["slide"], "label": frame["label"].astype(np.int64), "group": group.to_numpy(), "tiles": tiles}
    )
    return table, settings


def slide_table(d) -> tuple[pd.DataFrame, TileSettings]:
    """read_slide_labels of a slide-level run's data section, or a ConfigError naming the key."""
    for key in ("features", "slides_csv"):
        if not getattr(d, key):
            raise ConfigError(f"config key 'data.{key}' is needed by a slide-level run (model.mil)")
    return read_slide_labels(d.slides_csv, d.features)


class Bags(Dataset):
    """Item i, or (i, epoch): (features (n, D) float16 as stored, label, i) of slide i. With
    max_instances (training), at most that many of its tiles, drawn without replacement from
    (seed, epoch, i): the same draw on every rank and after a resume. The epoch comes with the
    index, so persistent loader workers need not be told it."""

    def __init__(self, folder: str | Path, ids: list[str], labels: np.ndarray, max_instances=None, seed: int = 0):
        self.folder, self.ids = Path(folder), list(ids)
        self.labels = torch.tensor(np.asarray(labels), dtype=torch.int64)
        self.max_instances, self.seed = max_instances, seed

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int | tuple[int, int]):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        found = tile_features.TileFeatures(tile_features.path_of(self.folder, self.ids[i]))
        rows = None
        if self.max_instances:
            n = found.shape[0]
            if n > self.max_instances:
                rows = np.sort(
                    np.random.default_rng([self.seed, epoch, i]).choice(n, self.max_instances, replace=False)
                )
        # float16 as stored: half the bytes from the workers; the step casts on the device
        return torch.from_numpy(found.features(rows)), self.labels[i], i


def bag_loader(bags: Bags, sampler, num_workers: int, pin_memory: bool = False):
    """One bag at a time; the workers (fork server) live as long as the loader."""
    from torch.utils.data import DataLoader

    from cancernet.runtime.signals import loader_workers

    workers = loader_workers(num_workers)
    return DataLoader(
        bags, batch_size=None, sampler=sampler, persistent_workers=num_workers > 0, pin_memory=pin_memory, **workers
    )


class BalancedBags(Sampler):
    """The training order: one bag per rank per step, (bag, epoch) items. Each step's bags (one per
    rank) are of similar size, so no rank waits for another's huge slide: bags are sorted by size
    (ties shuffled per epoch), cut into groups of world_size, the groups shuffled; rank r takes the
    r-th bag of each group. The last group is filled from the start (every rank takes the same
    number of steps). Counted in samples over all ranks like the patch sampler (a sample is a
    bag): `offset` skips the steps trained before a mid-epoch stop, `end` ends the epoch early."""

    def __init__(self, sizes: np.ndarray, rank: int, world_size: int, seed: int):
        self.sizes, self.rank, self.world, self.seed = np.asarray(sizes), rank, world_size, seed
        self.epoch, self.offset, self.end = 0, 0, None

    @property
    def global_batch(self) -> int:
        """Bags per step over all ranks."""
        return self.world

    def samples_per_epoch(self) -> int:
        return -(-len(self.sizes) // self.world) * self.world

    def set_epoch(self, epoch: int, offset: int = 0, end: int | None = None) -> None:
        self.epoch, self.offset, self.end = epoch, offset, end

    def groups(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = np.lexsort((rng.random(len(self.sizes)), -self.sizes))  # by size, ties in random order
        steps = -(-len(order) // self.world)
        order = np.concatenate([order, order[: steps * self.world - len(order)]])
        return order.reshape(steps, self.world)[rng.permutation(steps)]

    def _steps(self) -> range:
        end = self.samples_per_epoch() if self.end is None else min(self.end, self.samples_per_epoch())
        return range(self.offset // self.world, end // self.world)

    def __iter__(self):
        column = self.groups()[:, self.rank]
        return iter([(int(column[s]), self.epoch) for s in self._steps()])

    def __len__(self) -> int:
        return len(self._steps())


def write_synthetic_bags(
    out: str | Path, n: int, dim: int = 32, tiles: tuple[int, int] = (120, 300), focus: float = 0.03, seed: int = 0
) -> pd.DataFrame:
    """n feature files as extract-features writes them, half of them positive: a positive
    slide's tumour focus is `focus` of its tiles, shifted along one direction of feature space
    (`tumour` holds their indices, the truth a test checks attention against). Returns the
    labels table (slide,label,patient; two slides per patient), also written to out/labels.csv."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction *= 6.0 / np.linalg.norm(direction)
    settings = TileSettings(
        backbone="synthetic",
        source="arch",
        arch="synthetic",
        fingerprint=f"synthetic seed {seed}",
        preprocessing={},
        tile_mpp=0.5,
        tile=224,
        stride=224,
    )
    rows = []
    for i in range(n):
        label, count = i % 2, int(rng.integers(*tiles))
        feats = rng.normal(size=(count, dim))
        tumour = np.sort(rng.choice(count, max(1, round(focus * count)), replace=False)) if label else np.zeros(0, int)
        feats[tumour] += direction
        coords = np.stack([np.arange(count) * 224, np.zeros(count)], 1)
        name = f"slide_{i:03d}"
        tile_features.write(
            tile_features.path_of(out, name), feats, coords, settings, {}, name, 0.0, extra={"tumour": tumour}
        )
        rows.append({"slide": name, "label": label, "patient": f"p{i // 2:03d}"})
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "labels.csv", index=False)
    return frame
