"""Rank-0 report from saved predictions: predictions CSVs, metrics.json, figures, index.html.

Nothing here talks to other ranks; callers gather predictions first.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from . import plots
from .atomic import atomic_path, write_text
from .metrics import at_threshold, binary_report, youden_threshold

FIGURES = ("history_loss", "history_accuracy", "history_auc_lr", "confusion_matrix", "roc",
           "precision_recall", "prediction_distribution", "label_distribution", "sample_grid", "gradcam")


def predictions_frame(ids: list[str], result: dict[str, np.ndarray]) -> pd.DataFrame:
    """id, label (true), prob (class 1), one row per evaluated image."""
    return pd.DataFrame({"id": [ids[i] for i in result["index"]], "label": result["label"],
                         "prob": result["prob"]})


def write_predictions(path: Path, frame: pd.DataFrame, threshold: float) -> None:
    frame = frame.assign(pred=(frame["prob"] >= threshold).astype(int))
    write_text(path, frame.to_csv(index=False, float_format="%.8g"))


def compute_metrics(val: pd.DataFrame, evaluated: pd.DataFrame) -> dict:
    """Metrics of `evaluated` at 0.5 and at the threshold chosen on `val` (Youden's J)."""
    threshold = youden_threshold(val["label"].to_numpy(), val["prob"].to_numpy())
    labels, probs = evaluated["label"].to_numpy(), evaluated["prob"].to_numpy()
    return {**binary_report(labels, probs, 0.5),
            "at_0.5": at_threshold(labels, probs, 0.5),
            "at_val_threshold": at_threshold(labels, probs, threshold),
            "val_threshold": {"value": threshold, "method": "youden_j", "chosen_on": "val"}}


def write_report(run_dir: Path, split: str, val: pd.DataFrame, evaluated: pd.DataFrame,
                 summary: pd.DataFrame | None, table: pd.DataFrame,
                 load_image: Callable[[str], np.ndarray], extra: dict | None = None,
                 extra_figures: dict | None = None) -> tuple[dict, dict]:
    """Write predictions/<split>.csv, report/metrics.json, figures and index.html.

    extra: more metrics.json entries; extra_figures: {name: function(threshold) -> Figure}.
    Returns (metrics, {figure name: path}).
    """
    run_dir = Path(run_dir)
    metrics = {"split": split, **compute_metrics(val, evaluated), **(extra or {})}
    threshold = metrics["val_threshold"]["value"]
    write_predictions(run_dir / "predictions" / "val.csv", val, threshold)
    write_predictions(run_dir / "predictions" / f"{split}.csv", evaluated, threshold)
    report_dir = run_dir / "report"
    write_text(report_dir / "metrics.json", json.dumps(metrics, indent=2))
    labels, probs = evaluated["label"].to_numpy(), evaluated["prob"].to_numpy()
    figures = {
        "confusion_matrix": lambda: plots.confusion_matrix(labels, probs, threshold),
        "roc": lambda: plots.roc(labels, probs, threshold),
        "precision_recall": lambda: plots.precision_recall(labels, probs),
        "prediction_distribution": lambda: plots.prediction_distribution(labels, probs, threshold),
        "label_distribution": lambda: plots.label_distribution(table),
        "sample_grid": lambda: plots.sample_grid(evaluated, load_image, threshold),
        **{name: (lambda make=make: make(threshold)) for name, make in (extra_figures or {}).items()},
    }
    if summary is not None and len(summary):
        figures = {"history_loss": lambda: plots.history_loss(summary),
                   "history_accuracy": lambda: plots.history_accuracy(summary),
                   "history_auc_lr": lambda: plots.history_auc_lr(summary), **figures}
    paths = {}
    for name, make in figures.items():
        paths[name] = report_dir / f"{name}.png"
        with atomic_path(paths[name]) as tmp:
            make().savefig(tmp, dpi=110, format="png")
    write_text(report_dir / "index.html", index_html(metrics, [p.name for p in paths.values()]))
    return metrics, paths


def index_html(metrics: dict, images: list[str]) -> str:
    """One offline page: the headline metrics, both operating points, and every figure."""
    rows = [("split", metrics["split"]), ("n", metrics["n"]), ("accuracy (t=0.5)", metrics["accuracy"]),
            ("ROC AUC", metrics["roc_auc"]), ("average precision", metrics["average_precision"])]
    for key, name in (("at_0.5", "t = 0.5"), ("at_val_threshold", "t chosen on val (Youden)")):
        point = metrics[key]
        rows += [(f"sensitivity, {name} ({point['threshold']:.4f})", point["sensitivity"]),
                 (f"specificity, {name}", point["specificity"])]
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{v:.4f}</td></tr>" if isinstance(v, float)
                    else f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in rows)
    figures = "".join(f'<figure><img src="{name}" alt="{name}"><figcaption>{name}</figcaption></figure>'
                      for name in images)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>cancernet report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:4px 10px;text-align:left}}figure{{display:inline-block;margin:8px}}
img{{max-width:640px}}pre{{background:#f6f6f6;padding:8px}}</style></head><body>
<h1>cancernet evaluation report</h1><table>{cells}</table>
<h2>Classification report (t = 0.5)</h2><pre>{html.escape(metrics["classification_report"])}</pre>
<h2>Figures</h2>{figures}</body></html>
"""
