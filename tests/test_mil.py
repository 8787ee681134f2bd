"""Slide-level MIL runs (configs/mil.yaml) on feature files where a positive slide holds a small
tumour focus (2% of its tiles), as extract-features writes them."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest

from cancernet.data.bags import write_synthetic_bags

from conftest import CONFIGS, ROOT, StopAfterSyncs, python_env

pytestmark = pytest.mark.slow
COMMON = (
    "train.device=cpu",
    "train.amp=off",
    "data.num_workers=0",
    "train.steps=null",  # configs/mil.yaml counts steps; these runs count epochs
    "train.epochs=12",
    "optim.lr=1e-3",
    "data.val_fraction=0.2",
    "data.test_fraction=0.3",
    "report.bootstrap=200",
)


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bags")
    write_synthetic_bags(folder, 160, focus=0.02, seed=0)
    return folder


def mil_run(bags, out, *overrides, stop_after=None, stop=None, hook=None) -> str:
    from cancernet.config import load_config
    from cancernet.runtime.distributed import session
    from cancernet.runtime.signals import StopFlag
    from cancernet.train.runner import run

    cfg = load_config(
        CONFIGS / "mil.yaml",
        [
            f"data.features={bags}",
            f"data.slides_csv={bags / 'labels.csv'}",
            f"train.out_dir={out}",
            *COMMON,
            *overrides,
        ],
    )
    stop = stop or StopFlag()

    def on_epoch_end(training, row):
        if hook is not None:
            hook(training, row)
        if stop_after is not None and row["epoch"] >= stop_after:
            stop.requested = True

    with session("cpu") as dist:
        return run(cfg, dist, stop, on_epoch_end)


@pytest.fixture(scope="module")
def abmil(bags, tmp_path_factory):
    out = tmp_path_factory.mktemp("abmil") / "run"
    assert mil_run(bags, out, "model.mil=abmil") == "done"
    return out


def test_abmil_finds_the_focus_and_mean_pooling_does_clearly_worse(bags, abmil, tmp_path):
    metrics = json.loads((abmil / "report" / "metrics.json").read_text())
    assert metrics["level"] == "slide" and metrics["n"] == 48 and metrics["roc_auc"] >= 0.95
    assert metrics["roc_auc_ci"][0] <= metrics["roc_auc"] <= metrics["roc_auc_ci"][1]
    assert {"sensitivity", "specificity", "sensitivity_ci"} <= set(metrics["at_val_threshold"])
    assert mil_run(bags, tmp_path / "mean", "model.mil=mean") == "done"
    mean = json.loads((tmp_path / "mean" / "report" / "metrics.json").read_text())
    assert mean["roc_auc"] < metrics["roc_auc"] - 0.1, (mean["roc_auc"], metrics["roc_auc"])
    # its attention is highest on a tumour tile of (nearly) every positive test slide
    test = pd.read_csv(abmil / "predictions" / "test.csv")
    positives = test[test["label"] == 1]
    hits = [tile in h5py.File(bags / f"{s}.h5")["tumour"][:] for s, tile in zip(positives["id"], positives["top_tile"])]
    assert np.mean(hits) >= 0.8, hits
    # and concentrated there: lower entropy (relative to uniform) than on negative slides
    assert positives["attention_entropy"].mean() < test[test["label"] == 0]["attention_entropy"].mean()
    assert {"prob", "pred", "attention_max", "attention_entropy", "top_tile", "tiles"} <= set(test.columns)


def test_the_report_sets_the_model_beside_its_baseline_and_says_whether_it_beats_it(abmil):
    """Features without a patch head (here synthetic, as a foundation model's): the baseline is
    the slides' mean feature under a logistic regression fitted on the training slides. Mean
    pooling cannot see a 2% focus; ABMIL does, and the report says it beats the baseline, with
    the paired interval of the difference."""
    metrics = json.loads((abmil / "report" / "metrics.json").read_text())
    baseline = metrics["baselines"]["mean feature, logistic regression"]
    assert baseline["roc_auc"] < metrics["roc_auc"] - 0.1
    assert baseline["difference"] == pytest.approx(metrics["roc_auc"] - baseline["roc_auc"])
    assert baseline["difference_ci"][0] > 0 and baseline["verdict"] == "beats"
    page = (abmil / "report" / "index.html").read_text()
    assert "mean feature, logistic regression" in page and "The model beats the baseline" in page


def test_a_patients_slides_stay_in_one_split(abmil, bags):
    splits = pd.read_csv(abmil / "splits.csv").merge(pd.read_csv(bags / "labels.csv"), left_on="id", right_on="slide")
    assert (splits.groupby("patient")["split"].nunique() == 1).all()


def test_a_run_stopped_inside_an_epoch_resumes_to_the_same_result(bags, abmil, tmp_path):
    import torch

    out = tmp_path / "run"
    # 80 training bags an epoch, one a step: the stop request is read every 10 steps
    # (train.sync_every) and at the epoch's end: 9 looks an epoch; the 39th is 30 bags into epoch 5
    assert mil_run(bags, out, "model.mil=abmil", stop=StopAfterSyncs(39)) == "stopped"
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert saved["epoch"] == 4 and saved["run_state"]["mid_epoch"]["samples"] == 30
    assert len(pd.read_csv(out / "summary.csv")) == 4  # the unfinished epoch is not in the summary
    assert mil_run(bags, out, "model.mil=abmil") == "done"
    a, b = pd.read_csv(abmil / "summary.csv"), pd.read_csv(out / "summary.csv")
    columns = ["train_loss", "val_loss", "val_auc", "lr", "samples_seen"]
    assert np.allclose(a[columns], b[columns], rtol=1e-5, atol=1e-6)
    pa, pb = pd.read_csv(abmil / "predictions" / "test.csv"), pd.read_csv(out / "predictions" / "test.csv")
    assert np.allclose(pa["prob"], pb["prob"], atol=1e-6)


def test_ema_clipping_accumulation_and_a_checkpoint_cadence_stop_inside_an_epoch_and_resume_exactly(bags, tmp_path):
    """What a patch run has, a slide-level run has, through the same loop: an EMA of the weights
    (what best.pt and the report use) reaching its decay, clipped gradients, two bags per
    optimizer step, last.pt at most every train.checkpoint_every (a stop still saves at once)."""
    import torch

    common = (
        "model.mil=abmil",
        "train.epochs=4",
        "train.ema_decay=0.99",
        "train.ema_warmup=40",
        "train.clip_grad=0.5",
        "train.grad_accum=2",
        "train.checkpoint_every=1h",
        "train.log_every=0",  # no log line's sync point among the looks counted below
    )
    uninterrupted = tmp_path / "uninterrupted"
    assert mil_run(bags, uninterrupted, *common) == "done"
    out, seen = tmp_path / "run", []

    def last_pt_exists(training, row):
        seen.append((out / "checkpoints" / "last.pt").exists())

    # 80 bags an epoch, two an optimizer step: the stop request is read every 10 optimizer steps
    # and at the epoch's end (5 looks an epoch); the 12th look is 40 bags into epoch 3
    assert mil_run(bags, out, *common, stop=StopAfterSyncs(12), hook=last_pt_exists) == "stopped"
    assert seen == [False, False]  # the cadence: no last.pt after epochs 1 and 2 (1 hour had not passed)
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert saved["epoch"] == 2 and saved["run_state"]["mid_epoch"]["samples"] == 40 and "ema" in saved
    assert mil_run(bags, out, *common) == "done"
    a, b = pd.read_csv(uninterrupted / "summary.csv"), pd.read_csv(out / "summary.csv")
    columns = ["train_loss", "train_acc", "val_loss", "val_auc", "lr", "samples_seen", "ema_decay"]
    assert np.allclose(a[columns], b[columns], rtol=1e-5, atol=1e-6)
    assert b["ema_decay"].tolist() == pytest.approx([0.99] * 4)  # warmed up within the first epoch
    pa, pb = pd.read_csv(uninterrupted / "predictions" / "test.csv"), pd.read_csv(out / "predictions" / "test.csv")
    assert np.allclose(pa["prob"], pb["prob"], atol=1e-6)
    assert torch.load(out / "checkpoints" / "best.pt", weights_only=True)["weights"] == "ema"


def test_fp16_on_the_cpu_runs_the_grad_scaler_path_of_a_slide_level_run(bags, tmp_path):
    """train.amp=fp16 (what amp=auto gives a pre-Ampere GPU): the loss is scaled, the scaler's
    state goes into last.pt, and the model still learns (max pooling: it learns these bags fast)."""
    import torch

    out = tmp_path / "run"
    assert mil_run(bags, out, "model.mil=max", "train.amp=fp16", "train.epochs=4") == "done"
    scaler = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    summary = pd.read_csv(out / "summary.csv")
    assert np.isfinite(summary["train_loss"]).all() and summary["val_auc"].iloc[-1] > 0.9


def test_train_steps_sets_the_length_whatever_the_cohort(bags, tmp_path):
    """train.steps: 100 steps of one bag over 80 training bags is one epoch and a fifth, and the
    LR schedule is laid over those 100 bags (train.epochs back at its default: not the length)."""
    out = tmp_path / "run"
    assert mil_run(bags, out, "model.mil=mean", "train.steps=100", "train.epochs=10") == "done"
    summary = pd.read_csv(out / "summary.csv")
    assert summary["samples_seen"].tolist() == [80, 100]  # one epoch and a fifth of 80 bags
    assert summary["lr"].iloc[-1] < 0.01 * summary["lr"].max()  # the cosine ends with the 100th step


def test_patience_ends_a_run_that_stopped_improving_and_a_rerun_keeps_it_ended(bags, tmp_path):
    """train.patience=2 with nothing learned (lr 0): epochs 2 and 3 are no better than 1, so the
    run stops after epoch 3 of 10, tests best.pt (epoch 1), and a rerun trains nothing more."""
    import torch

    out = tmp_path / "run"
    common = ("model.mil=mean", "optim.lr=0", "train.patience=2")
    assert mil_run(bags, out, *common) == "done"
    assert len(pd.read_csv(out / "summary.csv")) == 3
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["run_state"]
    assert state["stopped_early"] == 3 and state["best_epoch"] == 1
    assert torch.load(out / "checkpoints" / "best.pt", weights_only=True)["epoch"] == 1
    assert (out / "report" / "metrics.json").is_file()
    assert mil_run(bags, out, *common) == "done"
    assert len(pd.read_csv(out / "summary.csv")) == 3


def test_a_time_budget_fixes_the_epochs_after_the_first_and_a_resume_keeps_them(bags, tmp_path, caplog):
    import logging

    import torch

    caplog.set_level(logging.INFO, logger="cancernet")
    out, common = tmp_path / "run", ("model.mil=mean", "train.epochs=500", "train.time_budget=8s")
    # the patch run's budget: planned 20 steps into the first epoch, fixed after the first whole
    # epoch trained under that plan (the second: 160 bags)
    assert mil_run(bags, out, *common, stop_after=2) == "stopped"
    plan = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["run_state"]["budget_plan"]
    assert plan["final"] and plan["budget_s"] == 8.0 and plan["planned_at_sample"] == 160
    assert caplog.text.count("time budget 8s (") == 2  # the warm-up's plan, then the fixed one
    assert mil_run(bags, out, *common) == "done"
    assert caplog.text.count("time budget 8s (") == 2  # the resumed run keeps the plan
    summary = pd.read_csv(out / "summary.csv")
    # the run ends where the plan said, far short of train.epochs, the LR schedule with it
    assert summary["samples_seen"].iloc[-1] == plan["samples"] and 2 <= len(summary) < 500
    assert summary["lr"].iloc[-1] < 0.05 * summary["lr"].max()
    # and the plan fits the budget: training, validations and checkpoints at the pace it measured
    assert plan["estimated_s"] <= 8.0


def test_a_label_file_naming_a_slide_without_features_is_refused_with_its_name(bags, tmp_path):
    labels = pd.read_csv(bags / "labels.csv")
    pd.concat([labels, pd.DataFrame([{"slide": "lost_slide", "label": 1, "patient": "px"}])]).to_csv(
        tmp_path / "labels.csv", index=False
    )
    proc = subprocess.run(
        [
            sys.executable,
            "train_ddp.py",
            "--config",
            "configs/mil.yaml",
            f"data.features={bags}",
            f"data.slides_csv={tmp_path / 'labels.csv'}",
            f"train.out_dir={tmp_path / 'run'}",
            *COMMON,
        ],
        cwd=ROOT,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "lost_slide" in proc.stderr and "no feature file" in proc.stderr, proc.stderr


def test_best_pt_names_the_features_it_was_trained_on_and_the_validation_operating_point(bags, abmil):
    import torch

    best = torch.load(abmil / "checkpoints" / "best.pt", weights_only=True)
    assert best["features"]["backbone"] == "synthetic" and best["features"]["fingerprint"] == "synthetic seed 0"
    assert best["feature_dim"] == 32 and best["task"] == "slide"
    # the operating point the report used, chosen on validation, for predict-slide to label new slides
    metrics = json.loads((abmil / "report" / "metrics.json").read_text())
    assert best["operating_point"]["chosen_on"] == "val"
    assert best["operating_point"]["threshold"] == metrics["at_val_threshold"]["threshold"]


@pytest.mark.parametrize(
    "setting, value",
    [
        ("fingerprint", "0" * 64),  # the same backbone's name, other weights
        ("tile", 112),
        ("stride", 112),
        ("tile_mpp", 1.0),  # another resolution
        ("tissue", {"tissue_mpp": 8.0, "min_saturation": 0.1, "fill_holes_um2": 5000.0, "min_tissue": 0.25}),
    ],
)
def test_a_run_over_feature_files_made_otherwise_is_refused_naming_the_setting(bags, tmp_path, setting, value):
    """Features of one slide made with the same backbone name but another setting would train
    silently beside the others: the run refuses them before it trains, naming the setting."""
    import dataclasses
    import shutil

    from cancernet.data.tile_features import TileFeatures
    from cancernet.runtime.errors import DataError

    mixed = tmp_path / "mixed"
    shutil.copytree(bags, mixed)
    made = TileFeatures(mixed / "slide_007.h5").settings
    with h5py.File(mixed / "slide_007.h5", "r+") as f:
        f.attrs["settings"] = json.dumps(dataclasses.replace(made, **{setting: value}).to_dict())
    with pytest.raises(
        DataError, match=rf"slides slide_000 and slide_007 were extracted with different settings \({setting}\)"
    ):
        mil_run(mixed, tmp_path / "run", "model.mil=mean", "train.epochs=1")
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before it trained


def test_two_ranks_train_one_model_over_the_bags(bags, tmp_path):
    launcher = [sys.executable, "-m", "cancernet.cli.launch", "--standalone", "--nproc_per_node=2", "train_ddp.py"]
    proc = subprocess.run(
        [
            *launcher,
            "--config",
            "configs/mil.yaml",
            f"data.features={bags}",
            f"data.slides_csv={bags / 'labels.csv'}",
            f"train.out_dir={tmp_path / 'run'}",
            *COMMON,
            "train.epochs=4",
            "data.num_workers=2",  # as configs/mil.yaml reads: loader workers kept for the run
        ],
        cwd=ROOT,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "report" / "metrics.json").read_text())
    assert metrics["n"] == 48 and len(pd.read_csv(tmp_path / "run" / "summary.csv")) == 4
    # each epoch: 80 training bags = 40 steps of two bags, one per rank
    summary = pd.read_csv(tmp_path / "run" / "summary.csv")
    assert summary["samples_seen"].tolist() == [80, 160, 240, 320]
    # the run's length counts the bags of both ranks: the warm-up (mil.yaml: one epoch, 80 bags)
    # and the cosine are laid over all 320 (one rank's count would end the cosine halfway); each
    # epoch's lr is that of its last step, 2 bags before its end
    import torch

    from cancernet.config import OptimConfig
    from cancernet.train.optim import LrSchedule

    parameter = torch.zeros(1, requires_grad=True)
    schedule = LrSchedule(torch.optim.SGD([{"params": [parameter], "lr_scale": 1.0}]), OptimConfig(), 1e-3, 320, 80)
    expected = []
    for seen in summary["samples_seen"]:
        schedule.step(seen - 2, 2)
        expected.append(schedule.lr)
    assert summary["lr"].to_numpy() == pytest.approx(expected, rel=1e-6)


def test_the_operating_point_is_chosen_on_the_validation_slides(abmil):
    """The report's threshold, and best.pt's for predict-slide, come from the validation slides'
    probabilities (choosing on the test slides would flatter the report)."""
    import torch

    from cancernet.evaluate.metrics import youden_threshold

    val, test = (pd.read_csv(abmil / "predictions" / f"{split}.csv") for split in ("val", "test"))
    chosen = youden_threshold(val["label"].to_numpy(), val["prob"].to_numpy())
    assert youden_threshold(test["label"].to_numpy(), test["prob"].to_numpy()) != pytest.approx(chosen)
    best = torch.load(abmil / "checkpoints" / "best.pt", weights_only=True)
    metrics = json.loads((abmil / "report" / "metrics.json").read_text())
    assert best["operating_point"]["threshold"] == pytest.approx(chosen)
    assert metrics["at_val_threshold"]["threshold"] == pytest.approx(chosen)
    assert (test["pred"] == (test["prob"] >= chosen)).all()


def test_cv_runs_folds_times_seeds_and_reports_their_spread_and_the_out_of_fold_slide_auc(
    bags, tmp_path, capsys, monkeypatch
):
    """`cancernet cv`: 2 folds x 2 seeds of configs/mil.yaml in one command, then one report over
    the four runs; the same command again keeps them and only reports."""
    from test_wsi import run_cli

    out = tmp_path / "cv"
    args = ["cv", "--config", "mil", "--folds", "2", "--seeds", "0", "1", "--out", out]
    settings = [f"data.features={bags}", f"data.slides_csv={bags / 'labels.csv'}", *COMMON]
    settings = [*settings, "model.mil=abmil", "train.epochs=4", "data.val_fraction=0.15"]
    code, log, err = run_cli(capsys, monkeypatch, *args, *settings)
    assert code == 0, err
    runs = [out / f"fold{k}-seed{s}" for s in (0, 1) for k in (0, 1)]
    each = [json.loads((r / "report" / "metrics.json").read_text()) for r in runs]
    summary = json.loads((out / "aggregate" / "aggregate.json").read_text())
    auc = summary["metrics"]["roc_auc"]
    assert auc["values"] == [m["roc_auc"] for m in each] and auc["sd"] == pytest.approx(np.std(auc["values"], ddof=1))
    assert all(0 <= m["brier"] <= 1 for m in each) and summary["metrics"]["brier"]["mean"] > 0
    # every train+val slide scored once per seed, by the fold that did not train on it; a patient's slides together
    val = summary["validation"]
    assert val["unit"] == "slides" and val["kind"].startswith("out-of-fold: every train+val slide once")
    assert val["unique_patches"] == 160 - each[0]["n"]
    assert "4 runs: test AUC" in log and str(out / "aggregate" / "aggregate.html") in log
    code, log, _ = run_cli(capsys, monkeypatch, *args, *settings)
    assert code == 0 and log.count("done before, kept") == 4


def test_an_offline_wandb_run_holds_each_epochs_row_and_the_slide_level_test_result(bags, tmp_path, monkeypatch):
    import torch

    from wandb_log import history, records, run_ids

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tmp_path / "run"
    assert mil_run(bags, out, "model.mil=mean", "train.epochs=2") == "done"
    (log,) = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    rows = history(log)
    epochs = [row for row in rows if "val_auc" in row]
    summary = pd.read_csv(out / "summary.csv")
    assert [row["epoch"] for row in epochs] == summary["epoch"].tolist() == [1, 2]
    assert [row["val_auc"] for row in epochs] == pytest.approx(summary["val_auc"].tolist(), abs=1e-9)
    assert run_ids(log) == {torch.load(out / "checkpoints" / "last.pt", weights_only=True)["run_state"]["wandb_id"]}
    # the run's summary holds the slide-level test AUC of report/metrics.json
    updates = {
        item.key or "/".join(item.nested_key): json.loads(item.value_json)
        for record in records(log)
        if record.WhichOneof("record_type") == "summary"
        for item in record.summary.update
    }
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert updates["test/roc_auc"] == pytest.approx(metrics["roc_auc"], abs=1e-12)


def test_a_big_slide_gives_another_draw_of_its_tiles_each_epoch_and_the_same_on_a_resume(bags):
    """The draw travels with the index (bag, epoch): persistent loader workers, which never hear
    of a new epoch, still give each epoch its own draw."""
    import torch

    from cancernet.data.bags import Bags

    labels = pd.read_csv(bags / "labels.csv")
    big = Bags(bags, labels["slide"], labels["label"].to_numpy(), max_instances=50, seed=0)
    first, again, later = big[(3, 0)][0], big[(3, 0)][0], big[(3, 1)][0]
    assert first.shape[0] == 50 and first.dtype == torch.float16
    assert (first == again).all() and not (first == later).all()


def test_a_validation_split_without_both_classes_is_refused_before_training(bags, tmp_path):
    """best.pt is chosen by validation AUC: a split of one slide (or one class) would train a run
    that never writes it; refused at the start, saying what to change."""
    from cancernet.runtime.errors import DataError

    pd.read_csv(bags / "labels.csv").head(4).to_csv(tmp_path / "labels.csv", index=False)  # a cohort of 4 slides
    with pytest.raises(
        DataError, match=r"validation split holds 0 slide\(s\) of class\(es\) \[\] only: raise data.val"
    ):
        mil_run(bags, tmp_path / "run", f"data.slides_csv={tmp_path / 'labels.csv'}", "data.test_fraction=0.25")
    assert not (tmp_path / "run" / "checkpoints").exists()
