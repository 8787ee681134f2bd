"""Datasets yielding (uint8 image, label, index) and the samplers that feed them to each rank."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from cancernet.data.packed import Pack
from cancernet.data.patch import read_patch


class FolderDataset(Dataset):
    """Decodes one patch file per item into a uint8 CHW tensor; augmentation happens on the device."""

    def __init__(self, paths: list[Path], labels: np.ndarray | None):
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = torch.from_numpy(read_patch(self.paths[index])).permute(2, 0, 1)
        label = -1 if self.labels is None else int(self.labels[index])
        return image, label, index


class PackedDataset(Dataset):
    """Whole uint8 batches from a pack: dataset[list of indices] -> (images NCHW, labels, indices).

    Used with a BatchSampler as the loader's sampler (batch_size=None), so one call reads a batch.
    """

    def __init__(self, pack: Pack, ids: list[str], labels: np.ndarray):
        self.rows = np.array([pack.row_of[i] for i in ids], dtype=np.int64)
        # the reader alone, without the pack's id list and lookup: every loader worker is sent a
        # pickled copy of the dataset (for 220K ids those were ~14 MB a worker, each epoch)
        self.pack = dataclasses.replace(pack, ids=[], labels=np.empty(0, np.int64), bad_images={})
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self._fd = None  # opened lazily in each worker process

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, indices):
        if self._fd is None:
            self._fd = os.open(self.pack.path / "images.npy", os.O_RDONLY)
        indices = torch.as_tensor(indices, dtype=torch.int64)
        images = torch.from_numpy(self.pack.read_rows(self.rows[indices.numpy()], self._fd))
        return images.permute(0, 3, 1, 2), self.labels[indices], indices

    def __getstate__(self):
        return {**self.__dict__, "_fd": None}  # file descriptors do not cross processes


class ShardSampler(Sampler[int]):
    """Every rank takes indices rank, rank+world, ...: each sample once, no padding duplicates."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = range(rank, n, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochSampler(Sampler[int]):
    """The training order: one permutation of the split per (seed, epoch), shared by all ranks.

    Step s trains the global batch order[s*G : (s+1)*G] (G = batch_size x world_size), rank r
    taking every world_size-th sample of it; the tail that does not fill a global batch is
    dropped. `offset` skips samples already trained this epoch, so a mid-epoch checkpoint
    resumes at the same sample even with another world size or batch size; `end` ends the epoch
    early (the last epoch of a time budget).
    """

    def __init__(self, n: int, rank: int, world_size: int, batch_size: int, seed: int):
        self.n, self.rank, self.world_size, self.batch_size, self.seed = n, rank, world_size, batch_size, seed
        self.epoch, self.offset, self.end = 0, 0, n

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int, offset: int = 0, end: int | None = None) -> None:
        self.epoch, self.offset, self.end = epoch, offset, self.n if end is None else min(end, self.n)

    def steps(self) -> int:
        """Batches left in this epoch (from offset to end)."""
        return max(self.end - self.offset, 0) // self.global_batch

    def samples_per_epoch(self) -> int:
        return self.n // self.global_batch * self.global_batch

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        order = order[self.offset : self.offset + self.steps() * self.global_batch]
        return iter(order[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.steps() * self.batch_size


def to_device(batch, device: torch.device):
    """The batch's tensors (images, labels, ...) on the device without waiting for it (pinned memory on CUDA)."""
    return tuple(t.to(device, non_blocking=True) for t in batch)
