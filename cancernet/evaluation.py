"""Evaluate a checkpoint on a split (all ranks predict their shard) and write the report (rank 0).

Used at the end of training and by `python -m cancernet evaluate`.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import checkpoint, plots, report
from .config import Config
from .data.augment import Augment
from .data.loaders import image_reader
from .distributed import DistInfo
from .engine import evaluate
from .gradcam import gradcam
from .inference import store_operating_point
from .metrics import at_threshold, log_loss, threshold_for_sensitivity

log = logging.getLogger(__name__)


def predict_split(cfg: Config, dist: DistInfo, model, split_loader, tta: bool = False) -> pd.DataFrame:
    """Predictions of every image of the split, gathered on every rank (a collective)."""
    result = evaluate(model, split_loader.loader, dist, cfg.train.amp, split_loader.device_augment, tta=tta)
    return report.predictions_frame(split_loader.ids, result)


def evaluate_checkpoint(cfg: Config, dist: DistInfo, model, loaders: dict, run_dir: Path, ckpt_path: Path,
                        table: pd.DataFrame, split: str = "test", tracker=None, tta: bool = False,
                        target_sensitivity: float | None = None) -> dict | None:
    """Load ckpt_path into model, predict val and split, write the report; store the
    validation-chosen operating point in the checkpoint. Returns the metrics on rank 0."""
    checkpoint.load_model_state(model, checkpoint.load(ckpt_path), ckpt_path)
    start = time.perf_counter()
    predictions = {}
    for use_tta in (False, True) if tta else (False,):
        val = predict_split(cfg, dist, model, loaders["val"], use_tta)
        predictions[use_tta] = (val, val if split == "val" else predict_split(cfg, dist, model, loaders[split], use_tta))
    if not dist.is_main:
        return None
    val, evaluated = predictions[False]
    extra = {"checkpoint": str(ckpt_path)}
    if tta:
        extra["tta"] = {k: v for k, v in report.compute_metrics(*predictions[True]).items()
                        if k in ("accuracy", "roc_auc", "average_precision", "at_val_threshold")}
    if target_sensitivity is not None:
        t = threshold_for_sensitivity(val["label"].to_numpy(), val["prob"].to_numpy(), target_sensitivity)
        extra["target_sensitivity"] = {"target": target_sensitivity, "chosen_on": "val",
                                       "val": at_threshold(val["label"].to_numpy(), val["prob"].to_numpy(), t),
                                       split: at_threshold(evaluated["label"].to_numpy(), evaluated["prob"].to_numpy(), t)}
    summary_path = Path(run_dir) / "summary.csv"
    summary = pd.read_csv(summary_path) if summary_path.is_file() else None
    load_image = image_reader(cfg.data)
    metrics, figures = report.write_report(
        run_dir, split, val, evaluated, summary, table, load_image, extra,
        {"gradcam": lambda threshold: gradcam_figure(cfg, model, evaluated, load_image, threshold)})
    if tta:
        report.write_predictions(Path(run_dir) / "predictions" / f"{split}_tta.csv", predictions[True][1],
                                 metrics["val_threshold"]["value"])
    point = ({"threshold": extra["target_sensitivity"]["val"]["threshold"], "method": "target_sensitivity",
              "target": target_sensitivity, "chosen_on": "val"} if target_sensitivity is not None
             else {"threshold": metrics["val_threshold"]["value"], "method": "youden_j", "chosen_on": "val"})
    store_operating_point(Path(ckpt_path), point)
    log.info("%s (%s, n=%d, %.1fs): accuracy %.4f roc_auc %.4f ap %.4f loss %.4f%s; operating point %.4f (%s on "
             "val): sensitivity %.4f specificity %.4f", split, Path(ckpt_path).name, metrics["n"],
             time.perf_counter() - start, metrics["accuracy"], metrics["roc_auc"], metrics["average_precision"],
             log_loss(evaluated["label"].to_numpy(), evaluated["prob"].to_numpy()),
             f"; with TTA roc_auc {metrics['tta']['roc_auc']:.4f}" if tta else "", point["threshold"],
             point["method"], *_sens_spec(evaluated, point["threshold"]))
    if tracker is not None:
        tracker.log_images(figures)
        tracker.log_summary({f"{split}/{k}": metrics[k] for k in ("accuracy", "roc_auc", "average_precision")})
    return metrics


def _sens_spec(frame: pd.DataFrame, threshold: float) -> tuple[float, float]:
    point = at_threshold(frame["label"].to_numpy(), frame["prob"].to_numpy(), threshold)
    return point["sensitivity"], point["specificity"]


def gradcam_figure(cfg: Config, model, evaluated: pd.DataFrame, load_image, threshold: float, per_kind: int = 4):
    """Grad-CAM of up to per_kind true/false positives/negatives (the most confident of each)."""
    pred = evaluated["prob"] >= threshold
    kinds = {"TP": pred & (evaluated["label"] == 1), "FN": ~pred & (evaluated["label"] == 1),
             "FP": pred & (evaluated["label"] == 0), "TN": ~pred & (evaluated["label"] == 0)}
    picked = pd.concat([evaluated[mask].assign(kind=kind).sort_values("prob", ascending=kind in ("TP", "FP"))
                        .head(per_kind) for kind, mask in kinds.items()])
    images = np.stack([load_image(i) for i in picked["id"]])
    device = next(model.parameters()).device
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
    inputs = Augment(cfg.data, train=False)(batch)
    cams = gradcam(model, inputs)
    cams = torch.nn.functional.interpolate(cams[:, None], size=images.shape[1:3], mode="bilinear")[:, 0]
    return plots.gradcam_grid(picked, images, cams.cpu().numpy(), threshold)
