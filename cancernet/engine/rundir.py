"""RunDir: every path of a run directory (train.out_dir), and the readers of its files, in one place."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from cancernet.runtime.distributed import DistInfo, barrier, on_main
from cancernet.runtime.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def summary(self) -> Path:
        return self.root / "summary.csv"

    @property
    def splits(self) -> Path:
        return self.root / "splits.csv"

    @property
    def bad_images(self) -> Path:
        return self.root / "bad_images.csv"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    def checkpoint(self, name: str) -> Path:
        """best | last | any path."""
        return {"best": self.best, "last": self.last}.get(name, Path(name))

    def predictions(self, split: str, tta: bool = False) -> Path:
        return self.root / "predictions" / f"{split}{'_tta' if tta else ''}.csv"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def metrics(self) -> Path:
        return self.report / "metrics.json"

    def figure(self, name: str) -> Path:
        return self.report / f"{name}.png"

    @property
    def index_html(self) -> Path:
        return self.report / "index.html"

    def read_splits(self) -> pd.DataFrame | None:
        """splits.csv (id, split), or None before the run wrote it."""
        return pd.read_csv(self.splits, dtype={"id": str}) if self.splits.is_file() else None

    def read_summary(self) -> pd.DataFrame | None:
        """summary.csv (one row per epoch), or None when there is none yet."""
        return pd.read_csv(self.summary) if self.summary.is_file() else None

    def load_config(self, overrides: list[str] = ()):
        """The run's config.yaml with key=value overrides (a cancernet.config.Config)."""
        from cancernet.config import load_config
        from cancernet.runtime.errors import UserError

        if not self.config.is_file():
            raise UserError(f"{self.root} is not a run directory (no config.yaml)")
        return load_config(self.config, overrides)

    def read_meta(self) -> dict:
        """config.yaml's meta section: git commit, torch version, world size, what a time budget fixed."""
        return (yaml.safe_load(self.config.read_text()) or {}).get("meta", {}) if self.config.is_file() else {}

    def holds_a_run(self) -> bool:
        return any(p.exists() for p in (self.config, self.summary, self.splits, self.checkpoints))

    def clear(self) -> None:
        """Remove the files a run writes (train.overwrite=true); anything else stays."""
        for path in (self.config, self.summary, self.splits, self.bad_images):
            path.unlink(missing_ok=True)
        for folder in (self.checkpoints, self.root / "predictions", self.report):
            shutil.rmtree(folder, ignore_errors=True)


def prepare_run_dir(cfg, dist: DistInfo, run: RunDir):
    """The checkpoint to resume from (or None), decided by rank 0 alone and sent to every rank; a
    fresh run never mixes with an earlier one. Only rank 0 looks: on a shared filesystem another
    node may not see a last.pt written seconds ago (a stale directory cache), and would start
    afresh while the others resume. cfg: a cancernet.config.Config; a collective."""
    resume_from = on_main(lambda: _decide(cfg, run), dist)
    barrier(dist)  # rank 0 has cleared what it had to before any rank writes
    return resume_from


def _decide(cfg, run: RunDir):
    from cancernet.engine.checkpoint import resume_path

    resume_from = resume_path(cfg.train.resume, run.last)
    if resume_from is None and run.holds_a_run():
        if cfg.train.resume == "none" and not cfg.train.overwrite:
            raise UserError(
                f"train.out_dir {run.root} already holds a run: continue it with train.resume=auto, "
                "choose a new train.out_dir, or replace it with train.overwrite=true"
            )
        why = "train.overwrite=true" if cfg.train.resume == "none" else "an earlier start that never wrote a checkpoint"
        log.warning("%s: replacing the run files there (%s)", run.root, why)
        run.clear()
    return resume_from
