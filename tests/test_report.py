import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn import metrics as skm

from cancernet.metrics import youden_threshold
from cancernet.report import FIGURES, compute_metrics
from conftest import ROOT, python_env, train


@pytest.fixture(scope="module")
def run_dir(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_run")
    train(synth_root, out, "train.epochs=2")
    return out


def test_metrics_json_matches_scikit_learn_on_saved_predictions(run_dir):
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    test = pd.read_csv(run_dir / "predictions" / "test.csv")
    labels, probs = test["label"], test["prob"]
    pred = (probs >= 0.5).astype(int)
    assert metrics["n"] == len(test) and metrics["split"] == "test"
    assert metrics["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred), abs=1e-6)
    assert metrics["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, probs), abs=1e-5)
    assert metrics["average_precision"] == pytest.approx(skm.average_precision_score(labels, probs), abs=1e-5)
    assert metrics["confusion_matrix"] == skm.confusion_matrix(labels, pred).tolist()
    assert metrics["per_class"]["1"]["f1"] == pytest.approx(skm.f1_score(labels, pred), abs=1e-6)
    assert "tumour (1)" in metrics["classification_report"]
    t = metrics["val_threshold"]["value"]
    at_t = probs >= t
    assert metrics["at_val_threshold"]["sensitivity"] == pytest.approx(at_t[labels == 1].mean())
    assert metrics["at_val_threshold"]["specificity"] == pytest.approx((~at_t[labels == 0]).mean())


def test_threshold_comes_from_validation_not_test():
    rng = np.random.default_rng(0)
    def frame(shift):
        labels = rng.integers(0, 2, 400)
        return pd.DataFrame({"label": labels, "prob": np.clip(labels * 0.4 + shift + rng.normal(0, 0.15, 400), 0, 1)})
    val, test = frame(0.1), frame(0.4)  # test scores are shifted: its own best cut is elsewhere
    metrics = compute_metrics(val, test)
    t = metrics["val_threshold"]["value"]
    assert t == pytest.approx(youden_threshold(val["label"].to_numpy(), val["prob"].to_numpy()))
    assert abs(t - youden_threshold(test["label"].to_numpy(), test["prob"].to_numpy())) > 0.1
    assert metrics["at_val_threshold"]["threshold"] == t


def test_every_figure_and_the_index_page_are_written(run_dir):
    page = (run_dir / "report" / "index.html").read_text()
    for name in FIGURES:
        path = run_dir / "report" / f"{name}.png"
        with Image.open(path) as im:
            assert im.width > 300 and im.height > 200
            assert np.asarray(im.convert("L")).std() > 5  # not a blank canvas
        assert f'src="{name}.png"' in page
    assert "ROC AUC" in page


def test_predictions_have_the_val_threshold_labels(run_dir):
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    test = pd.read_csv(run_dir / "predictions" / "test.csv")
    assert list(test.columns) == ["id", "label", "prob", "pred"]
    assert (test["pred"] == (test["prob"] >= metrics["val_threshold"]["value"])).all()


def test_evaluate_command_rewrites_the_report(run_dir):
    (run_dir / "report" / "metrics.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "cancernet", "evaluate", "--run", str(run_dir),
                           "--split", "val", "--checkpoint", "last"], cwd=ROOT, env=python_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    val = pd.read_csv(run_dir / "predictions" / "val.csv")
    assert metrics["split"] == "val" and metrics["checkpoint"].endswith("last.pt")
    assert metrics["roc_auc"] == pytest.approx(skm.roc_auc_score(val["label"], val["prob"]), abs=1e-5)
    summary = pd.read_csv(run_dir / "summary.csv")  # last.pt = the final epoch's weights
    assert metrics["roc_auc"] == pytest.approx(summary["val_auc"].iloc[-1], abs=1e-5)


def test_evaluate_command_on_a_non_run_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cancernet", "evaluate", "--run", str(tmp_path)],
                          cwd=ROOT, env=python_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "not a run directory" in proc.stderr
