"""What a data source is: an origin of labelled patches, with its table, fingerprint and packer.

The sources are kaggle.KaggleFolder and pcam.PcamRelease; formats.py registers them, and a new
one is a module with a Source plus one line there. How training reads a source's patches (its
own files, or the pack `prepare` made of it) is the format's choice, not the source's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cancernet.data.config import DataConfig
from cancernet.data.packed import Pack, PackWriter
from cancernet.data.patch import read_patch
from cancernet.runtime.errors import DataError


class Source:
    name = ""
    fixed_splits = False  # the origin gives its own splits and groups (slides)
    reads_files = False  # its patches can be read one by one from their files (data.format=folder)

    def fingerprint(self, root: str) -> tuple[str, str]:
        """(what a pack of it is made from, sha256 of that): a pack of other data is refused."""
        raise NotImplementedError

    def mtime(self, root: str) -> int:
        """The newest modification time of what the fingerprint covers (re-checked when it moves)."""
        raise NotImplementedError

    def table(self, cfg: DataConfig, pack: Pack | None) -> pd.DataFrame:
        """id, label (and split, group with fixed_splits) of the labelled patches data.limit asks for."""
        raise NotImplementedError

    def pack(self, cfg: DataConfig, writer: PackWriter, workers: int) -> tuple[list[str], np.ndarray, dict]:
        """Fill writer's images.npy with every labelled patch: (ids, labels, manifest fields)."""
        raise NotImplementedError

    def image_path(self, cfg: DataConfig, image_id: str) -> Path:
        """reads_files only: the file of one patch."""
        raise NotImplementedError

    def find_bad(self, cfg: DataConfig, ids: list[str], workers: int) -> dict[str, str]:
        """reads_files only: {id: reason} of the patches that are missing or unusable."""
        raise NotImplementedError

    def read(self, cfg: DataConfig, image_id: str) -> np.ndarray:
        """reads_files only: one patch from its file, (96, 96, 3) uint8, or BadImageError."""
        return read_patch(self.image_path(cfg, image_id))

    def known_hashes(self, cfg: DataConfig, ids: list[str]) -> tuple[pd.Series, str] | None:
        """(id -> SHA-1 of its pixels, where that came from) when the source knows them without
        reading the patches (the leak audit); None: read each."""
        return None

    def drop_bad(self, cfg: DataConfig, table: pd.DataFrame, bad: dict[str, str]) -> pd.DataFrame:
        """data.on_bad_image: fail naming the first bad patch, or drop them all."""
        if not bad:
            return table
        if cfg.on_bad_image == "fail":
            first = next(iter(bad))
            where = self.image_path(cfg, first) if self.reads_files else f"id {first}"
            raise DataError(
                f"bad image {where}: {bad[first]} "
                f"({len(bad)} bad image(s) in all; data.on_bad_image=skip skips and lists them)"
            )
        return table[~table["id"].isin(bad)].reset_index(drop=True)
