import numpy as np
import pytest
from sklearn import metrics as skm

from cancernet.evaluate.metrics import binary_report, roc_auc, threshold_for_sensitivity, youden_threshold


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    probs = np.clip(labels * 0.3 + rng.normal(0.35, 0.2, 500), 0, 1)
    return labels, probs


def test_report_matches_counts_made_by_hand(scores):
    labels, probs = scores
    rep = binary_report(labels, probs)
    pred = probs >= 0.5
    tp, fp = int((pred & (labels == 1)).sum()), int((pred & (labels == 0)).sum())
    fn, tn = int((~pred & (labels == 1)).sum()), int((~pred & (labels == 0)).sum())
    assert rep["n"] == 500 and rep["confusion_matrix"] == [[tn, fp], [fn, tp]]
    assert rep["accuracy"] == pytest.approx((tp + tn) / 500)
    assert rep["per_class"]["1"]["recall"] == pytest.approx(tp / (tp + fn))
    assert rep["per_class"]["0"]["precision"] == pytest.approx(tn / (tn + fn))
    assert rep["per_class"]["1"]["support"] == int(labels.sum())
    # AUC: the share of (tumour, normal) pairs ordered correctly, ties counting half
    pos, neg = probs[labels == 1], probs[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert rep["roc_auc"] == pytest.approx(pairs)
    assert rep["average_precision"] == pytest.approx(skm.average_precision_score(labels, probs))


def test_auc_is_nan_with_one_class():
    assert np.isnan(roc_auc(np.zeros(5), np.linspace(0, 1, 5)))


def test_youden_threshold_maximises_j(scores):
    labels, probs = scores
    t = youden_threshold(labels, probs)

    def j(th):
        pred = probs >= th
        return pred[labels == 1].mean() - pred[labels == 0].mean()

    assert all(j(t) >= j(th) - 1e-12 for th in np.linspace(0, 1, 101))


def test_threshold_for_sensitivity_reaches_the_target(scores):
    labels, probs = scores
    t = threshold_for_sensitivity(labels, probs, 0.95)
    assert (probs[labels == 1] >= t).mean() >= 0.95


def test_every_metric_in_the_table_matches_scikit_learn_at_its_threshold(scores):
    from cancernet.evaluate.metrics import METRICS

    labels, probs = scores
    pred = (probs >= 0.3).astype(int)
    expected = {
        "roc_auc": skm.roc_auc_score(labels, probs),
        "average_precision": skm.average_precision_score(labels, probs),
        "accuracy": skm.accuracy_score(labels, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(labels, pred),
        "sensitivity": skm.recall_score(labels, pred),
        "specificity": skm.recall_score(labels, pred, pos_label=0),
        "brier": skm.brier_score_loss(labels, probs),
    }
    for key, value in expected.items():
        assert METRICS[key](labels, probs, 0.3) == pytest.approx(value), key
    # ECE: |mean P - share of tumours| per 1/15-wide bin, weighted by the bin's share
    bins = np.minimum((probs * 15).astype(int), 14)
    ece = sum((bins == b).mean() * abs(probs[bins == b].mean() - labels[bins == b].mean()) for b in np.unique(bins))
    assert METRICS["ece"](labels, probs) == pytest.approx(ece)
    assert np.isnan(METRICS["roc_auc"](np.ones(5), np.linspace(0, 1, 5)))  # one class: no AUC


def test_the_report_page_and_headline_show_every_metric_of_the_table_with_its_interval(scores):
    import pandas as pd

    from cancernet.evaluate import report
    from cancernet.evaluate.metrics import CALIBRATION, HEADLINE, METRICS, OPERATING

    labels, probs = scores
    metrics = report.compute_metrics(pd.DataFrame({"label": labels, "prob": probs}), {"threshold": 0.4}, 200)
    metrics.update(brier=0.1, ece=0.02, temperature=1.0, split="test")
    line, page = report.headline(metrics), report.index_html(metrics, [])
    for key in (*HEADLINE, *OPERATING, *CALIBRATION):
        spec = METRICS[key]
        value = metrics[key] if key not in OPERATING else metrics["at_val_threshold"][key]
        assert f"{spec.short} {spec.show(value)}" in line and spec.name in page, key
        if spec.interval:
            ci = (metrics if key not in OPERATING else metrics["at_val_threshold"])[f"{key}_ci"]
            assert ci[0] <= value <= ci[1] and f"[{ci[0]:.3f}, {ci[1]:.3f}]" in line, key
    assert "operating threshold" not in page  # 0.4: near 0.5, nothing to explain
    low = report.compute_metrics(
        pd.DataFrame({"label": labels, "prob": probs}), {"threshold": 0.031, "method": "youden_j"}, 0
    )
    low.update(brier=0.1, ece=0.02, temperature=1.0, split="test")
    assert "The operating threshold t = 0.031 maximises sensitivity + specificity" in report.index_html(low, [])
