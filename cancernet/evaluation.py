"""Evaluate a checkpoint on a split (all ranks predict their shard) and write the report (rank 0).

Used at the end of training and by `python -m cancernet evaluate`. The steps: load the weights,
predict validation and the split, fit the temperature, choose operating points on validation
predictions made the same way as those they apply to (plain or TTA), write the report, store
what was chosen in the checkpoint.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import yaml

from . import checkpoint, report
from .config import Config
from .data.loaders import image_reader
from .distributed import DistInfo
from .engine import evaluate
from .metrics import (apply_temperature, at_threshold, brier, expected_calibration_error, fit_temperature,
                      nll_from_log_odds, threshold_for_sensitivity, youden_threshold)
from .rundir import RunDir

log = logging.getLogger(__name__)


@dataclass
class Request:
    split: str = "test"
    tta: bool = False
    target_sensitivity: float | None = None
    calibrate: bool = True  # fit a new temperature (else keep the checkpoint's, if any)


def predict_split(cfg: Config, dist: DistInfo, model, split_loader, tta: bool = False,
                  temperature: float = 1.0) -> pd.DataFrame:
    """Predictions of every image of the split, gathered on every rank (a collective)."""
    result = evaluate(model, split_loader.loader, split_loader.preprocess, dist, cfg.train.amp, tta, temperature)
    return report.predictions_frame(split_loader.ids, result)


def calibration_summary(val: pd.DataFrame, evaluated: pd.DataFrame, temperature: float) -> dict:
    """NLL on validation, Brier and ECE on the split, before and after the temperature."""
    def measures(t: float) -> dict:
        probs = apply_temperature(evaluated["log_odds"], t)
        return {"val_nll": nll_from_log_odds(val["label"], val["log_odds"], t),
                "brier": brier(evaluated["label"], probs), "ece": expected_calibration_error(evaluated["label"], probs)}
    return {"temperature": temperature, "fitted_on": "val", "before": measures(1.0), "after": measures(temperature)}


def tempered(frame: pd.DataFrame, temperature: float) -> pd.DataFrame:
    return frame.assign(prob=apply_temperature(frame["log_odds"], temperature), log_odds=frame["log_odds"] / temperature)


def operating_point(val: pd.DataFrame, target: float | None, tta: bool, temperature: float) -> dict:
    """The threshold chosen on validation predictions made like those it will label."""
    labels, probs = val["label"].to_numpy(), val["prob"].to_numpy()
    if target is None:
        point = {"threshold": youden_threshold(labels, probs), "method": "youden_j"}
    else:
        point = {"threshold": threshold_for_sensitivity(labels, probs, target), "method": "target_sensitivity",
                 "target": target}
    return {**point, "chosen_on": "val", "tta": tta, "temperature": temperature}


def run_facts(cfg: Config, run: RunDir, table: pd.DataFrame, ckpt_state: dict, extra: dict | None) -> dict:
    """What a reader needs to judge the report: data, model, training length, provenance."""
    meta = (yaml.safe_load(run.config.read_text()) or {}).get("meta", {}) if run.config.is_file() else {}
    summary = pd.read_csv(run.summary) if run.summary.is_file() else None
    return {"data_root": cfg.data.root, "data_format": cfg.data.format,
            "images": {str(k): int(v) for k, v in table["split"].value_counts().items()},
            "arch": cfg.model.arch, "pretrained": cfg.model.pretrained, "image_size": cfg.data.image_size,
            "epochs": int(summary["epoch"].max()) if summary is not None and len(summary) else None,
            "checkpoint_epoch": ckpt_state.get("epoch"),
            "train_s": float(summary["epoch_s"].sum()) if summary is not None and len(summary) else None,
            "git_commit": meta.get("git_commit"), "world_size": meta.get("world_size"), **(extra or {})}


def evaluate_checkpoint(cfg: Config, dist: DistInfo, model, loaders: dict, run: RunDir, table: pd.DataFrame,
                        ckpt, request: Request, tracker=None, extra_facts: dict | None = None) -> dict | None:
    """Every rank predicts; rank 0 writes the report and stores the operating points. Returns the
    metrics on rank 0."""
    state = checkpoint.load_on_main(ckpt, model, dist)
    start = time.perf_counter()
    val_raw = predict_split(cfg, dist, model, loaders["val"])
    split_raw = val_raw if request.split == "val" else predict_split(cfg, dist, model, loaders[request.split])
    temperature = (fit_temperature(val_raw["label"].to_numpy(), val_raw["log_odds"].to_numpy()) if request.calibrate
                   else float(state.get("temperature") or 1.0))
    val, evaluated = tempered(val_raw, temperature), tempered(split_raw, temperature)
    if request.tta:
        val_tta = predict_split(cfg, dist, model, loaders["val"], True, temperature)
        split_tta = val_tta if request.split == "val" else predict_split(cfg, dist, model, loaders[request.split],
                                                                         True, temperature)
    if not dist.is_main:
        return None
    groups = table.set_index("id")["group"] if "group" in table.columns else None
    point = operating_point(val, request.target_sensitivity, False, temperature)
    metrics = report.compute_metrics(evaluated, point, cfg.report.bootstrap, cfg.train.seed, groups)
    metrics.update(checkpoint=str(ckpt), temperature=temperature, brier=brier(evaluated["label"], evaluated["prob"]),
                   ece=expected_calibration_error(evaluated["label"], evaluated["prob"]),
                   run=run_facts(cfg, run, table, state, extra_facts))
    if request.calibrate or temperature != 1.0:
        metrics["calibration"] = calibration_summary(val_raw, split_raw, temperature)
    stored = {"operating_point": point, "temperature": temperature}
    if request.tta:
        tta_point = operating_point(val_tta, request.target_sensitivity, True, temperature)
        metrics["tta"] = report.compute_metrics(split_tta, tta_point, cfg.report.bootstrap, cfg.train.seed,
                                                groups, brief=True)
        stored["operating_point_tta"] = tta_point
        for name, frame in (("val", val_tta), (request.split, split_tta)):
            report.write_predictions(run.predictions(name, tta=True), frame, tta_point["threshold"])
    if request.target_sensitivity is not None:
        metrics["target_sensitivity"] = {"target": request.target_sensitivity, "chosen_on": "val",
                                         "val": at_threshold(val["label"].to_numpy(), val["prob"].to_numpy(), point["threshold"]),
                                         request.split: metrics["at_val_threshold"]}
    figures = report.write_report(run, report.ReportInputs(
        split=request.split, val=val, evaluated=evaluated, table=table, load_image=image_reader(cfg.data),
        summary=pd.read_csv(run.summary) if run.summary.is_file() else None, raw_evaluated=split_raw,
        gradcam=(lambda threshold: gradcam_figure(cfg, model, evaluated, image_reader(cfg.data), threshold))
        if cfg.report.figures else None,
        augmentation=(lambda: augmentation_figure(cfg, table, image_reader(cfg.data))) if cfg.report.figures else None,
        figures=cfg.report.figures), metrics)
    checkpoint.store_evaluation(ckpt, stored)
    log.info("%s (%s, n=%d, %.1fs): %s", request.split, ckpt.name if hasattr(ckpt, "name") else ckpt, metrics["n"],
             time.perf_counter() - start, report.headline(metrics))
    if tracker is not None:
        tracker.log_images(figures)
        tracker.log_summary({f"{request.split}/{k}": metrics[k] for k in
                             ("accuracy", "roc_auc", "average_precision", "brier", "ece")})
    return metrics


def evaluate_run(cfg: Config, dist: DistInfo, model, loaders: dict, run: RunDir, table: pd.DataFrame, tracker,
                 extra_facts: dict) -> dict | None:
    """The end of training: the best checkpoint on the test split."""
    return evaluate_checkpoint(cfg, dist, model, loaders, run, table, run.best,
                               Request(split="test", calibrate=cfg.report.calibrate), tracker, extra_facts)


def gradcam_figure(cfg: Config, model, evaluated: pd.DataFrame, load_image, threshold: float, per_kind: int = 4):
    """Grad-CAM of up to per_kind true/false positives/negatives: the most confident of each kind."""
    import torch

    from . import plots
    from .data.augment import Preprocess
    from .gradcam import GradCamUnavailable, gradcam

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
    return plots.gradcam_grid(picked, images, cams.cpu().numpy(), threshold)


def most_confident(evaluated: pd.DataFrame, threshold: float, per_kind: int) -> pd.DataFrame:
    """Up to per_kind TP, FN, FP, TN: the highest P(tumour) of the positive calls, the lowest of the negative."""
    pred = evaluated["prob"] >= threshold
    kinds = {"TP": pred & (evaluated["label"] == 1), "FN": ~pred & (evaluated["label"] == 1),
             "FP": pred & (evaluated["label"] == 0), "TN": ~pred & (evaluated["label"] == 0)}
    return pd.concat([evaluated[mask].assign(kind=kind).sort_values("prob", ascending=kind in ("FN", "TN"))
                      .head(per_kind) for kind, mask in kinds.items()])


def augmentation_figure(cfg: Config, table: pd.DataFrame, load_image, n: int = 6, views: int = 5):
    """A few training patches and the augmentation this run applies to them (different epochs)."""
    import torch

    from . import plots
    from .data.augment import Augment

    train = table[table["split"] == "train"].head(n)
    images = torch.from_numpy(np.stack([load_image(i) for i in train["id"]])).permute(0, 3, 1, 2)
    augment = Augment(cfg.data, cfg.train.seed)
    index = torch.arange(len(train))
    mean, std = torch.tensor(cfg.data.mean).view(1, 3, 1, 1), torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    shown = [((augment(images, index, epoch) * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255)
             .round().astype(np.uint8) for epoch in range(views)]
    crop = cfg.data.crop or 96
    scale = cfg.data.image_size / crop
    box = ((32 - (96 - crop) / 2) * scale, 32 * scale)  # where the labelled centre lands in the views
    return plots.augmentation_grid(images.permute(0, 2, 3, 1).numpy(), shown, describe_augmentation(cfg), box)


def describe_augmentation(cfg: Config) -> str:
    d = cfg.data
    parts = [{"dihedral": "dihedral flips/turns", "seed": "flip + ±10° rotation", "none": "no geometry"}[d.augment]]
    if d.stain == "hed":
        parts.append(f"HED stain (σ {d.stain_sigma:g}, bias {d.stain_bias:g})")
    if d.jitter or d.hue:
        parts.append(f"colour jitter {d.jitter:g}, hue {d.hue:g}")
    size = f"centre {d.crop} px crop, {d.image_size} px" if d.crop else f"{d.image_size} px"
    return ", ".join(parts) + ", " + size
