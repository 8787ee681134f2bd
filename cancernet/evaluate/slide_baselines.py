"""What a slide-level model must beat, on the same test slides and the same features.

- The patch model's own head, pooled over each slide's tiles (its maximum, the mean of its top 3,
  its mean), when the features come from a trained patch checkpoint (extract-features stores the
  head's log-odds beside the features).
- Always: the slide's mean feature under a logistic regression fitted on the training slides
  (scikit-learn, standardised features), the baseline of a foundation-model backbone.

Each with its bootstrap interval, and the slide-level model's AUC minus the baseline's with a
paired bootstrap interval over the same resampled slides: 'beats' or 'loses to' only when that
interval excludes zero.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from cancernet.data import tile_features
from cancernet.evaluate.metrics import bootstrap_cis

TOP_K = 3


def patch_head_scores(folder, slides: list[str]) -> pd.DataFrame | None:
    """Per slide: the head's max, top-3 mean and mean tile probability; None when the files hold none."""
    rows = []
    for slide in slides:
        log_odds = tile_features.TileFeatures(tile_features.path_of(folder, slide)).log_odds()
        if log_odds is None or not len(log_odds):
            return None
        prob = np.sort(1 / (1 + np.exp(-log_odds.astype(np.float64))))[::-1]
        rows.append({"max": prob[0], f"top{TOP_K}_mean": prob[:TOP_K].mean(), "mean": prob.mean()})
    return pd.DataFrame(rows, index=slides)


def mean_feature_scores(folder, train: pd.DataFrame, test: list[str], seed: int) -> np.ndarray | None:
    """P(tumour) of each test slide from a logistic regression on the slides' mean features,
    fitted on the training slides; None when those hold one class only."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if train["label"].nunique() < 2:
        return None

    def means(slides):
        return np.stack(
            [
                tile_features.TileFeatures(tile_features.path_of(folder, s)).features().astype(np.float32).mean(0)
                for s in slides
            ]
        )

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    model.fit(means(train["id"]), train["label"].to_numpy())
    return model.predict_proba(means(test))[:, 1]


def paired_difference(labels: np.ndarray, ours: np.ndarray, theirs: np.ndarray, resamples: int, seed: int):
    """AUC(ours) - AUC(theirs) and its 95% interval over the same bootstrap resamples of slides."""
    diff = roc_auc_score(labels, ours) - roc_auc_score(labels, theirs)
    rng, draws = np.random.default_rng(seed), []
    for _ in range(resamples):
        i = rng.integers(0, len(labels), len(labels))
        if 0 < labels[i].sum() < len(i):
            draws.append(roc_auc_score(labels[i], ours[i]) - roc_auc_score(labels[i], theirs[i]))
    ci = [float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))] if draws else None
    return float(diff), ci


def baselines(folder, table: pd.DataFrame, test: pd.DataFrame, resamples: int, seed: int) -> dict:
    """{name: {roc_auc, roc_auc_ci, difference, difference_ci, verdict}} on the test slides
    (test: id, label, prob of the slide-level model; table: every slide with its split)."""
    labels = test["label"].to_numpy()
    if len(np.unique(labels)) < 2:
        return {}
    scores = {}
    head = patch_head_scores(folder, list(test["id"]))
    if head is not None:
        scores.update({f"patch head, {name}": head[name].to_numpy() for name in head.columns})
    pooled = mean_feature_scores(folder, table[table["split"] == "train"], list(test["id"]), seed)
    if pooled is not None:
        scores["mean feature, logistic regression"] = pooled
    out = {}
    for name, score in scores.items():
        ci = bootstrap_cis(labels, score, {}, resamples, seed)["roc_auc"] if resamples else None
        difference, difference_ci = paired_difference(labels, test["prob"].to_numpy(), score, resamples, seed)
        verdict = "indistinguishable from"
        if difference_ci and difference_ci[0] > 0:
            verdict = "beats"
        elif difference_ci and difference_ci[1] < 0:
            verdict = "loses to"
        out[name] = {
            "roc_auc": float(roc_auc_score(labels, score)),
            "roc_auc_ci": ci,
            "difference": difference,
            "difference_ci": difference_ci,
            "verdict": verdict,
        }
    return out


def describe(baseline: dict, model: str) -> list[str]:
    """One sentence per baseline: does the slide-level model beat it?"""
    lines = []
    for name, b in baseline.items():
        ci = b["difference_ci"]
        interval = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
        lines.append(
            f"{model} {b['verdict']} the baseline '{name}' (AUC {b['roc_auc']:.3f}): "
            f"difference {b['difference']:+.3f}{interval}"
        )
    return lines
