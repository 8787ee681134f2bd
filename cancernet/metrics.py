"""Pure metric functions on arrays of labels and class-1 probabilities."""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC, or NaN when only one class is present."""
    return float(skm.roc_auc_score(labels, probs)) if len(np.unique(labels)) == 2 else float("nan")


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(skm.log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7), labels=[0, 1]))


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


def at_threshold(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    pred = (probs >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(labels, pred, labels=[0, 1]).ravel()
    return {
        "threshold": float(threshold),
        "accuracy": float((tp + tn) / max(len(labels), 1)),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],
    }


def binary_report(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, ROC AUC, AP, per-class precision/recall/f1/support and confusion matrix."""
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=float)
    pred = (probs >= threshold).astype(int)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, pred, labels=[0, 1], zero_division=0)
    both = len(np.unique(labels)) == 2
    return {
        "n": int(len(labels)),
        "accuracy": float(skm.accuracy_score(labels, pred)),
        "roc_auc": roc_auc(labels, probs),
        "average_precision": float(skm.average_precision_score(labels, probs)) if both else float("nan"),
        "per_class": {str(c): {"precision": float(precision[c]), "recall": float(recall[c]),
                               "f1": float(f1[c]), "support": int(support[c])} for c in (0, 1)},
        "confusion_matrix": skm.confusion_matrix(labels, pred, labels=[0, 1]).tolist(),
        "classification_report": skm.classification_report(
            labels, pred, labels=[0, 1], target_names=["normal (0)", "tumour (1)"], zero_division=0),
    }
