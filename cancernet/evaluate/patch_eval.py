"""Evaluate a checkpoint on a split (all ranks predict their shard) and write the report (rank 0).

Used at the end of training and by `python -m cancernet evaluate`. The steps: load the weights
(rank 0 reads the file), predict validation and the split, fit the temperature on validation,
choose operating points on validation predictions made the same way as those they apply to
(plain or TTA), hand it all to the report, store what was chosen in the checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pandas as pd
import torch

from cancernet.config import Config
from cancernet.engine import checkpoint
from cancernet.engine.predict import evaluate
from cancernet.engine.rundir import RunDir
from cancernet.evaluate import report
from cancernet.evaluate.audit import audit_run
from cancernet.evaluate.metrics import (
    CALIBRATION,
    HEADLINE,
    METRICS,
    apply_temperature,
    at_threshold,
    fit_temperature,
    nll_from_log_odds,
    threshold_for_sensitivity,
    youden_threshold,
)
from cancernet.runtime.distributed import DistInfo

log = logging.getLogger(__name__)


@dataclass
class Request:
    split: str = "test"
    tta: bool = False
    target_sensitivity: float | None = None
    calibrate: bool = True  # fit a new temperature (else keep the checkpoint's, if any)


@dataclass
class Setup:
    """What evaluating a run's checkpoint needs: its config, the model to load weights into, the
    run's table and the loaders of its splits."""

    cfg: Config
    dist: DistInfo
    run: RunDir
    model: torch.nn.Module
    table: pd.DataFrame
    loaders: dict
    score: torch.nn.Module | None = None  # what runs on the loaders' inputs, when not model (stored features)


def open_run(run: RunDir, cfg: Config, dist: DistInfo, split: str) -> Setup:
    """The model and loaders of a run directory, for its own splits (the evaluate command)."""
    from cancernet.engine.loaders import load_table, make_loader
    from cancernet.models.classifier import build_for_weights

    table, _ = load_table(cfg, dist, run.read_splits())
    loaders = {
        s: make_loader(cfg, dist, table[table["split"] == s], train=False) for s in dict.fromkeys(["val", split])
    }
    return Setup(cfg, dist, run, build_for_weights(cfg).to(dist.device), table, loaders)


def predict_split(setup: Setup, split: str, tta: bool = False, temperature: float = 1.0) -> pd.DataFrame:
    """Predictions of every image of the split, gathered on every rank (a collective)."""
    loader = setup.loaders[split]
    model = setup.score if setup.score is not None else setup.model
    result = evaluate(model, loader.loader, loader.preprocess, setup.dist, setup.cfg.train.amp, tta, temperature)
    return report.predictions_frame(loader.ids, result)


def calibration_summary(val: pd.DataFrame, evaluated: pd.DataFrame, temperature: float) -> dict:
    """NLL on validation, Brier and ECE on the split, before and after the temperature."""

    def measures(t: float) -> dict:
        probs = apply_temperature(evaluated["log_odds"], t)
        return {
            "val_nll": nll_from_log_odds(val["label"], val["log_odds"], t),
            **{k: METRICS[k](evaluated["label"], probs) for k in CALIBRATION},
        }

    return {"temperature": temperature, "fitted_on": "val", "before": measures(1.0), "after": measures(temperature)}


def tempered(frame: pd.DataFrame, temperature: float) -> pd.DataFrame:
    return frame.assign(
        prob=apply_temperature(frame["log_odds"], temperature), log_odds=frame["log_odds"] / temperature
    )


def operating_point(val: pd.DataFrame, target: float | None, tta: bool, temperature: float) -> dict:
    """The threshold chosen on validation predictions made like those it will label."""
    labels, probs = val["label"].to_numpy(), val["prob"].to_numpy()
    if target is None:
        point = {"threshold": youden_threshold(labels, probs), "method": "youden_j"}
    else:
        point = {
            "threshold": threshold_for_sensitivity(labels, probs, target),
            "method": "target_sensitivity",
            "target": target,
        }
    return {**point, "chosen_on": "val", "tta": tta, "temperature": temperature}


def run_facts(setup: Setup, ckpt: checkpoint.Checkpoint, extra: dict | None) -> dict:
    """What a reader needs to judge the report: data, model, training length, provenance."""
    cfg, meta, summary = setup.cfg, setup.run.read_meta(), setup.run.read_summary()
    trained = summary is not None and len(summary) > 0
    return {
        "data_root": cfg.data.root,
        "data_format": cfg.data.format,
        "images": {str(k): int(v) for k, v in setup.table["split"].value_counts().items()},
        "arch": cfg.model.arch,
        "pretrained": cfg.model.pretrained,
        "image_size": cfg.data.image_size,
        "epochs": int(summary["epoch"].max()) if trained else None,
        "checkpoint_epoch": ckpt.epoch,
        "train_s": float(summary["epoch_s"].sum()) if trained else None,
        "git_commit": meta.get("git_commit"),
        "world_size": meta.get("world_size"),
        **(extra or {}),
    }


def evaluate_checkpoint(
    setup: Setup, path, request: Request, tracker=None, extra_facts: dict | None = None
) -> dict | None:
    """Every rank predicts; rank 0 writes the report and stores the operating points. Returns the
    metrics on rank 0."""
    ckpt = checkpoint.load_on_main(path, setup.model, setup.dist)
    start, split = time.perf_counter(), request.split
    val_raw = predict_split(setup, "val")
    split_raw = val_raw if split == "val" else predict_split(setup, split)
    temperature = (
        fit_temperature(val_raw["label"].to_numpy(), val_raw["log_odds"].to_numpy())
        if request.calibrate
        else ckpt.temperature()
    )
    val, evaluated = tempered(val_raw, temperature), tempered(split_raw, temperature)
    if request.tta:
        val_tta = predict_split(setup, "val", True, temperature)
        split_tta = val_tta if split == "val" else predict_split(setup, split, True, temperature)
    if not setup.dist.is_main:
        return None
    cfg, table = setup.cfg, setup.table
    groups = table.set_index("id")["group"] if "group" in table.columns else None
    point = operating_point(val, request.target_sensitivity, False, temperature)
    metrics = report.compute_metrics(evaluated, point, cfg.report.bootstrap, cfg.train.seed, groups)
    metrics.update(
        checkpoint=str(path),
        temperature=temperature,
        **{k: METRICS[k](evaluated["label"], evaluated["prob"]) for k in CALIBRATION},
        run=run_facts(setup, ckpt, extra_facts),
        leak_audit=audit_run(cfg, table),
    )
    if request.calibrate or temperature != 1.0:
        metrics["calibration"] = calibration_summary(val_raw, split_raw, temperature)
    tta_point = None
    if request.tta:
        tta_point = operating_point(val_tta, request.target_sensitivity, True, temperature)
        metrics["tta"] = report.compute_metrics(
            split_tta, tta_point, cfg.report.bootstrap, cfg.train.seed, groups, brief=True
        )
        for name, frame in (("val", val_tta), (split, split_tta)):
            report.write_predictions(setup.run.predictions(name, tta=True), frame, tta_point["threshold"])
    if request.target_sensitivity is not None:
        metrics["target_sensitivity"] = {
            "target": request.target_sensitivity,
            "chosen_on": "val",
            "val": at_threshold(val["label"].to_numpy(), val["prob"].to_numpy(), point["threshold"]),
            split: metrics["at_val_threshold"],
        }
    figures = report.write_report(
        setup.run,
        report.ReportInputs(
            cfg=cfg,
            split=split,
            val=val,
            evaluated=evaluated,
            table=table,
            raw_evaluated=split_raw,
            model=setup.model,
            summary=setup.run.read_summary(),
        ),
        metrics,
    )
    checkpoint.store_evaluation(path, temperature, point, tta_point)
    log.info(
        "%s (%s, n=%d, %.1fs): %s",
        split,
        getattr(path, "name", path),
        metrics["n"],
        time.perf_counter() - start,
        report.headline(metrics),
    )
    log.info("report: open %s", setup.run.index_html)
    if tracker is not None:
        tracker.log_images(figures)
        tracker.log_summary({f"{split}/{k}": metrics[k] for k in (*HEADLINE, *CALIBRATION) if k in metrics})
    return metrics


def evaluate_run(
    cfg: Config,
    dist: DistInfo,
    run: RunDir,
    model: torch.nn.Module,
    table: pd.DataFrame,
    loaders: dict,
    score: torch.nn.Module | None,
    tracker,
    extra_facts: dict,
) -> dict | None:
    """The end of training: the run's best checkpoint, loaded into its own model, on the test split."""
    setup = Setup(cfg, dist, run, model, table, loaders, score)
    return evaluate_checkpoint(
        setup, run.best, Request(split="test", calibrate=cfg.report.calibrate), tracker, extra_facts
    )
