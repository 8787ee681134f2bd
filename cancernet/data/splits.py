"""Stratified, seeded train/val/test splits that can keep groups (e.g. slides) whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError


def make_splits(
    frame: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int, groups: pd.Series | None = None
) -> pd.DataFrame:
    """Return frame with a 'split' column.

    Units (single images, or whole groups when given) are split per stratum (the unit's majority
    label), so each split keeps the label ratio and no group spans two splits.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError("data.val_fraction and data.test_fraction must be in [0, 1) and sum below 1")
    unit = groups.reindex(frame["id"]).to_numpy() if groups is not None else frame["id"].to_numpy()
    table = pd.DataFrame({"unit": unit, "label": frame["label"].to_numpy()})
    units = table.groupby("unit", sort=True)["label"].agg(["size", "mean"])
    rng = np.random.default_rng(seed)
    assignment = {}
    for _, stratum in units.groupby(units["mean"] >= 0.5):
        order = stratum.index.to_numpy()[rng.permutation(len(stratum))]
        cumulative = np.cumsum(stratum.loc[order, "size"].to_numpy()) / stratum["size"].sum()
        # A unit goes to the split its starting position falls in: test first, then val, then train.
        start = cumulative - stratum.loc[order, "size"].to_numpy() / stratum["size"].sum()
        split = np.where(start < test_fraction, "test", np.where(start < test_fraction + val_fraction, "val", "train"))
        assignment.update(zip(order, split))
    return frame.assign(split=[assignment[u] for u in unit])


def read_groups(path: str | Path, ids: pd.Series) -> pd.Series:
    """The id -> group map from data.groups_csv, checked to cover every id."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.groups_csv {path} not found")
    groups = pd.read_csv(path, dtype={"id": str, "group": str})
    if not {"id", "group"} <= set(groups.columns):
        raise DataError(f"{path}: expected columns 'id,group'")
    groups = groups.drop_duplicates("id").set_index("id")["group"]
    missing = ~ids.isin(groups.index)
    if missing.any():
        raise DataError(f"{path}: id {ids[missing].iloc[0]!r} has no group ({missing.sum()} missing)")
    return groups


def reuse_splits(saved: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """frame with the split column of a run's splits.csv (a resumed run keeps its splits)."""
    if set(saved["id"]) != set(frame["id"]):
        raise DataError(
            "the run's splits.csv lists different images than data.root/data.limit give now; "
            "use a new train.out_dir, or train.resume=none train.overwrite=true to start over"
        )
    return frame.merge(saved[["id", "split"]], on="id", how="left")
