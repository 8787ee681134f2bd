"""Datasets yielding (image, label, index) and the samplers that feed them to each rank."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from .augment import Augment
from .kaggle import read_patch


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, index...) that is the same in every process."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


class FolderDataset(Dataset):
    """Decodes one patch file per item; augments per sample here (in the loader workers).

    With augment=None it yields uint8 CHW tensors for augmentation on the device instead.
    """

    def __init__(self, paths: list[Path], labels: np.ndarray | None, augment: Augment | None, seed: int = 0):
        self.paths = paths
        self.labels = labels
        self.augment, self.seed, self.epoch = augment, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # workers are re-created each epoch, so they see this

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = torch.from_numpy(read_patch(self.paths[index])).permute(2, 0, 1)
        if self.augment is not None:
            gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
            image = self.augment(image[None], gen)[0]
        label = -1 if self.labels is None else int(self.labels[index])
        return image, label, index


class ShardSampler(Sampler[int]):
    """Every rank takes indices rank, rank+world, ...: each sample once, no padding duplicates."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = range(rank, n, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start partway into an epoch (mid-epoch resume)."""

    start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start
