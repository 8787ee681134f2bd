"""evaluate-slides: slide-level ROC AUC (bootstrap CI over slides) and, against tumour masks,
cell-level AUC, with a page of heatmaps beside the masks. A patch checkpoint's slides are scored by
their heatmap (slide.score) and its cells by P(tumour); a MIL checkpoint's slides by its slide
probability and its cells by the attention (how well it points at the tumour)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cancernet.evaluate.metrics import METRICS, bootstrap_cis
from cancernet.runtime.atomic import atomic_path, write_text
from cancernet.runtime.errors import DataError
from cancernet.wsi.diagnose import SlideModel
from cancernet.wsi.driver import RESULT, drive, list_slides
from cancernet.wsi.heatmap import Scorer
from cancernet.wsi.slide import cell_share

TRUTH = "mask_cells.npy"  # evaluate-slides: a slide's tumour mask as cells (bool, the map's grid)

log = logging.getLogger(__name__)
PAGE_SLIDES = 12  # slides on the report page: the highest and lowest scored of each class


def read_labels(path: Path, slides: list[Path]) -> pd.DataFrame:
    """slide,label rows (slide: a file name or its stem), each matched to a file of the folder."""
    try:
        frame = pd.read_csv(path, dtype={"slide": str}, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"--labels {path} cannot be read as CSV: {e}") from None
    if not {"slide", "label"} <= set(frame.columns):
        raise DataError(f"--labels {path} needs the columns slide,label (has {', '.join(frame.columns)})")
    by_name = {p.name: p for p in slides} | {p.stem: p for p in slides}
    missing = [s for s in frame["slide"] if s not in by_name]
    if missing:
        raise DataError(f"--labels {path}: slide {missing[0]!r} is not in the slides folder ({len(missing)} missing)")
    labels = pd.to_numeric(frame["label"], errors="coerce")
    if not labels.isin([0, 1]).all():
        raise DataError(
            f"--labels {path}: labels must be 0 or 1 (row {int(np.flatnonzero(~labels.isin([0, 1]))[0]) + 2})"
        )
    frame = pd.DataFrame({"slide": [by_name[s] for s in frame["slide"]], "label": labels.astype(int)})
    twice = frame["slide"][frame["slide"].duplicated()]
    if len(twice):
        raise DataError(f"--labels {path} lists slide {twice.iloc[0].name} twice")
    return frame


def mask_path(masks: Path, stem: str) -> Path | None:
    for name in (f"{stem}.png", f"{stem}_mask.png"):
        if (masks / name).is_file():
            return masks / name
    return None


def cell_labels(path: Path, downsample: float, summary: dict) -> np.ndarray:
    """A tumour mask PNG (nonzero = tumour; one pixel = downsample level-0 pixels) on the slide's
    cells: a cell is tumour when at least half of it is."""
    mask = Image.open(path).convert("L")
    width, height = summary["dimensions"]
    expected = (width / downsample, height / downsample)
    if (
        abs(mask.width - expected[0]) > 2 + 0.01 * expected[0]
        or abs(mask.height - expected[1]) > 2 + 0.01 * expected[1]
    ):
        raise DataError(
            f"mask {path} is {mask.width}x{mask.height} px; the slide at downsample {downsample:g} is "
            f"{expected[0]:.0f}x{expected[1]:.0f}: wrong --mask-downsample?"
        )
    per_cell = summary["cell_um"] / summary["mpp"] / downsample  # mask pixels per cell
    return cell_share(np.asarray(mask) > 0, per_cell, tuple(summary["grid"])) >= 0.5


def evaluate_slides(
    scorer: Scorer | SlideModel,  # either kind of checkpoint, as a slide scorer
    slides: list[str],  # slide files or folders of slides
    labels_csv: Path,
    out: Path,
    masks: Path | None = None,
    mask_downsample: float | None = None,
    mpp: float | None = None,
) -> dict | None:
    """Predict the labelled slides (those done before are reused), then rank 0 scores them."""
    if masks is not None and mask_downsample is None:
        raise DataError("--masks needs --mask-downsample (level-0 pixels per mask pixel)")
    table = read_labels(Path(labels_csv), list_slides([str(s) for s in slides]))
    out = Path(out)
    outcome = drive(scorer.job(out, mpp), list(table["slide"]), out, scorer.dist)
    if not scorer.dist.is_main:
        return None
    cell_map = scorer.cell_map  # what is compared with the masks
    rows, entries, cell_y, cell_p = [], [], [], []
    for path, label in zip(table["slide"], table["label"]):
        result = out / path.stem / RESULT
        if not result.is_file():
            continue  # failed: its line was logged
        summary = json.loads(result.read_text())
        row = {
            "slide": path.stem,
            "label": int(label),
            "score": summary["score"],
            **{k: summary.get(k) for k in ("max", "top_k_mean", "tumour_area_mm2", "slide_label", "attention_max")},
            "tiles": summary["tiles"],
            "cell_auc": None,
        }
        entry = {"name": path.stem, "label": int(label), "summary": summary}
        heatmap = np.load(out / path.stem / cell_map)
        found = mask_path(masks, path.stem) if masks is not None else None
        if masks is not None and (found is not None or label == 0):
            truth = cell_labels(found, mask_downsample, summary) if found else np.zeros(heatmap.shape, bool)
            scored = np.isfinite(heatmap)
            cell_y.append(truth[scored])
            cell_p.append(heatmap[scored])
            if truth[scored].any() and not truth[scored].all():
                row["cell_auc"] = METRICS["roc_auc"](truth[scored], heatmap[scored])
            if found is not None:
                entry["mask"] = np.asarray(Image.open(found).convert("L")) > 0
                with atomic_path(out / path.stem / TRUTH) as tmp, open(tmp, "wb") as f:
                    np.save(f, truth)  # the mask on the cell grid: `cancernet view` outlines it
        elif masks is not None:
            log.warning("slide %s: label 1 but no mask in %s; left out of the cell-level AUC", path.name, masks)
        entry["cell_auc"] = row["cell_auc"]
        rows.append(row)
        entries.append(entry)
    frame = pd.DataFrame(rows)
    metrics = {
        "slides": len(frame),
        "positives": int(frame["label"].sum()) if len(frame) else 0,
        "failed": [row["path"] for row in outcome if row["status"] == "failed"],
        "score": scorer.score_kind,
        "cells_scored_by": scorer.cells_scored_by,
        "tta": scorer.tta,
        "checkpoint": scorer.checkpoint,
    }
    if len(frame) and 0 < metrics["positives"] < len(frame):
        metrics["slide_auc"] = METRICS["roc_auc"](frame["label"], frame["score"])
        resamples = scorer.cfg.report.bootstrap
        if resamples:
            ci = bootstrap_cis(frame["label"].to_numpy(), frame["score"].to_numpy(), {}, resamples)
            metrics["slide_auc_ci"] = ci["roc_auc"]
            metrics["bootstrap"] = resamples
    else:
        log.warning("slide-level AUC needs slides of both labels among those done (%d slides)", len(frame))
    if cell_y:
        y, p = np.concatenate(cell_y), np.concatenate(cell_p)
        metrics.update(cells=int(len(y)), cells_tumour=int(y.sum()))
        if 0 < y.sum() < len(y):
            metrics["cell_auc"] = METRICS["roc_auc"](y, p)
    write_text(out / "slides.csv", frame.to_csv(index=False, float_format="%.6g"))
    write_text(out / "slides.json", json.dumps(metrics, indent=2))
    if entries:
        from cancernet.wsi.figures import slides_page

        shown = sorted(entries, key=lambda e: (-e["label"], -e["summary"]["score"]))
        if len(shown) > PAGE_SLIDES:  # the best and worst of each class
            pos, neg = [e for e in shown if e["label"]], [e for e in shown if not e["label"]]
            half = PAGE_SLIDES // 4
            picked = pos[:half] + pos[-half:] + neg[:half] + neg[-half:]
            shown = list({e["name"]: e for e in picked}.values())
        for e in shown:
            e["thumb"] = Image.open(out / e["name"] / "thumbnail.jpg")
            e["heatmap"] = np.load(out / e["name"] / cell_map)
        auc = metrics.get("slide_auc")
        title = f"{len(frame)} slides" + (f", slide AUC {auc:.3f}" if auc is not None else "")
        if "cell_auc" in metrics:
            title += f", cell AUC {metrics['cell_auc']:.3f}"
        slides_page(out / "slides_report.png", shown, title, scorer.cells_scored_by)
    if "slide_auc" in metrics:
        from cancernet.evaluate.plots import roc

        roc(frame["label"], frame["score"]).savefig(out / "slides_roc.png", dpi=100)
    log.info("evaluate-slides: %s", json.dumps({k: v for k, v in metrics.items() if k != "checkpoint"}))
    shown = out / "slides_report.png"
    log.info("report: open %s (each slide: %s)", shown if shown.is_file() else out / "slides.csv", out / "<slide>")
    log.info("in the browser: python -m cancernet view %s", out)
    return metrics
