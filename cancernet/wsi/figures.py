"""Slide figures: the heatmap (or a MIL model's attention) over the thumbnail, and evaluate-slides'
page of heatmaps and masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

CMAP = "inferno"


def _extents(summary: dict) -> tuple[tuple, tuple]:
    """Thumbnail and heatmap extents in mm (left, right, bottom, top): the map covers whole cells."""
    width, height = summary["dimensions"]
    mm = summary["mpp"] / 1000
    rows, cols = summary["grid"]
    cell = summary["cell_um"] / 1000
    return (0, width * mm, height * mm, 0), (0, cols * cell, rows * cell, 0)


CLEAR_BELOW, OPAQUE_FROM = 0.1, 0.5  # a cell's value -> its overlay's opacity ramps from 0 to `alpha`


def opacity(values: np.ndarray, alpha: float) -> np.ndarray:
    """Per-cell opacity: clear below CLEAR_BELOW (the tissue's morphology shows through where the
    model sees nothing), full `alpha` from OPAQUE_FROM, linear between."""
    ramp = np.clip((np.nan_to_num(values, nan=0.0) - CLEAR_BELOW) / (OPAQUE_FROM - CLEAR_BELOW), 0, 1)
    return ramp * alpha


def attention_percentiles(attention: np.ndarray) -> np.ndarray:
    """Each tile's attention as its percentile within the slide (as CLAM draws it; NaN stays NaN):
    the weights of a slide of thousands of tiles are all tiny, and a near-uniform map would show one
    colour. Every attention picture uses this one scale."""
    scored = np.isfinite(attention)
    ranks = np.full(attention.shape, np.nan)
    ranks[scored] = (np.argsort(np.argsort(attention[scored])) + 1) / max(scored.sum(), 1)
    return ranks


def draw_overlay(ax, thumb, heatmap: np.ndarray, summary: dict, alpha: float = 0.7, cmap: str = CMAP):
    slide_extent, map_extent = _extents(summary)
    ax.imshow(np.asarray(thumb), extent=slide_extent)
    image = ax.imshow(
        np.ma.masked_invalid(heatmap),
        cmap=cmap,
        vmin=0,
        vmax=1,
        alpha=opacity(heatmap, alpha),
        extent=map_extent,
        interpolation="nearest",
    )
    ax.set(xlim=slide_extent[:2], ylim=slide_extent[2:], xlabel="mm", ylabel="mm")
    return image


def heatmap_figure(path: Path, thumb, heatmap: np.ndarray, summary: dict) -> None:
    width, height = summary["dimensions"]
    aspect = height / width
    fig = Figure(figsize=(7.5, max(3.0, 6.2 * aspect + 1.2)), layout="constrained")
    ax = fig.subplots()
    image = draw_overlay(ax, thumb, heatmap, summary)
    fig.colorbar(image, ax=ax, label="P(tumour)", shrink=0.8)
    area = summary["tumour_area_mm2"]
    ax.set_title(
        f"{Path(summary['slide']).name}: score {summary['score']:.3f} ({summary['score_kind']}); "
        + (f"tumour {area:.3f} mm² at t={summary['threshold']:.3f}" if area is not None else "no operating point"),
        fontsize=10,
    )
    fig.savefig(path, dpi=110)


def attention_figure(path: Path, thumb, attention: np.ndarray, heatmap: np.ndarray | None, summary: dict) -> None:
    """A MIL model's attention over the thumbnail, beside the patch
    model's heatmap of the same tiles when the features came from a trained patch model."""
    width, height = summary["dimensions"]
    panels = 1 if heatmap is None else 2
    fig = Figure(figsize=(6.2 * panels + 0.6, max(3.0, 5.0 * height / width + 1.4)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, panels))
    image = draw_overlay(axes[0], thumb, attention_percentiles(attention), summary, alpha=0.75, cmap="viridis")
    fig.colorbar(image, ax=axes[0], label="attention percentile within the slide", shrink=0.8)
    axes[0].set_title(f"attention ({summary['score_kind']}; highest {summary['attention_max']:.3g})", fontsize=9)
    if heatmap is not None:
        image = draw_overlay(axes[1], thumb, heatmap, summary)
        fig.colorbar(image, ax=axes[1], label="P(tumour), patch model", shrink=0.8)
        axes[1].set_title("patch heatmap (the features' backbone)", fontsize=9)
    label = summary["slide_label"]
    verdict = "" if label is None else f" -> {'tumour' if label else 'no tumour'} at t={summary['threshold']:.3f}"
    fig.suptitle(f"{Path(summary['slide']).name}: P(tumour) {summary['slide_prob']:.3f}{verdict}", fontsize=10)
    fig.savefig(path, dpi=110)


def slides_page(path: Path, entries: list[dict], title: str, label: str = "P(tumour)") -> None:
    """One row per slide: the heatmap over the thumbnail, and the given tumour mask beside it."""
    masks = any(e.get("mask") is not None for e in entries)
    ncols = 2 if masks else 1
    fig = Figure(figsize=(5.2 * ncols + 0.8, 3.4 * len(entries) + 0.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(entries), ncols, squeeze=False))
    image = None
    for row, e in zip(axes, entries):
        attention = label == "attention"
        shown = attention_percentiles(e["heatmap"]) if attention else e["heatmap"]
        image = draw_overlay(row[0], e["thumb"], shown, e["summary"], cmap="viridis" if attention else CMAP)
        row[0].set_title(f"{e['name']} (label {e['label']}): score {e['summary']['score']:.3f}", fontsize=9)
        if masks:
            ax = row[1]
            slide_extent, _ = _extents(e["summary"])
            ax.imshow(np.asarray(e["thumb"]), extent=slide_extent)
            if e.get("mask") is not None:
                ax.imshow(
                    np.ma.masked_equal(e["mask"], 0), cmap="cool", alpha=0.55, extent=slide_extent, vmin=0, vmax=1
                )
                extra = f"cell AUC {e['cell_auc']:.3f}" if e.get("cell_auc") is not None else "mask"
            else:
                extra = "no mask"
            ax.set(xlim=slide_extent[:2], ylim=slide_extent[2:], xlabel="mm", title=f"tumour mask ({extra})")
            ax.title.set_fontsize(9)
    if image is not None:
        shown = "attention percentile within the slide" if label == "attention" else label
        fig.colorbar(image, ax=axes[:, 0].tolist(), label=shown, shrink=0.6)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=90)
