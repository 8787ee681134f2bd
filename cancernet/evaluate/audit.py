"""Leak audit of a run's splits: patches whose pixels appear in more than one split (exact
duplicates: PCam has them), and, when slides are known, slides in more than one split.

`python -m cancernet audit RUN_DIR` prints it (and writes RUN_DIR/report/audit.json); every
report carries it too (`leak_audit` in metrics.json, a line on the report page).
"""

from __future__ import annotations

import pandas as pd

from cancernet.config import Config
from cancernet.data.formats import format_of, open_source_pack, reader
from cancernet.data.patch import pixel_hash


def pixel_hashes(cfg: Config, ids: list[str]) -> tuple[pd.Series, str]:
    """(id -> SHA-1 of its pixels, where they came from): Kaggle ids that the run verified are
    those hashes; a PCam pack recorded them when it was made; otherwise each patch is read."""
    fmt = format_of(cfg.data)
    if fmt.packed:
        meta = open_source_pack(cfg.data).path / "meta.csv"
        if meta.is_file():
            table = pd.read_csv(meta, dtype={"id": str}, usecols=lambda c: c in ("id", "sha1"))
            if "sha1" in table.columns:
                return table.set_index("id")["sha1"].reindex(ids), "the pack's record"
    known = fmt.source.known_hashes(cfg.data, ids)
    if known is not None:
        return known
    read = reader(cfg.data)
    return pd.Series([pixel_hash(read(i)) for i in ids], index=ids), "each patch read"


def leak_audit(table: pd.DataFrame, hashes: pd.Series, source: str = "") -> dict:
    """Counts of what crosses splits in table (id, split[, group])."""
    frame = table.assign(hash=hashes.reindex(table["id"]).to_numpy())
    spread = frame.groupby("hash")["split"].nunique()
    crossing = spread[spread > 1].index
    out = {
        "patches": len(frame),
        "hashes_from": source,
        "duplicate_patches": int(len(frame) - frame["hash"].nunique()),
        "patches_whose_pixels_are_in_several_splits": int(frame["hash"].isin(crossing).sum()),
        "distinct_pixels_in_several_splits": len(crossing),
    }
    if "group" in frame.columns:
        slides = frame.groupby("group")["split"].nunique()
        leaking = slides[slides > 1].index
        out.update(
            slides=len(slides),
            slides_in_several_splits=len(leaking),
            patches_of_such_slides=int(frame["group"].isin(leaking).sum()),
        )
    return out


def describe(audit: dict) -> str:
    """The report's line."""
    text = (
        f"leak audit: {audit['patches_whose_pixels_are_in_several_splits']} of {audit['patches']} patches have "
        f"pixels that are in more than one split ({audit['duplicate_patches']} exact duplicates in all)"
    )
    if "slides" in audit:
        text += f"; {audit['slides_in_several_splits']} of {audit['slides']} slides are in more than one split"
    return text


def audit_run(cfg: Config, table: pd.DataFrame) -> dict:
    hashes, source = pixel_hashes(cfg, table["id"].tolist())
    return leak_audit(table, hashes, source)


def audit_saved_run(run_dir, overrides: list[str] = ()) -> dict:
    """The audit command: the leak audit of a run directory's splits.csv, written to
    report/audit.json."""
    import json

    from cancernet.engine.loaders import load_table
    from cancernet.engine.rundir import RunDir
    from cancernet.runtime.atomic import write_text
    from cancernet.runtime.distributed import DistInfo
    from cancernet.runtime.errors import UserError

    run = RunDir(run_dir)
    cfg = run.load_config(list(overrides))
    saved = run.read_splits()
    if saved is None:
        raise UserError(f"{run.root} has no splits.csv: nothing to audit")
    table, _ = load_table(cfg, DistInfo(), saved)
    audit = audit_run(cfg, table)
    write_text(run.report / "audit.json", json.dumps(audit, indent=1))
    return audit
