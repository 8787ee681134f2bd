"""From config to the labelled table (validated, split) and the DataLoaders of each split."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader

from ..config import Config, DataConfig
from ..distributed import DistInfo, broadcast_object
from ..errors import DataError
from ..signals import ignore_stop_signals
from .augment import Augment, Preprocess
from .datasets import EpochSampler, FolderDataset, ShardSampler
from .kaggle import drop_bad_images, find_bad_images, image_path, read_labels, read_patch
from .splits import make_splits, read_groups, reuse_splits

log = logging.getLogger(__name__)


def load_table(cfg: Config, dist: DistInfo, saved_splits: pd.DataFrame | None = None
               ) -> tuple[pd.DataFrame, dict[str, str]]:
    """(id, label, split[, group] for every usable image; {id: reason} of the bad ones skipped).

    saved_splits: a run's splits.csv (id, split) to reuse instead of drawing new splits.
    """
    dc = cfg.data
    if dc.format == "pcam":
        from .pcam import load_pcam_table
        return load_pcam_table(dc), {}
    frame = read_labels(dc.root, dc.limit)
    if dc.format == "folder":
        # Rank 0 decodes every image once up front, so a bad one fails now, not mid-epoch.
        bad = find_bad_images(dc.root, frame["id"].tolist(), dc.num_workers) if dist.is_main else None
        bad = broadcast_object(bad, dist)
    else:
        from .packed import open_pack
        bad = open_pack(dc).bad_images
    frame = drop_bad_images(frame, bad, dc.on_bad_image, dc.root)
    if bad:
        log.warning("skipping %d bad image(s), listed in bad_images.csv", len(bad))
    groups = read_groups(dc.groups_csv, frame["id"]) if dc.groups_csv else None
    if groups is not None:
        frame = frame.assign(group=groups.reindex(frame["id"]).to_numpy())
    if saved_splits is not None:
        return reuse_splits(saved_splits, frame), bad
    return make_splits(frame, dc.val_fraction, dc.test_fraction, cfg.train.seed, groups), bad


def check_validation_split(table: pd.DataFrame) -> None:
    """Best-checkpoint selection by val AUC needs both classes in the validation split."""
    val = table[table["split"] == "val"]
    if val["label"].nunique() < 2:
        raise DataError(f"the validation split holds {len(val)} image(s) of class(es) {sorted(set(val['label']))} only: "
                        "raise data.val_fraction or data.limit so that it holds both classes")


def image_reader(cfg: DataConfig):
    """id -> (96, 96, 3) uint8 patch, from the folder (or the pack for packed and pcam data)."""
    if cfg.format in ("packed", "pcam"):
        from .packed import open_pack
        return open_pack(cfg).read_by_id
    return lambda image_id: read_patch(image_path(cfg.root, image_id))


@dataclass
class SplitLoader:
    """A split's loader of uint8 batches (images, labels, indices) and what turns them into inputs."""

    loader: DataLoader
    sampler: EpochSampler | ShardSampler
    ids: list[str]
    preprocess: Preprocess  # evaluation inputs (and the last step of augment)
    augment: Augment | None  # training only


def make_loader(cfg: Config, dist: DistInfo, part: pd.DataFrame, train: bool) -> SplitLoader:
    dc, tc = cfg.data, cfg.train
    ids, labels = part["id"].tolist(), part["label"].to_numpy()
    batch_size = tc.batch_size if train else tc.eval_batch_size
    if train:
        sampler = EpochSampler(len(ids), dist.rank, dist.world_size, batch_size, tc.seed)
    else:
        sampler = ShardSampler(len(ids), dist.rank, dist.world_size)
    # Workers only read uint8 patches (augmentation runs on the device, seeded by image index), so
    # the training loader's can live across epochs; evaluation loaders start theirs per use, so
    # that no rank keeps idle validation workers (and their memory) through training.
    workers = dict(num_workers=dc.num_workers, persistent_workers=train and dc.num_workers > 0,
                   prefetch_factor=4 if dc.num_workers else None, pin_memory=dist.device.type == "cuda",
                   # each iter() draws a base seed: from its own generator, not the global RNG (dropout's)
                   generator=torch.Generator().manual_seed(tc.seed), worker_init_fn=ignore_stop_signals)
    if dc.format in ("packed", "pcam"):
        from .packed import PackedDataset  # one read per batch of uint8 rows
        batches = BatchSampler(sampler, batch_size, drop_last=train)
        loader = DataLoader(PackedDataset(dc, ids, labels), batch_size=None, sampler=batches, **workers)
    else:
        dataset = FolderDataset([image_path(dc.root, i) for i in ids], labels)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train, **workers)
    channels_last = cfg.model.channels_last
    augment = Augment(dc, tc.seed, channels_last).to(dist.device) if train else None
    preprocess = Preprocess.from_config(dc, channels_last=channels_last).to(dist.device)
    return SplitLoader(loader, sampler, ids, preprocess, augment)


def set_epoch(split_loader: SplitLoader, epoch: int, offset: int = 0, end: int | None = None) -> None:
    """Shuffle for this epoch; offset skips the samples already trained (mid-epoch resume), end
    ends it early (the last epoch of a time budget)."""
    split_loader.sampler.set_epoch(epoch, offset, end)


def to_device(batch, device: torch.device):
    """(images, labels, index) on the device without waiting for it (pinned memory on CUDA)."""
    return tuple(t.to(device, non_blocking=True) for t in batch)
