"""A slide's tile features (`<slide>.h5`, written by extract-features): the one writer and reader.

    features  (N, D) float16   a backbone's features of each tissue tile
    coords    (N, 2) int64     level-0 (x, y) of each tile's top-left corner
    log_odds  (N,) float32     when the backbone is a trained patch model: its head's tumour
                               log-odds of each tile (the baselines a slide-level model must beat)
    attrs     settings (TileSettings as JSON), read (level, slide mpp), slide (its path), seconds

Extraction writes it, slide-level training reads its bags from it, and a slide-level
checkpoint records the settings its features were made with, so that predict-slide makes its
inputs alike. Files made with other settings must not mix: `differences` names what differs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cancernet.runtime.atomic import atomic_path
from cancernet.runtime.errors import DataError

SUFFIX = ".h5"


@dataclass(frozen=True)
class TileSettings:
    """What a slide's features depend on besides the slide itself."""

    backbone: str  # --arch's name, or the patch checkpoint's path
    source: str  # "arch" (a named backbone) or "checkpoint" (a trained patch model, whose head scores tiles)
    arch: str
    fingerprint: str  # sha256 of the backbone's weights
    preprocessing: dict  # mean, std, image_size
    tile_mpp: float  # microns per pixel the tiles are read at
    tile: int  # tile side, px at tile_mpp
    stride: int  # tile step, px
    model: dict | None = None  # an --arch backbone's model: section (how to rebuild it)
    mpp_given: float | None = None  # --mpp: the level-0 resolution for slides lacking it
    tissue: dict | None = None  # the slide.* tissue settings the tiles were chosen with

    # what the backbone and its tiles are: a model trained on these features needs the same
    BACKBONE = ("source", "arch", "model", "fingerprint", "preprocessing", "tile_mpp", "tile", "stride")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str = "features") -> TileSettings:
        """From a file's or checkpoint's record; a record that lacks what extract-features writes is
        refused (files from elsewhere say nothing of their tiles)."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(values))
        if missing:
            raise DataError(
                f"{where}: made with {values.get('backbone', 'an unknown backbone')!r} but not by extract-features "
                f"(its settings lack {', '.join(missing)})"
            )
        return cls(**{k: v for k, v in values.items() if k in names})

    def differences(self, other: TileSettings, keys: tuple[str, ...] | None = None) -> list[str]:
        """The settings (of keys, default all) in which other differs."""
        keys = keys or tuple(f.name for f in dataclasses.fields(self))
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k in keys if mine.get(k) != theirs.get(k)]


def path_of(folder: str | Path, slide: str) -> Path:
    return Path(folder) / f"{slide}{SUFFIX}"


def write(
    path: Path,
    features: np.ndarray,
    coords: np.ndarray,
    settings: TileSettings,
    read: dict,
    slide: str,
    seconds: float,
    extra: dict[str, np.ndarray] | None = None,
) -> None:
    """The file, whole or absent (written under a temporary name, then renamed). extra: more
    datasets by name (synthetic bags store their tumour tiles)."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=np.asarray(features, np.float16))
            f.create_dataset("coords", data=np.asarray(coords, np.int64))
            for name, values in (extra or {}).items():
                f.create_dataset(name, data=values)
            f.attrs["settings"] = json.dumps(settings.to_dict())
            f.attrs["read"] = json.dumps(read)
            f.attrs["slide"] = slide
            f.attrs["seconds"] = seconds


@dataclass(frozen=True)
class TileFeatures:
    """One slide's feature file, read through these accessors."""

    path: Path

    def _open(self):
        import h5py

        try:
            return h5py.File(self.path, "r")
        except OSError as e:
            raise DataError(f"feature file {self.path} cannot be read ({e}); extract it again") from None

    @property
    def shape(self) -> tuple[int, int]:
        """(tiles, feature dimension)."""
        with self._open() as f:
            return tuple(f["features"].shape)

    @property
    def settings(self) -> TileSettings:
        with self._open() as f:
            return TileSettings.from_dict(json.loads(f.attrs.get("settings", "{}")), str(self.path))

    @property
    def seconds(self) -> float:
        with self._open() as f:
            return float(f.attrs.get("seconds", float("nan")))

    def features(self, rows: np.ndarray | None = None) -> np.ndarray:
        """(N, D) float16 as stored; rows (sorted) reads those tiles only."""
        with self._open() as f:
            return f["features"][:] if rows is None else f["features"][rows]

    def coords(self) -> np.ndarray:
        with self._open() as f:
            return f["coords"][:]

    def log_odds(self) -> np.ndarray | None:
        """The patch model's tumour log-odds of each tile, when the backbone was one (else None)."""
        with self._open() as f:
            return f["log_odds"][:] if "log_odds" in f else None

    def done_with(self, settings: TileSettings) -> bool:
        """Whether the file is whole and was made with these settings (extraction skips it)."""
        try:
            return self.path.is_file() and self.settings == settings
        except (DataError, KeyError, ValueError):
            return False


def check_alike(folder: str | Path, slides: list[str]) -> tuple[list[int], TileSettings]:
    """(tiles of each slide, their common settings): features of two backbones, tilings or tissue
    masks in one run would train silently on both, so slides made otherwise than the first are
    refused, naming the two slides and the settings that differ."""
    tiles, first = [], None
    for slide in slides:
        found = TileFeatures(path_of(folder, slide))
        settings = found.settings
        if first is None:
            first = (slide, settings)
        elif settings != first[1]:
            differ = first[1].differences(settings)
            raise DataError(
                f"data.features={folder}: slides {first[0]} and {slide} were extracted with different settings "
                f"({', '.join(differ)}); extract them all alike"
            )
        tiles.append(found.shape[0])
    if first is None:
        raise DataError(f"data.features={folder}: no slides to read")
    return tiles, first[1]
