"""Rank-0 report from saved predictions: predictions CSVs, metrics.json, figures, index.html.

Nothing here talks to other ranks; callers gather predictions first.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
import torch

from cancernet.config import Config
from cancernet.data.formats import reader
from cancernet.data.patch import label_box
from cancernet.engine.rundir import RunDir
from cancernet.evaluate import grids, plots
from cancernet.evaluate.audit import describe
from cancernet.evaluate.metrics import (
    CALIBRATION,
    HEADLINE,
    METRICS,
    OPERATING,
    THRESHOLD_METRICS,
    at_threshold,
    binary_report,
    bootstrap_cis,
    group_scores,
    roc_auc,
)
from cancernet.runtime.atomic import atomic_path, write_text

log = logging.getLogger(__name__)


def predictions_frame(ids: list[str], result: dict[str, np.ndarray]) -> pd.DataFrame:
    """id, label (true), prob (class 1), log_odds, one row per evaluated image."""
    return pd.DataFrame(
        {
            "id": [ids[i] for i in result["index"]],
            "label": result["label"],
            "prob": result["prob"],
            "log_odds": result["log_odds"],
        }
    )


def write_predictions(path, frame: pd.DataFrame, threshold: float) -> None:
    frame = frame[["id", "label", "prob"]].assign(pred=(frame["prob"] >= threshold).astype(int))
    write_text(path, frame.to_csv(index=False, float_format="%.8g"))


def compute_metrics(
    evaluated: pd.DataFrame,
    point: dict,
    bootstrap: int = 1000,
    seed: int = 0,
    groups: pd.Series | None = None,
    brief: bool = False,
) -> dict:
    """Metrics of `evaluated` at 0.5 and at the operating point (chosen on validation), with 95% bootstrap
    CIs (`<metric>_ci`), and slide-level AUCs when groups (id -> group) are given."""
    labels, probs = evaluated["label"].to_numpy(), evaluated["prob"].to_numpy()
    threshold = point["threshold"]
    out = {
        **binary_report(labels, probs, 0.5),
        "at_0.5": at_threshold(labels, probs, 0.5),
        "at_val_threshold": at_threshold(labels, probs, threshold),
        "val_threshold": {"value": threshold, **point},
    }
    if bootstrap:
        cis = bootstrap_cis(labels, probs, {"at_0.5": 0.5, "at_val_threshold": threshold}, bootstrap, seed)
        out.update(
            {f"{k}_ci": cis[f"at_0.5/{k}" if METRICS[k].thresholded else k] for k in HEADLINE if METRICS[k].interval}
        )
        out["bootstrap"] = {"resamples": bootstrap, "seed": seed, "level": 0.95}
        for key in ("at_0.5", "at_val_threshold"):
            out[key].update({f"{m}_ci": cis[f"{key}/{m}"] for m in THRESHOLD_METRICS})
    if groups is not None:
        out["groups"] = group_metrics(
            evaluated.assign(group=groups.reindex(evaluated["id"]).to_numpy()), bootstrap, seed
        )
    if brief:
        keep = ("n", *HEADLINE, *(f"{k}_ci" for k in HEADLINE), "at_val_threshold", "val_threshold", "groups")
        out = {k: v for k, v in out.items() if k in keep}
    return out


def group_metrics(frame: pd.DataFrame, bootstrap: int, seed: int) -> dict:
    """Slide-level ROC AUC: a group is positive if any patch is, scored by its max or mean P(tumour)."""
    scores = group_scores(frame)
    out = {"n_groups": len(scores), "n_positive_groups": int(scores["label"].sum())}
    for how in ("max", "mean"):
        out[f"roc_auc_{how}"] = roc_auc(scores["label"].to_numpy(), scores[f"prob_{how}"].to_numpy())
        if bootstrap and scores["label"].nunique() == 2:
            out[f"roc_auc_{how}_ci"] = bootstrap_cis(scores["label"], scores[f"prob_{how}"], {}, bootstrap, seed)[
                "roc_auc"
            ]
    return out


@dataclass
class ReportInputs:
    cfg: Config  # the run's: figures, image reader, augmentation, geometry
    split: str
    val: pd.DataFrame
    evaluated: pd.DataFrame  # id, label, prob (after the temperature), log_odds
    table: pd.DataFrame  # id, label, split for every image
    raw_evaluated: pd.DataFrame | None = None  # before the temperature (reliability before/after)
    model: torch.nn.Module | None = None  # the evaluated weights (Grad-CAM)
    summary: pd.DataFrame | None = None

    @cached_property
    def load_image(self) -> Callable[[str], np.ndarray]:
        return reader(self.cfg.data)


def _history(make):
    return lambda r, t: make(r.summary) if r.summary is not None and len(r.summary) else None


def _labels_probs(r: ReportInputs):
    return r.evaluated["label"].to_numpy(), r.evaluated["prob"].to_numpy()


# name -> function(inputs, threshold) returning a Figure, or None when it does not apply
FIGURES: dict[str, Callable] = {
    "history_loss": _history(plots.history_loss),
    "history_accuracy": _history(plots.history_accuracy),
    "history_auc_lr": _history(plots.history_auc_lr),
    "confusion_matrix": lambda r, t: plots.confusion_matrix(*_labels_probs(r), t),
    "roc": lambda r, t: plots.roc(*_labels_probs(r), t),
    "precision_recall": lambda r, t: plots.precision_recall(*_labels_probs(r)),
    "prediction_distribution": lambda r, t: plots.prediction_distribution(*_labels_probs(r), t),
    "reliability": lambda r, t: plots.reliability(
        *_labels_probs(r), None if r.raw_evaluated is None else r.raw_evaluated["prob"].to_numpy()
    ),
    "label_distribution": lambda r, t: plots.label_distribution(r.table),
    "sample_grid": lambda r, t: grids.sample_grid(r.evaluated, r.load_image, t, r.split),
    "augmentation": lambda r, t: augmentation_figure(r.cfg, r.table, r.load_image),
    "gradcam": lambda r, t: gradcam_figure(r.cfg, r.model, r.evaluated, r.load_image, t) if r.model else None,
}


def gradcam_figure(cfg: Config, model, evaluated: pd.DataFrame, load_image, threshold: float, per_kind: int = 4):
    """Grad-CAM of up to per_kind true/false positives/negatives: the most confident of each kind."""
    from cancernet.data.augment import Preprocess
    from cancernet.evaluate.gradcam import GradCamUnavailable, gradcam

    picked = most_confident(evaluated, threshold, per_kind)
    images = np.stack([load_image(i) for i in picked["id"]])
    device = next(model.parameters()).device
    inputs = Preprocess.from_config(cfg.data).to(device)(torch.from_numpy(images).permute(0, 3, 1, 2).to(device))
    try:
        cams = gradcam(model, inputs)
    except GradCamUnavailable as e:
        log.warning("no Grad-CAM figure: %s", e)
        return None
    cams = torch.nn.functional.interpolate(cams[:, None], size=images.shape[1:3], mode="bilinear")[:, 0]
    return grids.gradcam_grid(picked, images, cams.cpu().numpy(), threshold)


def most_confident(evaluated: pd.DataFrame, threshold: float, per_kind: int) -> pd.DataFrame:
    """Up to per_kind TP, FN, FP, TN: the highest P(tumour) of the positive calls, the lowest of the negative."""
    pred = evaluated["prob"] >= threshold
    kinds = {
        "TP": pred & (evaluated["label"] == 1),
        "FN": ~pred & (evaluated["label"] == 1),
        "FP": pred & (evaluated["label"] == 0),
        "TN": ~pred & (evaluated["label"] == 0),
    }
    return pd.concat(
        [
            evaluated[mask].assign(kind=kind).sort_values("prob", ascending=kind in ("FN", "TN")).head(per_kind)
            for kind, mask in kinds.items()
        ]
    )


def augmentation_figure(cfg: Config, table: pd.DataFrame, load_image, n: int = 6, views: int = 5):
    """A few training patches and the augmentation this run applies to them (different epochs)."""
    from cancernet.data.augment import Augment

    train = table[table["split"] == "train"].head(n)
    images = torch.from_numpy(np.stack([load_image(i) for i in train["id"]])).permute(0, 3, 1, 2)
    augment = Augment(cfg.data, cfg.train.seed)
    index = torch.arange(len(train))
    mean, std = augment.preprocess.mean, augment.preprocess.std
    shown = [
        ((augment(images, index, epoch) * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255)
        .round()
        .astype(np.uint8)
        for epoch in range(views)
    ]
    box = label_box(cfg.data.crop, augment.preprocess.size)  # where the labelled centre lands in the views
    return grids.augmentation_grid(images.permute(0, 2, 3, 1).numpy(), shown, describe_augmentation(cfg), box)


def describe_augmentation(cfg: Config) -> str:
    d = cfg.data
    parts = [{"dihedral": "dihedral flips/turns", "seed": "flip + ±10° rotation", "none": "no geometry"}[d.augment]]
    if d.stain == "hed":
        parts.append(f"HED stain (σ {d.stain_sigma:g}, bias {d.stain_bias:g})")
    if d.jitter or d.hue:
        parts.append(f"colour jitter {d.jitter:g}, hue {d.hue:g}")
    size = f"centre {d.crop} px crop, {d.image_size} px" if d.crop else f"{d.image_size} px"
    return ", ".join(parts) + ", " + size


def write_report(run: RunDir, inputs: ReportInputs, metrics: dict) -> dict:
    """Write predictions/<split>.csv (and val.csv), report/metrics.json, the figures and index.html.

    Returns {figure name: path} of the figures written.
    """
    threshold = metrics["val_threshold"]["value"]
    write_predictions(run.predictions("val"), inputs.val, threshold)
    write_predictions(run.predictions(inputs.split), inputs.evaluated, threshold)
    write_text(run.metrics, json.dumps({"split": inputs.split, **metrics}, indent=2))
    paths = {}
    for name, make in FIGURES.items() if inputs.cfg.report.figures else ():
        figure = make(inputs, threshold)
        if figure is None:
            continue
        paths[name] = run.figure(name)
        with atomic_path(paths[name]) as tmp:
            figure.savefig(tmp, dpi=110, format="png")
    write_text(run.index_html, index_html({"split": inputs.split, **metrics}, [p.name for p in paths.values()]))
    return paths


def _ci(metrics: dict, key: str) -> str:
    ci = metrics.get(f"{key}_ci")
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _shown(metrics: dict, key: str) -> str:
    spec = METRICS[key]
    return f"{spec.short} {spec.show(metrics[key])}{_ci(metrics, key)}"


def headline(metrics: dict) -> str:
    """'AUC 0.931 [0.920, 0.942], ...': the log line and the report page's first line."""
    point = metrics["at_val_threshold"]
    text = (
        ", ".join(_shown(metrics, k) for k in HEADLINE)
        + f" at 0.5; at the val-chosen threshold {point['threshold']:.3f}: "
        + ", ".join(_shown(point, k) for k in OPERATING)
    )
    if "brier" in metrics:
        text += f"; {', '.join(_shown(metrics, k) for k in CALIBRATION)} (T = {metrics['temperature']:.3f})"
    if "groups" in metrics:
        g = metrics["groups"]
        text += f"; slide-level AUC (max) {g['roc_auc_max']:.3f}{_ci(g, 'roc_auc_max')} over {g['n_groups']} slides"
    if "tta" in metrics:
        text += f"; with TTA AUC {metrics['tta']['roc_auc']:.3f}{_ci(metrics['tta'], 'roc_auc')}"
    return text


def _row(name: str, value) -> str:
    shown = f"{value:.4f}" if isinstance(value, float) else str(value)
    return f"<tr><th>{html.escape(name)}</th><td>{html.escape(shown)}</td></tr>"


def _threshold_note(metrics: dict) -> str:
    """A line on why the operating point is where it is, when it is far from 0.5."""
    point = metrics.get("val_threshold", {})
    t = point.get("value")
    if t is None or 0.2 <= t <= 0.8:
        return ""
    how = "maximises sensitivity + specificity (Youden's J)" if point.get("method") == "youden_j" else "was chosen"
    return (
        f"<p>The operating threshold t = {t:.3f} {how} on the validation split. A threshold this far "
        "from 0.5 says the probabilities are shifted (a short or small run, or classes weighted "
        "otherwise than in training): the ranking (AUC) is what to judge; the t = 0.5 rows show what "
        "the raw probabilities give.</p>"
    )


def index_html(metrics: dict, images: list[str]) -> str:
    """One offline page: what was evaluated, the headline with CIs, both operating points, every figure."""
    facts = metrics.get("run", {})
    about = [
        ("split evaluated", f"{metrics['split']} (n = {metrics['n']:,})"),
        ("data", f"{facts.get('data_root')} ({facts.get('data_format')}); images per split {facts.get('images')}"),
        ("model", f"{facts.get('arch')} (pretrained: {facts.get('pretrained')}), {facts.get('image_size')} px"),
        (
            "training",
            f"{facts.get('epochs')} epochs; best epoch {facts.get('best_epoch', facts.get('checkpoint_epoch'))}; "
            f"{(facts.get('train_s') or 0) / 60:.1f} min training; world size {facts.get('world_size')}",
        ),
        ("leaks between splits", describe(metrics["leak_audit"]) if "leak_audit" in metrics else "not audited"),
        ("git commit", facts.get("git_commit")),
        ("checkpoint", metrics.get("checkpoint")),
    ]
    rows = [
        (
            METRICS[k].name + (" (t = 0.5)" if METRICS[k].thresholded else "") + _ci(metrics, k),
            metrics[k],
        )
        for k in HEADLINE
    ]
    for key, name in (("at_0.5", "t = 0.5"), ("at_val_threshold", "t chosen on val")):
        point = metrics[key]
        rows += [
            (
                f"{METRICS[k].name}, {name}" + (f" ({point['threshold']:.4f})" if i == 0 else "") + _ci(point, k),
                point[k],
            )
            for i, k in enumerate(OPERATING)
        ]
    if "brier" in metrics:
        rows += [(METRICS[k].name, metrics[k]) for k in CALIBRATION]
        rows.append(("temperature (fitted on val)", metrics["temperature"]))
    if "groups" in metrics:
        g = metrics["groups"]
        rows += [
            (f"slide-level ROC AUC, max ({g['n_groups']} slides)" + _ci(g, "roc_auc_max"), g["roc_auc_max"]),
            ("slide-level ROC AUC, mean" + _ci(g, "roc_auc_mean"), g["roc_auc_mean"]),
        ]
    figures = "".join(
        f'<figure><img src="{name}" alt="{name}"><figcaption>{name}</figcaption></figure>' for name in images
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>cancernet report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;margin-bottom:1em}}
th,td{{border:1px solid #ccc;padding:4px 10px;text-align:left}}figure{{display:inline-block;margin:8px}}
img{{max-width:640px}}pre{{background:#f6f6f6;padding:8px}}</style></head><body>
<h1>cancernet evaluation report</h1><p><b>{html.escape(headline(metrics))}</b></p>
<table>{"".join(_row(k, v) for k, v in about)}</table>{_threshold_note(metrics)}
<h2>Metrics (95% bootstrap intervals in brackets)</h2><table>{"".join(_row(k, v) for k, v in rows)}</table>
<h2>Classification report (t = 0.5)</h2><pre>{html.escape(metrics["classification_report"])}</pre>
<h2>Figures</h2>{figures}</body></html>
"""
