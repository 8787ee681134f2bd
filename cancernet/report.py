"""Rank-0 outputs after evaluation: predictions CSV and report/metrics.json (no collectives)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import write_text
from .metrics import binary_report


def predictions_frame(ids: list[str], result: dict[str, np.ndarray], threshold: float = 0.5) -> pd.DataFrame:
    """id, label (true), prob (class 1), pred (at threshold), one row per evaluated image."""
    return pd.DataFrame({"id": [ids[i] for i in result["index"]], "label": result["label"],
                         "prob": result["prob"], "pred": (result["prob"] >= threshold).astype(int)})


def write_predictions(path: Path, frame: pd.DataFrame) -> None:
    write_text(path, frame.to_csv(index=False, float_format="%.6f"))


def write_metrics(run_dir: Path, test: pd.DataFrame) -> dict:
    metrics = binary_report(test["label"].to_numpy(), test["prob"].to_numpy())
    write_text(Path(run_dir) / "report" / "metrics.json", json.dumps(metrics, indent=2))
    return metrics
