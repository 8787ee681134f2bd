"""`python -m cancernet link-pcam KAGGLE_ROOT PCAM_RELEASE`: the slide of every Kaggle patch.

Every Kaggle id is the SHA-1 of its patch's pixels, and the Kaggle set is PCam without its
duplicates; PCam's release names the slide (`wsi`) of every patch. Hashing the release's patches
and joining on the ids recovers the slide (and the PCam split) of each labelled Kaggle patch:
KAGGLE_ROOT/pcam_slides.csv (id, group, pcam_split) for data.groups_csv, and a summary beside it
(pcam_slides.json). Ids without a Kaggle label (its test set) are never written.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from cancernet.data.kaggle import read_labels
from cancernet.data.pcam import RELEASE_SPLITS, check_release, hash_split, release_file
from cancernet.runtime.atomic import write_text
from cancernet.runtime.errors import DataError
from cancernet.runtime.signals import ignore_stop_signals

log = logging.getLogger(__name__)
# a patch in several PCam splits (a duplicate) counts in the most held-out one: test, then valid
PRECEDENCE = {"test": 0, "valid": 1, "train": 2}


def release_hashes(root: Path, workers: int) -> pd.DataFrame:
    """hash, pcam_split, row, group (slide), label of every patch of the release, streamed, one
    process per split file."""
    release = check_release(root)
    splits = list(RELEASE_SPLITS)
    with ProcessPoolExecutor(max(1, min(workers, len(splits))), initializer=ignore_stop_signals) as pool:
        hashes = list(pool.map(hash_split, [str(release_file(root, s, "x")) for s in splits]))
    parts = []
    for split, split_hashes in zip(splits, hashes):
        labels, meta = release[split]
        parts.append(
            pd.DataFrame(
                {
                    "hash": split_hashes,
                    "pcam_split": split,
                    "row": range(len(labels)),
                    "group": meta["wsi"].astype(str).to_numpy(),
                    "label": labels,
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def link_pcam(kaggle_root: str | Path, release_root: str | Path, workers: int = 2) -> dict:
    """Write KAGGLE_ROOT/pcam_slides.csv and .json; returns the summary."""
    start, kaggle_root = time.perf_counter(), Path(kaggle_root)
    labels = read_labels(kaggle_root)
    release = release_hashes(Path(release_root), workers)
    copies = release.groupby("hash").agg(
        copies=("row", "size"), slides=("group", "nunique"), splits=("pcam_split", "nunique")
    )
    first = (
        release.assign(order=release["pcam_split"].map(PRECEDENCE))
        .sort_values(["order", "row"], kind="stable")
        .drop_duplicates("hash")
    )
    joined = labels.merge(first, left_on="id", right_on="hash", how="left").merge(
        copies, left_on="id", right_index=True, how="left"
    )
    matched = joined[joined["hash"].notna()]
    if matched.empty:
        raise DataError(
            f"no Kaggle id of {kaggle_root / 'train_labels.csv'} is the SHA-1 of a patch of the PCam "
            f"release at {release_root}: is it the release the Kaggle set was made from?"
        )
    out = matched[["id", "group", "pcam_split"]]
    write_text(kaggle_root / "pcam_slides.csv", out.to_csv(index=False))
    per_slide = out.groupby("group").size()
    summary = {
        "kaggle_labelled": len(labels),
        "matched": len(matched),
        "unmatched": int(joined["hash"].isna().sum()),
        "pcam_split_of_matched": {k: int(v) for k, v in matched["pcam_split"].value_counts().items()},
        "slides": int(per_slide.size),
        "patches_per_slide": {
            "min": int(per_slide.min()),
            "median": float(per_slide.median()),
            "max": int(per_slide.max()),
        },
        "release_patches": len(release),
        "release_duplicate_rows": int(len(release) - release["hash"].nunique()),
        "kaggle_ids_in_several_release_rows": int((matched["copies"] > 1).sum()),
        "kaggle_ids_on_several_slides": int((matched["slides"] > 1).sum()),
        "kaggle_ids_in_several_splits": int((matched["splits"] > 1).sum()),
        "label_disagreements": int((matched["label_x"] != matched["label_y"]).sum()),
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "note": "a patch in several PCam rows takes its slide and split from the most held-out one "
        "(test, valid, train)",
    }
    write_text(kaggle_root / "pcam_slides.json", json.dumps(summary, indent=1))
    log.info(
        "link-pcam: %d of %d labelled Kaggle ids matched (%s), %d slides; %d release rows are duplicates; "
        "%d Kaggle ids on several slides; %.1f s -> %s",
        summary["matched"],
        summary["kaggle_labelled"],
        summary["pcam_split_of_matched"],
        summary["slides"],
        summary["release_duplicate_rows"],
        summary["kaggle_ids_on_several_slides"],
        summary["seconds"],
        kaggle_root / "pcam_slides.csv",
    )
    return summary
