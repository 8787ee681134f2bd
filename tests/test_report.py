import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn import metrics as skm

from cancernet.evaluate.metrics import (
    bootstrap_cis,
    brier,
    expected_calibration_error,
    fit_temperature,
    group_scores,
    nll_from_log_odds,
    youden_threshold,
)
from cancernet.evaluate.report import FIGURES, group_metrics, most_confident

from conftest import ROOT, python_env, train


@pytest.fixture(scope="module")
def run_dir(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_run")
    train(synth_root, out, "train.epochs=2", "report.figures=true", "data.stain=hed")
    return out


@pytest.mark.slow
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
    assert metrics["brier"] == pytest.approx(skm.brier_score_loss(labels, probs), abs=1e-6)
    assert "tumour (1)" in metrics["classification_report"]
    t = metrics["val_threshold"]["value"]
    at_t = probs >= t
    assert metrics["at_val_threshold"]["sensitivity"] == pytest.approx(at_t[labels == 1].mean())
    assert metrics["at_val_threshold"]["specificity"] == pytest.approx((~at_t[labels == 0]).mean())
    lo, hi = metrics["roc_auc_ci"]
    assert lo <= metrics["roc_auc"] <= hi
    assert metrics["temperature"] == metrics["calibration"]["temperature"] > 0


@pytest.mark.slow
def test_the_threshold_and_the_temperature_are_chosen_on_validation_not_on_test(run_dir):
    """Evaluation has both splits' predictions at hand; each choice must come from validation."""
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    val, test = (pd.read_csv(run_dir / "predictions" / f"{s}.csv") for s in ("val", "test"))
    # the saved probabilities are after the temperature T: their log-odds x T are the raw ones
    t = metrics["temperature"]
    raw = {
        name: t * np.log(f["prob"].clip(1e-12, 1 - 1e-12) / (1 - f["prob"].clip(1e-12, 1 - 1e-12)))
        for name, f in (("val", val), ("test", test))
    }
    assert fit_temperature(val["label"].to_numpy(), raw["val"].to_numpy()) == pytest.approx(t, rel=2e-3)
    assert fit_temperature(test["label"].to_numpy(), raw["test"].to_numpy()) != pytest.approx(t, rel=2e-2)
    chosen = metrics["val_threshold"]
    assert chosen["chosen_on"] == "val"
    # Youden's J cut of the saved validation predictions, as written to 8 significant digits
    assert chosen["value"] == pytest.approx(youden_threshold(val["label"].to_numpy(), val["prob"].to_numpy()), abs=1e-6)
    assert chosen["value"] != pytest.approx(
        youden_threshold(test["label"].to_numpy(), test["prob"].to_numpy()), abs=1e-6
    )


def test_bootstrap_cis_match_a_slow_reference_and_contain_the_estimate():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    probs = np.round(np.clip(labels * 0.3 + rng.normal(0.35, 0.2, 300), 0, 1), 2)  # with ties
    fast = bootstrap_cis(labels, probs, {"t": 0.5}, resamples=200, seed=3)
    reference = {"roc_auc": [], "average_precision": [], "t/accuracy": [], "t/sensitivity": [], "t/specificity": []}
    draws = np.random.default_rng(3)
    for _ in range(200):
        i = draws.integers(0, 300, 300)
        y, p = labels[i], probs[i]
        reference["roc_auc"].append(skm.roc_auc_score(y, p))
        reference["average_precision"].append(skm.average_precision_score(y, p))
        reference["t/accuracy"].append(((p >= 0.5) == (y == 1)).mean())
        reference["t/sensitivity"].append((p[y == 1] >= 0.5).mean())
        reference["t/specificity"].append((p[y == 0] < 0.5).mean())
    for key, values in reference.items():
        assert fast[key] == pytest.approx(np.percentile(values, [2.5, 97.5]), abs=1e-6), key
    auc = skm.roc_auc_score(labels, probs)
    assert fast["roc_auc"][0] < auc < fast["roc_auc"][1]


def test_temperature_scaling_lowers_the_nll_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    honest = (2 * labels - 1) * 1.0 + rng.normal(0, 1.5, 2000)  # calibrated log-odds
    overconfident = 4 * honest
    t = fit_temperature(labels, overconfident)
    assert 3.0 < t < 5.0
    assert nll_from_log_odds(labels, overconfident, t) < 0.8 * nll_from_log_odds(labels, overconfident)


def test_calibration_measures_match_their_definitions():
    labels = np.array([0, 0, 1, 1, 1])
    probs = np.array([0.1, 0.4, 0.35, 0.8, 0.9])
    assert brier(labels, probs) == pytest.approx(np.mean((probs - labels) ** 2))
    # bins of width 1/15: 0.1 -> bin 1; 0.35, 0.4 -> bin 5 and 6; 0.8 -> bin 12; 0.9 -> bin 13
    expected = (0.1 + 0.4 + abs(0.35 - 1) + abs(0.8 - 1) + abs(0.9 - 1)) / 5
    assert expected_calibration_error(labels, probs) == pytest.approx(expected)
    # unequal bins weigh by their counts: bin 1 holds 3 patches (mean P 0.11, 1 of 3 tumours), bin 13 one
    labels, probs = np.array([0, 1, 0, 1]), np.array([0.1, 0.12, 0.11, 0.9])
    assert expected_calibration_error(labels, probs) == pytest.approx(0.75 * abs(0.11 - 1 / 3) + 0.25 * 0.1)


def test_group_auc_equals_scikit_learn_on_hand_built_groups():
    frame = pd.DataFrame(
        {
            "group": ["a", "a", "b", "b", "c", "d", "d"],
            "label": [0, 1, 0, 0, 1, 0, 0],
            "prob": [0.2, 0.7, 0.3, 0.6, 0.4, 0.1, 0.5],
        }
    )
    scores = group_scores(frame).set_index("group")
    assert scores["label"].to_dict() == {"a": 1, "b": 0, "c": 1, "d": 0}
    assert scores["prob_max"].to_dict() == {"a": 0.7, "b": 0.6, "c": 0.4, "d": 0.5}
    out = group_metrics(frame, bootstrap=0, seed=0)
    assert out["roc_auc_max"] == skm.roc_auc_score([1, 0, 1, 0], [0.7, 0.6, 0.4, 0.5])
    assert out["roc_auc_mean"] == skm.roc_auc_score([1, 0, 1, 0], [0.45, 0.45, 0.4, 0.3])
    assert out["n_groups"] == 4 and out["n_positive_groups"] == 2


def test_the_report_shows_the_most_confident_of_each_kind():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"id": [str(i) for i in range(200)], "label": rng.integers(0, 2, 200), "prob": rng.uniform(0, 1, 200)}
    )
    picked = most_confident(frame, threshold=0.5, per_kind=4)
    for kind, label, positive in (("TP", 1, True), ("FP", 0, True), ("FN", 1, False), ("TN", 0, False)):
        shown = picked[picked["kind"] == kind]["prob"]
        pool = frame[(frame["label"] == label) & ((frame["prob"] >= 0.5) == positive)]["prob"]
        expected = pool.nlargest(4) if positive else pool.nsmallest(4)  # furthest from the threshold
        assert sorted(shown) == sorted(expected), kind


def test_sample_grid_names_the_split_it_shows(synth_root):
    from cancernet.data.kaggle import image_path
    from cancernet.data.patch import read_patch
    from cancernet.evaluate.grids import sample_grid

    ids = pd.read_csv(synth_root / "train_labels.csv", dtype={"id": str}).head(8)
    frame = ids.assign(prob=np.linspace(0, 1, 8))
    figure = sample_grid(frame, lambda i: read_patch(image_path(synth_root, i)), 0.5, split="val", n=8)
    assert figure.get_suptitle().startswith("Val patches")


@pytest.mark.slow
def test_every_figure_and_the_index_page_are_written(run_dir):
    page = (run_dir / "report" / "index.html").read_text()
    for name in FIGURES:
        path = run_dir / "report" / f"{name}.png"
        with Image.open(path) as im:
            assert im.width > 300 and im.height > 200
            assert np.asarray(im.convert("L")).std() > 5  # not a blank canvas
        assert f'src="{name}.png"' in page
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    # the page opens with what a reader needs to judge it
    lo, hi = metrics["roc_auc_ci"]
    assert f"AUC {metrics['roc_auc']:.3f} [{lo:.3f}, {hi:.3f}]" in page
    for fact in (str(metrics["run"]["data_root"]), "resnet18", "best epoch", "git commit", "images per split"):
        assert fact in page, fact


@pytest.mark.slow
def test_predictions_have_the_val_threshold_labels(run_dir):
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    test = pd.read_csv(run_dir / "predictions" / "test.csv")
    assert list(test.columns) == ["id", "label", "prob", "pred"]
    assert (test["pred"] == (test["prob"] >= metrics["val_threshold"]["value"])).all()


@pytest.mark.slow
def test_evaluate_command_rewrites_the_report(run_dir):
    (run_dir / "report" / "metrics.json").unlink()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cancernet",
            "evaluate",
            str(run_dir),
            "--split",
            "val",
            "--checkpoint",
            "last",
            "--calibrate",
        ],
        cwd=ROOT,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    val = pd.read_csv(run_dir / "predictions" / "val.csv")
    assert metrics["split"] == "val" and metrics["checkpoint"].endswith("last.pt")
    assert metrics["roc_auc"] == pytest.approx(skm.roc_auc_score(val["label"], val["prob"]), abs=1e-5)
    summary = pd.read_csv(run_dir / "summary.csv")  # last.pt = the final epoch's weights
    assert metrics["roc_auc"] == pytest.approx(summary["val_auc"].iloc[-1], abs=1e-5)
    assert "AUC" in proc.stdout and "[" in proc.stdout  # the log line carries the intervals


def test_evaluate_command_on_a_non_run_is_a_clear_error(tmp_path, capsys, monkeypatch):
    from cancernet.cli import main
    from cancernet.runtime.console import main_guard

    monkeypatch.setattr(sys, "argv", ["cancernet", "evaluate", str(tmp_path)])
    assert main_guard(main) == 2 and "not a run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_gradcam_heat_lies_in_the_labelled_centre_of_synthetic_tumours(run_dir, synth_root):
    """Synthetic positives have tumour nuclei in the centre 32x32 by construction (and negatives may
    have them outside it): explained by Grad-CAM, a model that learnt the task puts its heat there.
    At the 32 px these runs train at, ResNet18's last stage is 1x1: a map from it is flat."""
    import torch

    from cancernet.data.augment import Preprocess
    from cancernet.data.kaggle import image_path
    from cancernet.data.patch import read_patch
    from cancernet.engine.inference import Predictor
    from cancernet.evaluate.gradcam import gradcam
    from cancernet.runtime.distributed import DistInfo

    predictor = Predictor.load(run_dir / "checkpoints" / "best.pt", DistInfo())
    model, cfg = predictor.model, predictor.cfg
    test = pd.read_csv(run_dir / "predictions" / "test.csv", dtype={"id": str})
    positives = test[(test["label"] == 1) & (test["prob"] > 0.5)]["id"].head(16)
    images = torch.from_numpy(np.stack([read_patch(image_path(synth_root, i)) for i in positives])).permute(0, 3, 1, 2)
    cams = gradcam(model, Preprocess.from_config(cfg.data)(images))
    cams = torch.nn.functional.interpolate(cams[:, None], size=(96, 96), mode="bilinear")[:, 0]
    inside = cams[:, 32:64, 32:64].mean(dim=(1, 2))
    outside = (cams.sum(dim=(1, 2)) - cams[:, 32:64, 32:64].sum(dim=(1, 2))) / (96 * 96 - 32 * 32)
    assert len(positives) >= 8 and (inside > outside).float().mean() >= 0.75, (inside, outside)
    assert inside.mean() > 1.5 * outside.mean()


def test_gradcam_figure_title_fits_inside_the_figure():
    from cancernet.evaluate import grids

    rng = np.random.default_rng(0)
    picked = pd.DataFrame(
        {"kind": ["TP", "FN", "FP", "TN"] * 4, "label": [1, 1, 0, 0] * 4, "prob": rng.uniform(0, 1, 16)}
    )
    fig = grids.gradcam_grid(
        picked, rng.integers(0, 256, (16, 96, 96, 3), dtype=np.uint8), rng.uniform(0, 1, (16, 96, 96)), 0.5
    )
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height


def test_reliability_diagram_shows_how_many_patches_each_point_stands_for():
    from cancernet.evaluate import plots

    rng = np.random.default_rng(0)
    # one bin of 400 patches, one of 40, one of 2
    probs = np.concatenate([rng.uniform(0, 0.06, 400), rng.uniform(0.94, 1, 40), [0.5, 0.52]])
    labels = (rng.uniform(0, 1, len(probs)) < probs).astype(int)
    ax = plots.reliability(labels, probs).axes[0]
    solid, hollow = [c for c in ax.collections if len(c.get_offsets())][:2]
    assert 0.5 < hollow.get_offsets()[0][0] < 0.6 and len(hollow.get_offsets()) == 1  # the sparse bin
    assert hollow.get_facecolor().size == 0 or hollow.get_facecolor()[0][3] == 0  # drawn hollow
    sizes = solid.get_sizes()
    assert sizes.max() > 3 * sizes.min()  # marker area follows the bin's count
    (line,) = [line for line in ax.get_lines() if line.get_label().startswith("model")]
    assert not np.any(np.isclose(line.get_xdata(), 0.51, atol=0.02))  # the sparse bin is not on the line
