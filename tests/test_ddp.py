"""A real 2-process torchrun run with gloo: sharded training, exact gathered evaluation."""
import json
import subprocess
import sys

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cancernet.data.synthetic import write_dataset
from conftest import ROOT, python_env


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth2000")
    write_dataset(root, n_train=2000, n_test=20, seed=7, workers=2)
    out = tmp_path_factory.mktemp("ddp_run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train_ddp.py", "--config", "configs/cpu_test.yaml", f"data.root={root}",
           "model.arch=resnet18", "model.pretrained=none", "data.image_size=64", "train.epochs=4",
           "train.device=cpu", f"train.out_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_world_size_is_recorded(ddp_run):
    out, _ = ddp_run
    assert "world_size: 2" in (out / "config.yaml").read_text()


def test_gathered_validation_covers_every_val_id_once(ddp_run):
    out, _ = ddp_run
    splits = pd.read_csv(out / "splits.csv", dtype={"id": str})
    for split in ("val", "test"):
        preds = pd.read_csv(out / "predictions" / f"{split}.csv", dtype={"id": str})
        assert not preds["id"].duplicated().any()
        assert sorted(preds["id"]) == sorted(splits.loc[splits["split"] == split, "id"])


def test_reported_auc_equals_scikit_learn_on_saved_predictions(ddp_run):
    out, _ = ddp_run
    test = pd.read_csv(out / "predictions" / "test.csv")
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(test["label"], test["prob"]), abs=1e-9)
    assert metrics["n"] == len(test)
    # the best epoch's val AUC in summary.csv was computed from the same gathered predictions
    summary = pd.read_csv(out / "summary.csv")
    val = pd.read_csv(out / "predictions" / "val.csv")
    assert summary["val_auc"].max() == pytest.approx(roc_auc_score(val["label"], val["prob"]), abs=1e-5)


def test_two_process_run_learns(ddp_run):
    out, _ = ddp_run
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["roc_auc"] > 0.95
    summary = pd.read_csv(out / "summary.csv")
    assert summary["epoch"].tolist() == [1, 2, 3, 4]
    assert (summary["images_per_s"] > 0).all()
