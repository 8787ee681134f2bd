"""Figures of patches: the sample grid, the augmentation grid and Grad-CAM maps (matplotlib Figures)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cancernet.data.patch import LABEL_SIDE, LABEL_START


def augmentation_grid(
    originals: np.ndarray,
    views: list[np.ndarray],
    description: str,
    view_box: tuple[float, float] = (LABEL_START, LABEL_SIDE),
) -> Figure:
    """Each row: a training patch, then what the augmentation makes of it in successive epochs.

    view_box: (start, side) of the labelled centre in the views' pixels (they may be resized or cropped).
    """
    rows, cols = len(originals), 1 + len(views)
    fig = Figure(figsize=(cols * 1.5, rows * 1.55), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, cols))
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(originals[r] if c == 0 else views[c - 1][r])
            ax.add_patch(_centre_box() if c == 0 else _centre_box(*view_box))
            ax.set(xticks=[], yticks=[])
            if r == 0:
                ax.set_title("original" if c == 0 else f"epoch {c}", fontsize=8)
    fig.suptitle(f"Training augmentation: {description}", fontsize=9)
    return fig


def sample_grid(
    predictions: pd.DataFrame,
    load_image: Callable[[str], np.ndarray],
    threshold: float,
    split: str = "test",
    n: int = 24,
    seed: int = 0,
) -> Figure:
    """Patches with true label and P(tumour); misclassified ones framed in red with a cross.

    Half the panels show misclassified patches when there are that many.
    """
    wrong = predictions[(predictions["prob"] >= threshold) != (predictions["label"] == 1)]
    right = predictions.drop(wrong.index)
    n_wrong = min(len(wrong), n // 2)
    pick = pd.concat(
        [wrong.sample(n_wrong, random_state=seed), right.sample(min(len(right), n - n_wrong), random_state=seed)]
    )
    cols = 8
    rows = max(1, int(np.ceil(len(pick) / cols)))
    fig = Figure(figsize=(cols * 1.6, rows * 1.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, row in zip(axes, pick.itertuples()):
        ax.imshow(load_image(row.id))
        ax.add_patch(_centre_box())
        mistake = (row.prob >= threshold) != (row.label == 1)
        ax.set_title(
            f"true {row.label} · p={row.prob:.2f}{' ✗' if mistake else ''}",
            fontsize=8,
            color="red" if mistake else "black",
        )
        if mistake:
            ax.axis("on")
            ax.set(xticks=[], yticks=[])
            for spine in ax.spines.values():
                spine.set(color="red", linewidth=3)
    fig.suptitle(
        f"{split.capitalize()} patches: true label, predicted P(tumour); dashed box = the labelled centre "
        f"32x32; red = misclassified at threshold {threshold:.3f}",
        fontsize=10,
    )
    return fig


def _centre_box(start: float = LABEL_START, side: float = LABEL_SIDE):
    """The labelled centre 32x32 (in a 96 px patch; other values for resized or cropped views)."""
    from matplotlib.patches import Rectangle

    return Rectangle((start - 0.5, start - 0.5), side, side, fill=False, ls="--", lw=0.8, ec="white")


def gradcam_grid(picked: pd.DataFrame, images: np.ndarray, cams: np.ndarray, threshold: float) -> Figure:
    """Patches beside their Grad-CAM maps for P(tumour): does the model look at the centre?"""
    from matplotlib import colormaps

    cols = 4
    rows = int(np.ceil(len(picked) / cols))
    scale = max(float(np.percentile(cams, 99.5)), 1e-12)  # one scale for all: weak evidence stays faint
    fig = Figure(figsize=(cols * 2 * 1.5, rows * 1.75), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, cols * 2))
    for ax in axes.ravel():
        ax.axis("off")
    for k, row in enumerate(picked.itertuples()):
        image_ax, cam_ax = axes[k // cols, 2 * (k % cols)], axes[k // cols, 2 * (k % cols) + 1]
        image_ax.imshow(images[k])
        image_ax.add_patch(_centre_box())
        cam_ax.imshow(images[k])
        heat = np.clip(cams[k] / scale, 0, 1)
        overlay = colormaps["inferno"](heat)
        overlay[..., 3] = 0.75 * heat  # no evidence = transparent
        cam_ax.imshow(overlay)
        cam_ax.add_patch(_centre_box())
        wrong = (row.prob >= threshold) != (row.label == 1)
        image_ax.set_title(f"{row.kind}: true {row.label}", fontsize=8, color="red" if wrong else "black")
        cam_ax.set_title(f"Grad-CAM, p={row.prob:.2f}", fontsize=8)
    fig.suptitle(
        "Where the model sees tumour: Grad-CAM of the class-1 logit (one colour scale for all\n"
        "patches; bright = strong evidence); dashed box = the labelled centre 32x32",
        fontsize=9,
    )
    return fig
