"""Stratified, seeded train/val/test splits that can keep groups (e.g. slides) whole; grouped
stratified k-fold over train+val with a fixed test split; PCam's own splits for Kaggle patches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cancernet.runtime.errors import DataError

PCAM_SPLITS = {"train": "train", "valid": "val", "test": "test"}  # link-pcam's pcam_split -> ours


def _draw(unit: np.ndarray, labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Units split per stratum (the unit's majority label): each split keeps the label ratio and no
    unit spans two splits. A unit goes to the split its starting position falls in: test first,
    then val, then train."""
    table = pd.DataFrame({"unit": unit, "label": labels})
    units = table.groupby("unit", sort=True)["label"].agg(["size", "mean"])
    rng = np.random.default_rng(seed)
    assignment = {}
    for _, stratum in units.groupby(units["mean"] >= 0.5):
        order = stratum.index.to_numpy()[rng.permutation(len(stratum))]
        sizes = stratum.loc[order, "size"].to_numpy() / stratum["size"].sum()
        start = np.cumsum(sizes) - sizes
        split = np.where(start < test_fraction, "test", np.where(start < test_fraction + val_fraction, "val", "train"))
        assignment.update(zip(order, split))
    return np.array([assignment[u] for u in unit], dtype=object)


def _folds(unit: np.ndarray, labels: np.ndarray, folds: int, seed: int, grouped: bool) -> np.ndarray:
    """Each image's fold (0..folds-1): stratified by label, whole groups when grouped
    (scikit-learn's StratifiedGroupKFold), shuffled by seed."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    out = np.full(len(unit), -1)
    splitter = (
        StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
        if grouped
        else StratifiedKFold(folds, shuffle=True, random_state=seed)
    )
    for k, (_, held) in enumerate(splitter.split(np.zeros(len(unit)), labels, unit if grouped else None)):
        out[held] = k
    return out


def split_seed(cfg) -> int:
    """The seed of a run's splits: data.split_seed, else train.seed."""
    return cfg.train.seed if cfg.data.split_seed is None else cfg.data.split_seed


def make_splits(
    frame: pd.DataFrame,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    groups: pd.Series | None = None,
    folds: int = 1,
    fold: int = 0,
    given: pd.Series | None = None,
) -> pd.DataFrame:
    """frame with a 'split' column (and 'fold' with folds > 1).

    groups: id -> group (slide), kept whole in one split. folds > 1: the test split is drawn as
    always (or given), and train+val rotate over `folds` folds: fold `fold` is validation (so the
    test split is the same for every fold). given: id -> PCam split (link-pcam's pcam_split), used
    instead of drawing: test, and val too unless folds rotate it.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError("data.val_fraction and data.test_fraction must be in [0, 1) and sum below 1")
    unit = groups.reindex(frame["id"]).to_numpy() if groups is not None else frame["id"].to_numpy()
    labels = frame["label"].to_numpy()
    if given is not None:
        split = given.reindex(frame["id"]).map(PCAM_SPLITS).to_numpy(dtype=object)
    else:
        split = _draw(unit, labels, 0.0 if folds > 1 else val_fraction, test_fraction, seed)
    out = frame.assign(split=split)
    if folds > 1:
        rest = split != "test"
        fold_of = np.full(len(frame), -1)
        fold_of[rest] = _folds(unit[rest], labels[rest], folds, seed, grouped=groups is not None)
        out = out.assign(split=np.where(rest, np.where(fold_of == fold, "val", "train"), "test"), fold=fold_of)
    return out


def read_groups(path: str | Path, ids: pd.Series) -> pd.DataFrame:
    """data.groups_csv indexed by id: group (and pcam_split, from link-pcam), checked to cover every id."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.groups_csv {path} not found")
    groups = pd.read_csv(path, dtype={"id": str, "group": str})
    if not {"id", "group"} <= set(groups.columns):
        raise DataError(f"{path}: expected columns 'id,group'")
    groups = groups.drop_duplicates("id").set_index("id")
    missing = ~ids.isin(groups.index)
    if missing.any():
        raise DataError(f"{path}: id {ids[missing].iloc[0]!r} has no group ({missing.sum()} missing)")
    return groups


def reuse_splits(saved: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """frame with the split (and fold) columns of a run's splits.csv (a resumed run keeps its splits)."""
    if set(saved["id"]) != set(frame["id"]):
        raise DataError(
            "the run's splits.csv lists different images than data.root/data.limit give now; "
            "use a new train.out_dir, or train.resume=none train.overwrite=true to start over"
        )
    return frame.merge(saved[[c for c in ("id", "split", "fold") if c in saved.columns]], on="id", how="left")
