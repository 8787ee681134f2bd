"""Pure metric functions on arrays of labels and class-1 probabilities."""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC, or NaN when only one class is present."""
    return float(skm.roc_auc_score(labels, probs)) if len(np.unique(labels)) == 2 else float("nan")


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(skm.log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7), labels=[0, 1]))


def youden_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (Youden's J) on these data.

    Midway between the best cut's score and the next lower one, so that the threshold does not
    sit exactly on one validation patch's score (which saturates at 1.0 on easy data).
    """
    fpr, tpr, thresholds = skm.roc_curve(labels, probs)
    best = int(np.argmax(tpr - fpr))
    upper = min(thresholds[best], 1.0)
    lower = thresholds[best + 1] if best + 1 < len(thresholds) else 0.0
    return float((upper + lower) / 2)


def threshold_for_sensitivity(labels: np.ndarray, probs: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity on these data is at least target."""
    fpr, tpr, thresholds = skm.roc_curve(labels, probs)
    ok = np.flatnonzero(tpr >= target)
    return float(min(thresholds[ok[0]], 1.0))


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
