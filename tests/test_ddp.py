"""A real 2-process torchrun run with gloo (sharded training, exact gathered evaluation), then
resumed by a single process with more epochs (another world size)."""

import json
import math
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cancernet.data.synthetic import write_dataset

from conftest import ROOT, python_env, train

pytestmark = pytest.mark.slow
COMMON = ("model.arch=resnet18", "model.pretrained=none", "data.image_size=48", "train.device=cpu")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth1000")
    write_dataset(root, n_train=1000, n_test=20, seed=7, workers=2)
    out = tmp_path_factory.mktemp("ddp_run")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train_ddp.py",
        "--config",
        "configs/cpu_test.yaml",
        f"data.root={root}",
        *COMMON,
        "train.epochs=2",
        # the global batch is 2 x 32: the lr doubles (the single-process extension below keeps 1 x 32)
        "optim.lr_scale=linear",
        "optim.base_batch=32",
        # a progress bar on rank 0 only, with step log lines due: the ranks must still agree on sync points
        "train.progress=on",
        "train.log_every=3",
        "train.sync_every=50",
        f"train.out_dir={out}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stage1 = tmp_path_factory.mktemp("stage1")  # the 2-process run's files, before the resume changes them
    for name in ("config.yaml", "summary.csv", "splits.csv", "predictions", "report", "checkpoints"):
        (shutil.copytree if (out / name).is_dir() else shutil.copy)(out / name, stage1 / name)
    return SimpleNamespace(root=root, out=out, stage1=stage1, proc=proc)


def test_world_size_is_recorded(ddp_run):
    assert "world_size: 2" in (ddp_run.stage1 / "config.yaml").read_text()


def test_gathered_validation_covers_every_val_id_once(ddp_run):
    splits = pd.read_csv(ddp_run.stage1 / "splits.csv", dtype={"id": str})
    for split in ("val", "test"):
        preds = pd.read_csv(ddp_run.stage1 / "predictions" / f"{split}.csv", dtype={"id": str})
        assert not preds["id"].duplicated().any()
        assert sorted(preds["id"]) == sorted(splits.loc[splits["split"] == split, "id"])


def test_reported_auc_equals_scikit_learn_on_saved_predictions(ddp_run):
    test = pd.read_csv(ddp_run.stage1 / "predictions" / "test.csv")
    metrics = json.loads((ddp_run.stage1 / "report" / "metrics.json").read_text())
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(test["label"], test["prob"]), abs=1e-9)
    assert metrics["n"] == len(test)
    summary = pd.read_csv(ddp_run.stage1 / "summary.csv")
    val = pd.read_csv(ddp_run.stage1 / "predictions" / "val.csv")
    assert summary["val_auc"].max() == pytest.approx(roc_auc_score(val["label"], val["prob"]), abs=1e-5)


def test_two_process_validation_scores_one_model_on_every_shard(ddp_run, tmp_path, capsys, monkeypatch):
    """Each rank ends an epoch with BatchNorm statistics of its own last batch; validation must use
    rank 0's (those saved in last.pt) on both shards: its val loss then equals a single-process
    evaluation of last.pt."""
    from cancernet.cli import main
    from cancernet.runtime.console import main_guard

    run = tmp_path / "copy"
    shutil.copytree(ddp_run.stage1, run)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "cancernet",
            "evaluate",
            str(run),
            "--split",
            "val",
            "--checkpoint",
            "last",
            f"data.root={ddp_run.root}",
            "report.bootstrap=0",
        ],
    )
    assert main_guard(main) == 0, capsys.readouterr().err
    val = pd.read_csv(run / "predictions" / "val.csv")  # last.pt holds no temperature: raw probabilities
    p = val["prob"].clip(1e-12, 1 - 1e-12)
    nll = -(val["label"] * np.log(p) + (1 - val["label"]) * np.log(1 - p)).mean()
    assert pd.read_csv(run / "summary.csv")["val_loss"].iloc[-1] == pytest.approx(nll, abs=2e-5)


def test_each_rank_keeps_its_own_rng_state(ddp_run):
    rng = torch.load(ddp_run.stage1 / "checkpoints" / "last.pt", weights_only=True)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # different dropout masks


def test_linear_lr_scaling_follows_the_global_batch_of_both_ranks(ddp_run):
    assert "global batch 64, lr 0.004 (optim.lr 0.002 scaled linearly from batch 32)" in ddp_run.proc.stdout
    summary = pd.read_csv(ddp_run.stage1 / "summary.csv")
    per_epoch = summary["samples_seen"].iloc[0]
    # the epoch's last step starts 64 samples before its end, on a cosine over 2 epochs
    expected = 4e-3 * 0.5 * (1 + math.cos(math.pi * (per_epoch - 64) / (2 * per_epoch)))
    assert summary["lr"].iloc[0] == pytest.approx(expected, rel=1e-6)


def test_two_process_run_learns(ddp_run):
    metrics = json.loads((ddp_run.stage1 / "report" / "metrics.json").read_text())
    assert metrics["roc_auc"] > 0.95
    summary = pd.read_csv(ddp_run.stage1 / "summary.csv")
    assert summary["epoch"].tolist() == [1, 2] and (summary["images_per_s"] > 0).all()


def test_a_single_process_extends_the_two_process_run_on_the_same_lr_curve(ddp_run, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        assert train(ddp_run.root, ddp_run.out, *COMMON, "train.epochs=3") == "done"
    assert "world size: 2 -> 1" in caplog.text and "train.epochs: 2 -> 3" in caplog.text
    summary = pd.read_csv(ddp_run.out / "summary.csv")
    assert summary["epoch"].tolist() == [1, 2, 3]  # every epoch once
    n_train = (pd.read_csv(ddp_run.out / "splits.csv")["split"] == "train").sum()
    per_epoch = n_train // 32 * 32  # one process, batch 32
    assert (summary["samples_seen"].diff().iloc[2:] == per_epoch).all()
    # epoch 3: cosine over samples, rebuilt for 3 epochs and placed where the 2-process run stopped
    # (the old 2-epoch schedule had reached 0)
    for row in summary.iloc[2:].itertuples():
        before_last_step = row.samples_seen - 32
        expected = 2e-3 * 0.5 * (1 + math.cos(math.pi * before_last_step / (3 * per_epoch)))
        assert row.lr == pytest.approx(expected, rel=1e-6)
    assert (summary["lr"].iloc[2:] > 0).all()
