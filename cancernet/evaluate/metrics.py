"""Pure metric functions on arrays of labels and class-1 probabilities (no torch, no files)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from sklearn import metrics as skm


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC, or NaN when only one class is present."""
    return float(skm.roc_auc_score(labels, probs)) if len(np.unique(labels)) == 2 else float("nan")


def _between(thresholds: np.ndarray, index: int) -> float:
    """Midway between the ROC cut at index and the next lower score: the same cut on these
    data, but not sitting exactly on one patch's score (rounding could flip that patch)."""
    upper = min(thresholds[index], 1.0)
    lower = thresholds[index + 1] if index + 1 < len(thresholds) else 0.0
    return float((upper + lower) / 2)


def youden_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (Youden's J) on these data."""
    fpr, tpr, thresholds = skm.roc_curve(labels, probs)
    return _between(thresholds, int(np.argmax(tpr - fpr)))


def threshold_for_sensitivity(labels: np.ndarray, probs: np.ndarray, target: float) -> float:
    """The highest cut whose sensitivity on these data is at least target (most specific one)."""
    fpr, tpr, thresholds = skm.roc_curve(labels, probs, drop_intermediate=False)
    return _between(thresholds, int(np.flatnonzero(tpr >= target)[0]))


THRESHOLD_METRICS = ("accuracy", "sensitivity", "specificity", "balanced_accuracy")


def at_threshold(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    pred = (probs >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(labels, pred, labels=[0, 1]).ravel()
    sensitivity = float(tp / (tp + fn)) if tp + fn else float("nan")
    specificity = float(tn / (tn + fp)) if tn + fp else float("nan")
    return {
        "threshold": float(threshold),
        "accuracy": float((tp + tn) / max(len(labels), 1)),
        "sensitivity": sensitivity,
        "specificity": specificity,
        # the mean recall of the two classes: what the linear-probing literature (eva) reports
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],
    }


@dataclass(frozen=True)
class Metric:
    """One metric as every report shows it: its key in metrics.json (and in aggregate.json and the
    W&B summary), its name on a page, its value from labels and P(tumour) at a threshold, whether
    it carries a 95% bootstrap interval (`<key>_ci`), and how it is printed."""

    key: str
    name: str
    short: str  # the headline's word
    compute: Callable[[np.ndarray, np.ndarray, float], float]
    interval: bool = True
    fmt: str = ".3f"
    thresholded: bool = False  # depends on the threshold (else on the ranking or the probabilities)

    def __call__(self, labels, probs, threshold: float = 0.5) -> float:
        return self.compute(np.asarray(labels).astype(int), np.asarray(probs, dtype=float), threshold)

    def show(self, value: float) -> str:
        return format(value, self.fmt)


def _at(name: str) -> Callable[[np.ndarray, np.ndarray, float], float]:
    """A metric read from at_threshold()'s confusion matrix."""
    return lambda labels, probs, t: at_threshold(labels, probs, t)[name]


# The table report, evaluation, aggregate and the slide report read: a new metric is one line here
# (bootstrap_cis computes the intervals of the ranking metrics and of THRESHOLD_METRICS).
METRICS: dict[str, Metric] = {
    m.key: m
    for m in (
        Metric("roc_auc", "ROC AUC", "AUC", lambda y, p, t: roc_auc(y, p)),
        Metric("average_precision", "average precision", "AP", lambda y, p, t: average_precision(y, p)),
        *(Metric(k, k.replace("_", " "), k.replace("_", " "), _at(k), thresholded=True) for k in THRESHOLD_METRICS),
        Metric("brier", "Brier score", "Brier", lambda y, p, t: brier(y, p), interval=False, fmt=".4f"),
        Metric("ece", "ECE (15 bins)", "ECE", lambda y, p, t: expected_calibration_error(y, p), False, ".4f"),
    )
}
HEADLINE = ("roc_auc", "average_precision", "accuracy", "balanced_accuracy")  # at 0.5, with intervals
OPERATING = ("sensitivity", "specificity")  # at each operating point
CALIBRATION = ("brier", "ece")  # after the temperature


def average_precision(labels: np.ndarray, probs: np.ndarray) -> float:
    """Average precision, or NaN when only one class is present."""
    return float(skm.average_precision_score(labels, probs)) if len(np.unique(labels)) == 2 else float("nan")


def binary_report(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, ROC AUC, AP, per-class precision/recall/f1/support and confusion matrix."""
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=float)
    pred = (probs >= threshold).astype(int)
    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, pred, labels=[0, 1], zero_division=0)
    return {
        "n": int(len(labels)),
        **{key: METRICS[key](labels, probs, threshold) for key in HEADLINE},
        "per_class": {
            str(c): {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
            }
            for c in (0, 1)
        },
        "confusion_matrix": skm.confusion_matrix(labels, pred, labels=[0, 1]).tolist(),
        "classification_report": skm.classification_report(
            labels, pred, labels=[0, 1], target_names=["normal (0)", "tumour (1)"], zero_division=0
        ),
    }


# --- calibration --------------------------------------------------------------------------------


def brier(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(np.mean((np.asarray(probs, float) - np.asarray(labels, float)) ** 2))


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> pd.DataFrame:
    """Per equal-width bin of P(tumour): count, mean predicted probability, fraction of tumours."""
    labels, probs = np.asarray(labels, float), np.asarray(probs, float)
    which = np.minimum((probs * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(which, probs, minlength=bins) / count
        positive = np.bincount(which, labels, minlength=bins) / count
    return pd.DataFrame(
        {
            "lo": np.arange(bins) / bins,
            "hi": np.arange(1, bins + 1) / bins,
            "count": count,
            "mean_prob": mean_prob,
            "fraction_positive": positive,
        }
    )


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Sum over 15 equal-width bins of P(tumour) of (bin share) x |mean P - fraction of tumours|."""
    table = reliability(labels, probs, bins)
    used = table["count"] > 0
    weights = table["count"][used] / table["count"].sum()
    return float((weights * (table["mean_prob"][used] - table["fraction_positive"][used]).abs()).sum())


def nll_from_log_odds(labels: np.ndarray, log_odds: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of labels under P = sigmoid(log_odds / temperature)."""
    z = np.asarray(log_odds, float) / temperature
    y = np.asarray(labels, float)
    return float(np.mean(np.logaddexp(0, z) - y * z))


def fit_temperature(labels: np.ndarray, log_odds: np.ndarray) -> float:
    """The temperature T minimising the NLL of sigmoid(log_odds / T) (Guo et al. 2017)."""
    result = minimize_scalar(
        lambda log_t: nll_from_log_odds(labels, log_odds, float(np.exp(log_t))),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(np.exp(result.x))


def apply_temperature(log_odds: np.ndarray, temperature: float) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(log_odds, float) / temperature))


# --- groups (slides) ----------------------------------------------------------------------------


def group_scores(frame: pd.DataFrame) -> pd.DataFrame:
    """Per group (e.g. slide): label = any tumour patch, and the max and mean patch probability."""
    return (
        frame.groupby("group", sort=True)
        .agg(label=("label", "max"), prob_max=("prob", "max"), prob_mean=("prob", "mean"), n=("prob", "size"))
        .reset_index()
    )


# --- bootstrap confidence intervals -------------------------------------------------------------


def bootstrap_cis(
    labels: np.ndarray,
    probs: np.ndarray,
    thresholds: dict[str, float],
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    chunk: int = 100,
) -> dict:
    """Percentile bootstrap CIs of ROC AUC, average precision, and accuracy/sensitivity/specificity
    at each named threshold. Resample b draws n indices with rng.integers(0, n, n) from one
    default_rng(seed) stream (in order), so a loop over resamples reproduces it exactly.

    Vectorised: every statistic depends only on how many positives and negatives a resample
    holds at each distinct score, so a chunk of resamples is one bincount of (score group,
    label) codes; AUC (ties count half, as scikit-learn), AP and the threshold metrics follow
    from cumulative sums over the groups. Resamples with one class only are left out of the
    AUC/AP intervals.
    """
    labels, probs = np.asarray(labels).astype(np.int64), np.asarray(probs, float)
    n = len(labels)
    scores, group = np.unique(probs, return_inverse=True)  # ascending distinct scores
    g = len(scores)
    code = group + g * labels  # per prediction: its score group, negatives first
    first_above = {name: int(np.searchsorted(scores, t, side="left")) for name, t in thresholds.items()}
    rng = np.random.default_rng(seed)
    values: dict[str, list] = {"roc_auc": [], "average_precision": []}
    for name in thresholds:
        values.update({f"{name}/{m}": [] for m in THRESHOLD_METRICS})
    done = 0
    while done < resamples:
        c = min(chunk, resamples - done)
        drawn = code[rng.integers(0, n, size=(c, n))] + (2 * g) * np.arange(c)[:, None]
        counts = np.bincount(drawn.ravel(), minlength=2 * g * c).reshape(c, 2, g)
        neg, pos = counts[:, 0], counts[:, 1]
        cum_neg, cum_pos = np.cumsum(neg, axis=1), np.cumsum(pos, axis=1)
        n_neg, n_pos = cum_neg[:, -1], cum_pos[:, -1]
        valid = (n_pos > 0) & (n_neg > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            # AUC: every positive beats the negatives below its score, and half of those tied with it
            auc = (pos * (2 * cum_neg - neg)).sum(1) / (2.0 * n_pos * n_neg)
            # AP: precision at each score (predicting positive from it upwards), weighted by its
            # positives; float32 in place, as this is the largest computation
            tp, predicted = np.empty((c, g), np.float32), np.empty((c, g), np.float32)
            np.subtract(n_pos[:, None], cum_pos, out=tp, casting="unsafe")
            tp += pos
            np.add(cum_pos, cum_neg, out=predicted, casting="unsafe")
            np.subtract((n_pos + n_neg)[:, None], predicted, out=predicted)
            predicted += pos
            predicted += neg
            np.divide(tp, np.maximum(predicted, 1, out=predicted), out=tp)
            tp *= pos
            ap = tp.sum(1, dtype=np.float64) / n_pos
            values["roc_auc"].append(np.where(valid, auc, np.nan))
            values["average_precision"].append(np.where(valid, ap, np.nan))
            for name, k in first_above.items():
                tn_t = cum_neg[:, k - 1] if k > 0 else np.zeros(c)
                tp_t = n_pos - (cum_pos[:, k - 1] if k > 0 else 0)
                values[f"{name}/accuracy"].append((tp_t + tn_t) / n)
                values[f"{name}/sensitivity"].append(np.where(n_pos > 0, tp_t / n_pos, np.nan))
                values[f"{name}/specificity"].append(np.where(n_neg > 0, tn_t / n_neg, np.nan))
                values[f"{name}/balanced_accuracy"].append(
                    (values[f"{name}/sensitivity"][-1] + values[f"{name}/specificity"][-1]) / 2
                )
        done += c
    tail = 100 * (1 - level) / 2
    out = {}
    for key, chunks in values.items():
        samples = np.concatenate(chunks)
        finite = samples[np.isfinite(samples)]
        out[key] = [float(v) for v in np.percentile(finite, [tail, 100 - tail])] if len(finite) else [float("nan")] * 2
    return out
