"""One training run's flow with the settings the shipped recipes use that change what it does:
slide groups through the real split path, uneven split fractions, validation every N epochs, LR
warm-up (runner.py, training.py)."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import train

pytestmark = pytest.mark.slow


def test_groups_fractions_eval_every_and_warmup_shape_the_run(synth_root, tmp_path):
    labels = pd.read_csv(synth_root / "train_labels.csv", dtype={"id": str}).head(240)
    groups = labels.assign(group=[f"slide{i // 6:03d}" for i in range(len(labels))])[["id", "group"]]
    groups.to_csv(tmp_path / "groups.csv", index=False)
    out = tmp_path / "run"
    train(
        synth_root,
        out,
        "data.limit=240",
        f"data.groups_csv={tmp_path / 'groups.csv'}",
        "data.val_fraction=0.1",
        "data.test_fraction=0.25",
        "train.epochs=3",
        "train.eval_every=2",
        "optim.warmup_epochs=3",
        "optim.schedule=cosine",
    )
    splits = pd.read_csv(out / "splits.csv", dtype={"id": str}).merge(groups, on="id")
    assert splits.groupby("group")["split"].nunique().max() == 1  # no slide in two splits
    share = splits["split"].value_counts() / len(splits)
    # whole slides of 6, in two strata (tumour / normal majority): each split within two slides of its share
    assert share["test"] == pytest.approx(0.25, abs=12 / 240) and share["val"] == pytest.approx(0.1, abs=12 / 240)
    summary = pd.read_csv(out / "summary.csv")
    assert np.isnan(summary["val_auc"].iloc[0]) and not summary["val_auc"].iloc[1:].isna().any()  # epochs 2, 3
    # the whole run is warm-up: the last step of epoch e runs at lr x e / 3
    assert summary["lr"].tolist() == pytest.approx([2e-3 * e / 3 for e in (1, 2, 3)], rel=1e-6)
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["groups"]["n_groups"] == splits.loc[splits["split"] == "test", "group"].nunique()
    assert math.isfinite(metrics["groups"]["roc_auc_max"])


@pytest.mark.slow
@pytest.mark.parametrize("metric, best_epoch", [("val_auc", 2), ("val_loss", None)])
def test_best_pt_is_the_epoch_train_select_metric_ranks_highest(synth_root, tmp_path, monkeypatch, metric, best_epoch):
    """Validation AUC is scripted to peak at epoch 2 while the loss goes on falling: best.pt follows
    train.select_metric, and says what chose it."""
    from cancernet.train import runner

    aucs = iter([0.70, 0.95, 0.90, 0.80])
    monkeypatch.setattr(runner, "roc_auc", lambda labels, probs: next(aucs))
    out = tmp_path / "run"
    train(synth_root, out, "train.epochs=4", "data.limit=300", f"train.select_metric={metric}")
    summary = pd.read_csv(out / "summary.csv")
    if best_epoch is None:  # the lowest validation loss
        best_epoch = int(summary.loc[summary["val_loss"].idxmin(), "epoch"])
        assert best_epoch != 2, "the scripted AUC's best epoch: this run cannot tell the metrics apart"
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == best_epoch and best["selected_by"] == metric
