"""From config to the labelled table (validated, split) and the DataLoaders of each split."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader

from ..atomic import write_text
from ..config import Config, DataConfig
from ..distributed import DistInfo, barrier, broadcast_object
from .augment import Augment
from .datasets import FolderDataset, ResumableSampler, ShardSampler
from .kaggle import drop_bad_images, find_bad_images, image_path, read_labels, read_patch
from .splits import load_or_make_splits, make_splits, read_groups

log = logging.getLogger(__name__)


def load_table(cfg: Config, dist: DistInfo, out_dir: Path | None) -> pd.DataFrame:
    """id, label, split for every usable image; splits.csv (and bad_images.csv) written by rank 0."""
    dc = cfg.data
    frame = read_labels(dc.root, dc.limit)
    if dc.format == "folder":
        # Rank 0 decodes every image once up front, so a bad one fails now, not mid-epoch.
        bad = find_bad_images(dc.root, frame["id"].tolist(), dc.num_workers) if dist.is_main else None
        bad = broadcast_object(bad, dist)
    else:
        from .packed import open_pack
        bad = open_pack(cfg.data).bad_images
    frame = drop_bad_images(frame, bad, dc.on_bad_image, dc.root)
    if bad:
        log.warning("skipping %d bad image(s), listed in bad_images.csv", len(bad))

    def make() -> pd.DataFrame:
        groups = read_groups(dc.groups_csv, frame["id"]) if dc.groups_csv else None
        return make_splits(frame, dc.val_fraction, dc.test_fraction, cfg.train.seed, groups)

    table = load_or_make_splits(out_dir / "splits.csv", frame, make) if out_dir else make()
    if out_dir is not None and dist.is_main:
        write_text(out_dir / "splits.csv", table[["id", "split"]].to_csv(index=False))
        if bad:
            write_text(out_dir / "bad_images.csv",
                       pd.DataFrame(bad.items(), columns=["id", "reason"]).to_csv(index=False))
    barrier(dist)
    return table


def image_reader(cfg: DataConfig):
    """id -> (96, 96, 3) uint8 patch, from the folder (or the pack when data.format=packed)."""
    if cfg.format == "packed":
        from .packed import open_pack
        return open_pack(cfg).read_by_id
    return lambda image_id: read_patch(image_path(cfg.root, image_id))


@dataclass
class SplitLoader:
    """A loader, its index sampler, and the augmentation left for the device (packed) or None."""

    loader: DataLoader
    sampler: ResumableSampler | ShardSampler
    batch_size: int
    device_augment: Augment | None
    ids: list[str]


def make_loader(cfg: Config, dist: DistInfo, part: pd.DataFrame, train: bool) -> SplitLoader:
    dc, tc = cfg.data, cfg.train
    augment = Augment(dc, train=train, channels_last=cfg.model.channels_last)
    ids, labels = part["id"].tolist(), part["label"].to_numpy()
    batch_size = tc.batch_size if train else tc.eval_batch_size
    if train:
        sampler = ResumableSampler(range(len(ids)), dist.world_size, dist.rank, shuffle=True,
                                   seed=tc.seed, drop_last=True)
    else:
        sampler = ShardSampler(len(ids), dist.rank, dist.world_size)
    common = dict(num_workers=dc.num_workers, pin_memory=dist.device.type == "cuda",
                  generator=torch.Generator().manual_seed(tc.seed),  # keeps the global RNG untouched
                  prefetch_factor=4 if dc.num_workers else None)
    if dc.format == "packed":
        # One read per batch of uint8 rows; augmentation happens on the training device.
        from .packed import PackedDataset
        batches = BatchSampler(sampler, batch_size, drop_last=train)
        loader = DataLoader(PackedDataset(dc, ids, labels), batch_size=None, sampler=batches, **common)
        return SplitLoader(loader, sampler, batch_size, augment, ids)
    dataset = FolderDataset([image_path(dc.root, i) for i in ids], labels, augment, tc.seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train, **common)
    return SplitLoader(loader, sampler, batch_size, None, ids)


def set_epoch(split_loader: SplitLoader, epoch: int, start_step: int = 0) -> None:
    """Shuffle for this epoch; start_step skips the batches already trained (mid-epoch resume)."""
    split_loader.sampler.set_epoch(epoch)
    split_loader.sampler.start = start_step * split_loader.batch_size
    if isinstance(split_loader.loader.dataset, FolderDataset):
        split_loader.loader.dataset.set_epoch(epoch)
