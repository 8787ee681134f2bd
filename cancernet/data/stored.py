"""Rows of a float16 .npy read by index: the frozen-feature store (train/features.py fills it)
and the datasets and view pickers the head trains and evaluates on."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from cancernet.data.augment import DIHEDRAL, host_uniforms, send
from cancernet.data.packed import Rows, npy_layout
from cancernet.runtime.errors import UserError


@dataclass
class FeatureStore(Rows):
    """features.npy: each image's `views` feature vectors of `dim`, float16."""

    FILE, DTYPE = "features.npy", np.float16
    path: Path
    ids: list[str]
    views: int
    dim: int
    offset: int

    @property
    def REDO(self) -> str:  # noqa: N802 (Rows's hook)
        return f"delete {self.path}"

    @property
    def row_shape(self) -> tuple[int, ...]:
        return (self.views, self.dim)


def open_store(folder: Path) -> FeatureStore | None:
    if not (folder / "manifest.json").is_file():
        return None
    manifest = json.loads((folder / "manifest.json").read_text())
    ids = (folder / "ids.txt").read_text().split()
    shape, _, offset = npy_layout(folder / "features.npy")
    if len(ids) != manifest["count"] or tuple(shape) != (manifest["count"], manifest["views"], manifest["dim"]):
        raise UserError(f"feature store {folder} does not match its manifest; delete it and run again")
    return FeatureStore(folder, ids, manifest["views"], manifest["dim"], offset)


class FeatureDataset(Dataset):
    """Batches of stored features: dataset[list of indices] -> ((n, views, D) float16, labels, indices)."""

    def __init__(self, store: FeatureStore, ids: list[str], labels: np.ndarray):
        self.store = store
        self.rows = np.array([store.row_of[i] for i in ids], dtype=np.int64)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self._fd = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, indices):
        if self._fd is None:
            self._fd = os.open(self.store.path / "features.npy", os.O_RDONLY)
        indices = torch.as_tensor(indices, dtype=torch.int64)
        feats = torch.from_numpy(self.store.read_rows(self.rows[indices.numpy()], self._fd))
        return feats, self.labels[indices], indices

    def __getstate__(self):
        return {**self.__dict__, "_fd": None}


class StoredViews(nn.Module):
    """Training: each sample's stored view k, the one Augment would draw (seed, epoch, index)."""

    def __init__(self, seed: int, views: int):
        super().__init__()
        self.seed, self.views = seed, views

    def forward(self, feats: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        if self.views == 1:
            return feats[:, 0].float()
        k = np.floor(host_uniforms(index, self.seed, epoch)[:, DIHEDRAL] * 8).astype(np.int64)
        k = send(k, feats.device)
        return feats[torch.arange(len(feats), device=feats.device), k].float()


class FirstView(nn.Module):
    """Evaluation: the image itself (view 0)."""

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats[:, 0].float()
