"""A slide-level (MIL) model's evaluation: every bag scored over the ranks, and the test report.

score_bags gives each slide's logit, probability, loss and attention statistics (gathered on
every rank); test_report scores the validation and test bags with best.pt, fits a temperature
(report.calibrate) and chooses the threshold on validation (both stored in best.pt for
predict-slide), and writes the per-slide predictions, metrics.json (slide-level AUC, AP,
accuracy, balanced accuracy, sensitivity and specificity at that threshold with bootstrap
intervals, Brier score, ECE), the ROC and the confusion matrix.
"""

from __future__ import annotations

import html
import json
import logging
import math

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from cancernet.config import SLIDE, Config
from cancernet.data.bags import Bags, bag_loader
from cancernet.data.datasets import ShardSampler
from cancernet.engine import checkpoint
from cancernet.engine.predict import autocast
from cancernet.engine.rundir import RunDir
from cancernet.evaluate import plots, report
from cancernet.evaluate.metrics import CALIBRATION, METRICS, apply_temperature, fit_temperature
from cancernet.evaluate.patch_eval import operating_point
from cancernet.evaluate.slide_baselines import baselines, describe
from cancernet.runtime.atomic import atomic_path, write_text
from cancernet.runtime.distributed import DistInfo, gather_objects

log = logging.getLogger(__name__)


def scoring_loader(bags: Bags, dist: DistInfo, workers: int) -> DataLoader:
    """Every bag once over the ranks (contiguous shards); kept for the run (persistent workers)."""
    sampler = ShardSampler(len(bags), dist.rank, dist.world_size)
    return bag_loader(bags, sampler, workers, pin_memory=dist.device.type == "cuda")


def score_bags(model, loader: DataLoader, dist: DistInfo, amp: str) -> pd.DataFrame:
    """Every bag of a scoring_loader, all its tiles; on every rank: index, logit, loss, and the
    attention statistics (max, and its entropy relative to uniform). The device's numbers come
    to the host once, at the end (no wait for the device per bag)."""
    bags, index, tiles, stats = loader.dataset, [], [], []
    model.eval()
    with torch.no_grad():
        for feats, _, i in loader:
            with autocast(dist.device, amp):
                logit, attention = model(feats[None].to(dist.device, non_blocking=True).float())
            weights = torch.softmax(attention.float()[0], 0)
            entropy = -(weights * weights.clamp_min(1e-12).log()).sum() / max(math.log(len(weights)), 1e-12)
            stats.append(torch.stack([logit.float()[0], weights.max(), entropy, weights.argmax().float()]))
            index.append(int(i))
            tiles.append(len(weights))
    values = torch.stack(stats).cpu().numpy() if stats else np.zeros((0, 4))
    rows = pd.DataFrame(
        {
            "index": np.asarray(index, dtype=np.int64),  # int even when this rank scored no bag
            "logit": values[:, 0].astype(np.float64),
            "attention_max": values[:, 1],
            "attention_entropy": values[:, 2],
            "top_tile": values[:, 3].astype(np.int64),
            "tiles": np.asarray(tiles, dtype=np.int64),
        }
    )
    frame = pd.concat(gather_objects(rows, dist)).sort_values("index")
    frame["id"] = [bags.ids[i] for i in frame["index"]]
    frame["label"] = bags.labels.numpy()[frame["index"].to_numpy()]
    logit = frame["logit"].to_numpy()
    # binary cross-entropy with logits, stably: max(x, 0) - x y + log(1 + exp(-|x|))
    frame["loss"] = np.maximum(logit, 0) - logit * frame["label"] + np.log1p(np.exp(-np.abs(logit)))
    frame["prob"] = 1 / (1 + np.exp(-logit))
    return frame.reset_index(drop=True)


def test_report(
    cfg: Config,
    dist: DistInfo,
    run_dir: RunDir,
    scoring: dict,
    model,
    table: pd.DataFrame,
    tracker,
    extra_facts: dict | None = None,
) -> dict | None:
    """best.pt on validation (temperature and threshold) and test: per-slide predictions,
    metrics.json with the baselines beside, the figures and index.html (rank 0)."""
    best = checkpoint.load_on_main(run_dir.best, model, dist)
    val_raw = score_bags(model, scoring["val"], dist, cfg.train.amp)
    test_raw = score_bags(model, scoring["test"], dist, cfg.train.amp)
    if not dist.is_main:
        return None
    temperature, point = choose_on_validation(cfg, val_raw)
    checkpoint.store_evaluation(run_dir.best, temperature, point)  # predict-slide labels new slides with them
    val, test = tempered(val_raw, temperature), tempered(test_raw, temperature)
    keep = ["id", "label", "prob", "logit", "attention_max", "attention_entropy", "top_tile", "tiles"]
    for split, frame in (("val", val), ("test", test)):
        path = run_dir.predictions(split)
        path.parent.mkdir(parents=True, exist_ok=True)
        pred = (frame["prob"] >= point["threshold"]).astype(int)
        write_text(path, frame[keep].assign(pred=pred).to_csv(index=False))
    metrics = slide_metrics(cfg, test, test_raw, point, temperature)
    facts = {"task": SLIDE, "mil": cfg.model.mil, "best_epoch": best.epoch, "slides": len(test), **(extra_facts or {})}
    metrics.update(split="test", checkpoint=str(run_dir.best), level="slide", run=facts)
    metrics["baselines"] = baselines(cfg.data.features, table, test, cfg.report.bootstrap, cfg.train.seed)
    run_dir.report.mkdir(parents=True, exist_ok=True)
    write_text(run_dir.metrics, json.dumps(metrics, indent=1, default=float))
    images = []
    if cfg.report.figures:
        for name, figure in (
            ("roc", plots.roc(test["label"], test["prob"], point["threshold"])),
            ("confusion_matrix", plots.confusion_matrix(test["label"], test["prob"], point["threshold"])),
        ):
            with atomic_path(run_dir.figure(name)) as tmp:
                figure.savefig(tmp, dpi=100, format="png")
            images.append(run_dir.figure(name).name)
    write_text(run_dir.index_html, slide_page(metrics, images))
    log.info("test (slides, n=%d): %s", len(test), report.headline(metrics))
    for line in describe(metrics["baselines"], f"model.mil={cfg.model.mil}"):
        log.info("%s", line)
    log.info("report: open %s", run_dir.index_html)
    tracker.log_summary({f"test/{k}": metrics[k] for k in ("roc_auc", "balanced_accuracy")})
    return metrics


def choose_on_validation(cfg: Config, val: pd.DataFrame) -> tuple[float, dict]:
    """The temperature (report.calibrate) and the operating point, both from the validation slides."""
    if val["label"].nunique() < 2:
        return 1.0, {"threshold": 0.5, "method": "fixed: one class in validation", "chosen_on": "val"}
    labels, logits = val["label"].to_numpy(), val["logit"].to_numpy()
    temperature = fit_temperature(labels, logits) if cfg.report.calibrate else 1.0
    return temperature, operating_point(tempered(val, temperature), None, tta=False, temperature=temperature)


def slide_metrics(cfg: Config, test: pd.DataFrame, test_raw: pd.DataFrame, point: dict, temperature: float) -> dict:
    """The patch report's metrics over slides, at the validation-chosen threshold, with calibration."""
    metrics = report.compute_metrics(
        test,
        {"threshold": point["threshold"], "rule": point["method"], "chosen_on": "val"},
        cfg.report.bootstrap,
        cfg.train.seed,
    )
    del metrics["classification_report"]
    metrics.update({k: METRICS[k](test["label"], test["prob"]) for k in CALIBRATION}, temperature=temperature)
    if cfg.report.calibrate:
        metrics["calibration"] = {
            "temperature": temperature,
            "fitted_on": "val",
            "before": {k: METRICS[k](test_raw["label"], test_raw["prob"]) for k in CALIBRATION},
            "after": {k: METRICS[k](test["label"], test["prob"]) for k in CALIBRATION},
        }
    return metrics


def slide_page(metrics: dict, images: list[str]) -> str:
    """report/index.html of a slide-level run: the headline, the baselines and whether the model
    beats each, the figures."""
    facts = metrics["run"]
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{b['roc_auc']:.3f}{_interval(b['roc_auc_ci'], '')}</td>"
        f"<td>{b['difference']:+.3f}{_interval(b['difference_ci'])}</td><td>{b['verdict']}</td></tr>"
        for name, b in metrics["baselines"].items()
    )
    verdicts = "".join(f"<li>{html.escape(line)}</li>" for line in describe(metrics["baselines"], "The model"))
    figures = "".join(
        f'<figure><img src="{name}" alt="{name}"><figcaption>{name}</figcaption></figure>' for name in images
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>cancernet slide-level report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;margin-bottom:1em}}
th,td{{border:1px solid #ccc;padding:4px 10px;text-align:left}}figure{{display:inline-block;margin:8px}}
img{{max-width:640px}}</style></head><body>
<h1>Slide-level report: model.mil={html.escape(str(facts.get("mil")))}, {metrics["n"]} test slides</h1>
<p><b>{html.escape(report.headline(metrics))}</b></p>
<p>Best epoch {facts.get("best_epoch")}; checkpoint {html.escape(str(metrics.get("checkpoint")))}.</p>
<h2>Against the baselines (same test slides, same features)</h2>
<table><tr><th>baseline</th><th>its ROC AUC [95% CI]</th><th>the model's AUC minus it [paired 95% CI]</th>
<th>verdict</th></tr>{rows or '<tr><td colspan="4">none: the test slides hold one class</td></tr>'}</table>
<ul>{verdicts}</ul>
<h2>Figures</h2>{figures}</body></html>
"""


def _interval(ci, sign: str = "+") -> str:
    return f" [{ci[0]:{sign}.3f}, {ci[1]:{sign}.3f}]" if ci else ""


def tempered(frame: pd.DataFrame, temperature: float) -> pd.DataFrame:
    """The slides' probabilities at this temperature (their logits divided by it)."""
    return frame.assign(prob=apply_temperature(frame["logit"], temperature))
