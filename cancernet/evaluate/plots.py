"""Figures from saved predictions and summary.csv; each function returns a matplotlib Figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn import metrics as skm

CLASS_NAMES = ("normal (0)", "tumour (1)")
COLOURS = ("#1f77b4", "#d62728")  # blue = normal, red = tumour, everywhere
SPLIT_ORDER = ("train", "val", "test")


def _axes(ncols: int = 1, width: float = 5.5, height: float = 4.2):
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, np.atleast_1d(axes)


def _epoch_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _train_val(summary: pd.DataFrame, metric: str, title: str, ylabel: str) -> Figure:
    fig, (ax,) = _axes()
    _epoch_axis(ax)
    ax.plot(summary["epoch"], summary[f"train_{metric}"], "o-", label="train")
    ax.plot(summary["epoch"], summary[f"val_{metric}"], "s-", label="validation")
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def history_loss(summary: pd.DataFrame) -> Figure:
    return _train_val(summary, "loss", "Loss per epoch", "cross-entropy loss")


def history_accuracy(summary: pd.DataFrame) -> Figure:
    return _train_val(summary, "acc", "Accuracy per epoch", "accuracy")


def history_auc_lr(summary: pd.DataFrame) -> Figure:
    fig, (ax,) = _axes()
    _epoch_axis(ax)
    ax.plot(summary["epoch"], summary["val_auc"], "s-", color="C2", label="validation ROC AUC")
    ax.set(title="Validation AUC and learning rate", xlabel="epoch", ylabel="validation ROC AUC")
    lr_ax = ax.twinx()
    lr_ax.plot(summary["epoch"], summary["lr"], "--", color="C7", label="learning rate (epoch end)")
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    lines = ax.get_lines() + lr_ax.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def confusion_matrix(labels, probs, threshold: float) -> Figure:
    cm = skm.confusion_matrix(labels, np.asarray(probs) >= threshold, labels=[0, 1])
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, (ax,) = _axes(width=5.2, height=4.4)
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                f"{cm[i, j]:,}\n{100 * rows[i, j]:.1f}%",
                ha="center",
                va="center",
                fontsize=13,
                color="white" if rows[i, j] > 0.5 else "black",
            )
    ax.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=CLASS_NAMES,
        yticklabels=CLASS_NAMES,
        xlabel="predicted",
        ylabel="true",
        title=f"Confusion matrix\nthreshold {threshold:.3f}; row %",
    )
    fig.colorbar(image, ax=ax, label="fraction of true class")
    return fig


def roc(labels, probs, threshold: float | None = None) -> Figure:
    labels = np.asarray(labels)
    fpr, tpr, thresholds = skm.roc_curve(labels, probs)
    fig, (ax,) = _axes(width=5, height=4.6)
    ax.plot(fpr, tpr, color="C3", label=f"ROC (AUC = {skm.auc(fpr, tpr):.4f})")
    ax.plot([0, 1], [0, 1], ":", color="gray", label="chance")
    if threshold is not None:
        pred = np.asarray(probs) >= threshold
        ax.plot(
            pred[labels == 0].mean(), pred[labels == 1].mean(), "ko", label=f"operating point (t = {threshold:.3f})"
        )
    ax.set(
        title=f"ROC curve (n = {len(labels):,}, {int(labels.sum()):,} positive)",
        xlabel="false positive rate (1 - specificity)",
        ylabel="true positive rate (sensitivity)",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
    )
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def precision_recall(labels, probs) -> Figure:
    precision, recall, _ = skm.precision_recall_curve(labels, probs)
    ap = skm.average_precision_score(labels, probs)
    fig, (ax,) = _axes(width=5, height=4.6)
    ax.step(recall, precision, where="post", color="C3", label=f"PR (AP = {ap:.4f})")
    ax.axhline(np.mean(labels), ls=":", color="gray", label=f"prevalence ({np.mean(labels):.3f})")
    ax.set(
        title="Precision-recall curve",
        xlabel="recall (sensitivity)",
        ylabel="precision",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
    )
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    return fig


def prediction_distribution(labels, probs, threshold: float) -> Figure:
    labels, probs = np.asarray(labels), np.asarray(probs)
    fig, (ax,) = _axes(width=6)
    bins = np.linspace(0, 1, 41)
    for cls in (0, 1):
        ax.hist(
            probs[labels == cls],
            bins=bins,
            alpha=0.6,
            color=COLOURS[cls],
            label=f"true {CLASS_NAMES[cls]} (n={int((labels == cls).sum()):,})",
        )
    ax.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:.3f}")
    ax.set(
        title="Predicted tumour probability by true class",
        xlabel="P(tumour)",
        ylabel="patches (log scale)",
        yscale="log",
    )
    ax.legend(loc="upper center", framealpha=0.9)
    return fig


def reliability(labels, probs, raw_probs=None, bins: int = 15, few: int = 10) -> Figure:
    """Reliability diagram: fraction of tumours per bin of P(tumour), after (and before) the temperature.

    A marker's area grows with its bin's count, and a bin of fewer than `few` patches is drawn
    hollow and left out of the line: one or two patches make a point at 0 or 1 that says little.
    """
    from cancernet.evaluate.metrics import expected_calibration_error
    from cancernet.evaluate.metrics import reliability as reliability_table

    fig, (ax, count_ax) = _axes(2, width=5.2)
    ax.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
    curves = [("after temperature" if raw_probs is not None else "model", probs, "C3")]
    if raw_probs is not None:
        curves.insert(0, ("before temperature", raw_probs, "C7"))
    for name, p, colour in curves:
        table = reliability_table(labels, p, bins)
        solid, sparse = table[table["count"] >= few], table[(table["count"] > 0) & (table["count"] < few)]
        ece = expected_calibration_error(labels, p, bins)
        size = 12 + 200 * table["count"] / max(table["count"].max(), 1)
        ax.plot(
            solid["mean_prob"],
            solid["fraction_positive"],
            "-",
            color=colour,
            alpha=0.7,
            label=f"{name} (ECE {ece:.3f})",
        )
        ax.scatter(solid["mean_prob"], solid["fraction_positive"], s=size[solid.index], color=colour, zorder=3)
        ax.scatter(
            sparse["mean_prob"],
            sparse["fraction_positive"],
            s=size[sparse.index],
            facecolors="none",
            edgecolors=colour,
            zorder=3,
        )
    ax.scatter([], [], s=20, facecolors="none", edgecolors="gray", label=f"bin of < {few} patches")
    ax.set(
        title=f"Reliability ({bins} equal-width bins; area ~ patches)",
        xlabel="mean predicted P(tumour) in bin",
        ylabel="fraction of tumour patches in bin",
        xlim=(0, 1),
        ylim=(-0.02, 1.02),
    )
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    table = reliability_table(labels, probs, bins)
    count_ax.bar(table["lo"] + 0.5 / bins, table["count"], width=0.9 / bins, color="C3")
    count_ax.set(title="Patches per bin", xlabel="predicted P(tumour)", ylabel="patches")
    return fig


def label_distribution(table: pd.DataFrame) -> Figure:
    """table: one row per image with label and split columns."""
    fig, (bar_ax, pie_ax) = _axes(2, width=5.5)
    splits = [s for s in SPLIT_ORDER if s in set(table["split"])]
    counts = table.groupby(["split", "label"]).size().unstack(fill_value=0).reindex(splits)
    counts = counts.reindex(columns=[0, 1], fill_value=0)
    x = np.arange(len(splits) + 1)
    totals = table["label"].value_counts().reindex([0, 1], fill_value=0)
    for cls in (0, 1):
        values = [totals[cls], *counts[cls]]
        bars = bar_ax.bar(x + (cls - 0.5) * 0.38, values, 0.38, color=COLOURS[cls], label=CLASS_NAMES[cls])
        bar_ax.bar_label(bars, labels=[f"{v:,}" for v in values], fontsize=8)
    bar_ax.set(
        xticks=x, xticklabels=["all", *splits], ylabel="patches", title="Labels per split (share of tumour below)"
    )
    rates = [table["label"].mean(), *(table[table["split"] == s]["label"].mean() for s in splits)]
    for xi, rate in zip(x, rates):
        bar_ax.annotate(
            f"{100 * rate:.1f}%",
            (xi, 0),
            xytext=(0, -28),
            textcoords="offset points",
            ha="center",
            fontsize=8,
            color=COLOURS[1],
        )
    bar_ax.legend()
    pie_ax.pie(
        totals,
        labels=[f"{n}\n{c:,}" for n, c in zip(CLASS_NAMES, totals)],
        colors=COLOURS,
        autopct="%1.1f%%",
        startangle=90,
        textprops={"fontsize": 9},
        wedgeprops={"edgecolor": "white"},
    )
    pie_ax.set_title(f"All labelled patches (n={len(table):,})")
    return fig
