"""Evaluate a checkpoint on a split (all ranks predict their shard) and write the report (rank 0).

Used at the end of training and by `python -m cancernet evaluate`.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd

from . import checkpoint, report
from .config import Config
from .data.loaders import image_reader
from .distributed import DistInfo
from .engine import evaluate
from .metrics import log_loss

log = logging.getLogger(__name__)


def predict_split(cfg: Config, dist: DistInfo, model, split_loader) -> pd.DataFrame:
    """Predictions of every image of the split, gathered on every rank (a collective)."""
    result = evaluate(model, split_loader.loader, dist, cfg.train.amp, split_loader.device_augment)
    return report.predictions_frame(split_loader.ids, result)


def evaluate_checkpoint(cfg: Config, dist: DistInfo, model, loaders: dict, run_dir: Path,
                        ckpt_path: Path, table: pd.DataFrame, split: str = "test", tracker=None) -> dict | None:
    """Load ckpt_path into model, predict val and split, write the report. Metrics on rank 0."""
    checkpoint.load_model_state(model, checkpoint.load(ckpt_path), ckpt_path)
    start = time.perf_counter()
    val = predict_split(cfg, dist, model, loaders["val"])
    evaluated = val if split == "val" else predict_split(cfg, dist, model, loaders[split])
    if not dist.is_main:
        return None
    summary_path = Path(run_dir) / "summary.csv"
    summary = pd.read_csv(summary_path) if summary_path.is_file() else None
    metrics, figures = report.write_report(run_dir, split, val, evaluated, summary, table,
                                           image_reader(cfg.data), {"checkpoint": str(ckpt_path)})
    log.info("%s (%s, n=%d, %.1fs): accuracy %.4f roc_auc %.4f ap %.4f loss %.4f; at the val-chosen "
             "threshold %.3f: sensitivity %.4f specificity %.4f", split, Path(ckpt_path).name,
             metrics["n"], time.perf_counter() - start, metrics["accuracy"], metrics["roc_auc"],
             metrics["average_precision"], log_loss(evaluated["label"].to_numpy(), evaluated["prob"].to_numpy()),
             metrics["val_threshold"]["value"], metrics["at_val_threshold"]["sensitivity"],
             metrics["at_val_threshold"]["specificity"])
    if tracker is not None:
        tracker.log_images(figures)
        tracker.log_summary({f"{split}/{k}": metrics[k] for k in ("accuracy", "roc_auc", "average_precision")})
    return metrics
