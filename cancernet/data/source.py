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
