"""From config to the labelled table (validated, split) and the DataLoaders of each split."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from cancernet.config import Config
from cancernet.data.augment import Augment, Preprocess
from cancernet.data.datasets import EpochSampler, FolderDataset, PackedDataset, ShardSampler
from cancernet.data.formats import format_of, open_source_pack
from cancernet.data.patch import PATCH_SHAPE
from cancernet.data.splits import make_splits, read_groups, reuse_splits, split_seed
from cancernet.runtime.distributed import DistInfo, broadcast_object
from cancernet.runtime.errors import DataError
from cancernet.runtime.signals import loader_workers

log = logging.getLogger(__name__)


def load_table(
    cfg: Config, dist: DistInfo, saved_splits: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, dict[str, str]]:
    """(id, label, split[, group] for every usable image; {id: reason} of the bad ones skipped).

    saved_splits: a run's splits.csv (id, split) to reuse instead of drawing new splits.
    """
    dc = cfg.data
    fmt = format_of(dc)
    pack = open_source_pack(dc) if fmt.packed else None
    table = fmt.source.table(dc, pack)
    if pack is not None:
        bad = pack.bad_images
    else:  # rank 0 decodes every image once up front, so a bad one fails now, not mid-epoch
        found = fmt.source.find_bad(dc, table["id"].tolist(), dc.num_workers) if dist.is_main else None
        bad = broadcast_object(found, dist)
    if fmt.source.fixed_splits:
        return table, bad
    frame = fmt.source.drop_bad(dc, table, bad)
    if bad:
        log.warning("skipping %d bad image(s), listed in bad_images.csv", len(bad))
    known = read_groups(dc.groups_csv, frame["id"]) if dc.groups_csv else None
    groups = known["group"] if known is not None else None
    if groups is not None:
        frame = frame.assign(group=groups.reindex(frame["id"]).to_numpy())
    if saved_splits is not None:
        return reuse_splits(saved_splits, frame), bad
    given = None
    if dc.split_by == "pcam":
        if known is None or "pcam_split" not in known.columns:
            raise DataError(
                f"data.split_by=pcam needs data.groups_csv from `python -m cancernet link-pcam` (columns "
                f"id, group, pcam_split); {dc.groups_csv or 'none is set'}"
            )
        given = known["pcam_split"]
    return make_splits(frame, dc.val_fraction, dc.test_fraction, split_seed(cfg), groups, dc.folds, dc.fold, given), bad


def check_validation_split(table: pd.DataFrame, unit: str = "image", more: str = "data.limit") -> None:
    """Best-checkpoint selection by val AUC needs both classes in the validation split."""
    val = table[table["split"] == "val"]
    if val["label"].nunique() < 2:
        raise DataError(
            f"the validation split holds {len(val)} {unit}(s) of class(es) {sorted(set(val['label']))} only: "
            f"raise data.val_fraction or {more} so that it holds both classes"
        )


@dataclass
class SplitLoader:
    """A split's loader of uint8 batches (images, labels, indices) and what turns them into inputs."""

    loader: DataLoader
    sampler: EpochSampler | ShardSampler
    ids: list[str]
    preprocess: Preprocess  # evaluation inputs (and the last step of augment)
    augment: Augment | None  # training only


def image_dataset(cfg: Config, ids: list[str], labels: np.ndarray) -> tuple[Dataset, bool]:
    """These images in data.format's dataset: (dataset, whether it reads whole batches)."""
    fmt = format_of(cfg.data)
    if fmt.packed:
        return PackedDataset(open_source_pack(cfg.data), ids, labels), True
    return FolderDataset([fmt.source.image_path(cfg.data, i) for i in ids], labels), False


def make_loader(
    cfg: Config, dist: DistInfo, part: pd.DataFrame, train: bool, store=None, persistent: bool | None = None
) -> SplitLoader:
    """The split's loader: uint8 patches, or a frozen backbone's stored features (store: a
    features.FeatureStore), and what turns its batches into model inputs.

    persistent: keep the worker processes between passes (default: the training loader's); a
    loader read every epoch (validation) pays its workers' start once, not per epoch."""
    dc, tc = cfg.data, cfg.train
    ids, labels = part["id"].tolist(), part["label"].to_numpy()
    batch_size = tc.batch_size if train else tc.eval_batch_size
    if train:
        sampler = EpochSampler(len(ids), dist.rank, dist.world_size, batch_size, tc.seed)
    else:
        sampler = ShardSampler(len(ids), dist.rank, dist.world_size)
    # Workers only read uint8 patches (augmentation runs on the device, seeded by image index), so
    # they can live across epochs: an idle worker is a forked reader of a few MB of its own.
    # stored features are read in the rank's own process: a pread of a few KB per sample costs less
    # than handing batches over from workers (head epochs 0.27 s -> 0.16 s, docs/BENCHMARKS.md)
    num_workers = 0 if store is not None else dc.num_workers
    workers = dict(
        **loader_workers(num_workers),
        persistent_workers=(train if persistent is None else persistent) and num_workers > 0,
        prefetch_factor=4 if num_workers else None,
        pin_memory=dist.device.type == "cuda",
        # each iter() draws a base seed: from its own generator, not the global RNG (dropout's)
        generator=torch.Generator().manual_seed(tc.seed),
    )
    if store is not None:
        from cancernet.data.stored import FeatureDataset

        dataset, batched = FeatureDataset(store, ids, labels), True
    else:
        dataset, batched = image_dataset(cfg, ids, labels)
    if batched:  # one read per batch of rows
        batches = BatchSampler(sampler, batch_size, drop_last=train)
        loader = DataLoader(dataset, batch_size=None, sampler=batches, **workers)
    else:
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train, **workers)
    if store is not None:
        from cancernet.data.stored import FirstView, StoredViews

        return SplitLoader(loader, sampler, ids, FirstView(), StoredViews(tc.seed, store.views) if train else None)
    if train and num_workers and dist.local_rank == 0:
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        problem = shared_memory_shortfall(batch_size * PATCH_BYTES, num_workers, 4, ranks, "/dev/shm")
        if problem:
            log.warning(problem)
    channels_last = cfg.model.channels_last
    augment = Augment(dc, tc.seed, channels_last).to(dist.device) if train else None
    preprocess = Preprocess.from_config(dc, channels_last=channels_last).to(dist.device)
    return SplitLoader(loader, sampler, ids, preprocess, augment)


PATCH_BYTES = int(np.prod(PATCH_SHAPE))


def shared_memory_shortfall(batch_bytes: int, workers: int, prefetch: int, ranks: int, shm: str) -> str | None:
    """One line when the batches loader workers hand over (through shared memory) would not fit
    in it, e.g. Docker's 64 MB default /dev/shm; None when they fit or shm cannot be read."""
    try:
        total = shutil.disk_usage(shm).total
    except OSError:
        return None
    need = batch_bytes * workers * prefetch * ranks
    if need <= total:
        return None
    return (
        f"{shm} holds {total / 2**20:.0f} MiB, but {ranks} rank(s) x {workers} loader workers x {prefetch} batches "
        f"of {batch_bytes / 2**20:.1f} MiB need {need / 2**20:.0f} MiB: workers may die with a bus error; give the "
        "container more (docker run --shm-size=16g) or lower data.num_workers or train.batch_size"
    )


def set_epoch(split_loader: SplitLoader, epoch: int, offset: int = 0, end: int | None = None) -> None:
    """Shuffle for this epoch; offset skips the samples already trained (mid-epoch resume), end
    ends it early (the last epoch of a time budget)."""
    split_loader.sampler.set_epoch(epoch, offset, end)
