"""One report over runs of the same kind (aggregate.py): numbers, out-of-fold AUC, refusals."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from cancernet.config import Config
from cancernet.evaluate.aggregate import aggregate
from cancernet.runtime.errors import UserError


def fake_run(root, seed, fold, auc, folds=3, **changes):
    """A finished run's files as aggregate reads them; its validation is fold `fold` of 30 patches."""
    cfg = Config().to_dict()
    cfg["train"].update(seed=seed, out_dir=str(root))
    cfg["data"].update(folds=folds, fold=fold)
    for key, value in changes.items():
        section, name = key.split(".")
        cfg[section][name] = value
    (root / "report").mkdir(parents=True)
    (root / "predictions").mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump({**cfg, "meta": {"git_commit": "x"}}))
    point = {"sensitivity": 0.8 + fold / 100, "specificity": 0.7}
    metrics = {
        "n": 50,
        "roc_auc": auc,
        "roc_auc_ci": [auc - 0.05, auc + 0.03],
        "average_precision": auc - 0.1,
        "accuracy": auc - 0.2,
        "accuracy_ci": [0.6, 0.8],
        "balanced_accuracy": auc - 0.15,
        "balanced_accuracy_ci": [0.6, 0.8],
        "brier": 0.1,
        "ece": 0.05,
        "at_val_threshold": point,
    }
    (root / "report" / "metrics.json").write_text(json.dumps(metrics))
    rng = np.random.default_rng(fold)
    ids = [f"p{fold}_{i}" for i in range(30)]
    labels = rng.integers(0, 2, 30)
    pd.DataFrame(
        {"id": ids, "label": labels, "prob": np.clip(labels * 0.5 + rng.uniform(0, 0.6, 30), 0, 1), "pred": 0}
    ).to_csv(root / "predictions" / "val.csv", index=False)
    return root


def test_aggregate_gives_mean_sd_per_run_values_and_the_out_of_fold_auc(tmp_path):
    runs = [fake_run(tmp_path / f"fold{k}", 0, k, auc) for k, auc in enumerate((0.90, 0.92, 0.97))]
    summary = aggregate(runs, tmp_path / "agg")
    auc = summary["metrics"]["roc_auc"]
    assert auc["values"] == [0.90, 0.92, 0.97] and auc["mean"] == pytest.approx(0.93)
    assert auc["sd"] == pytest.approx(np.std([0.90, 0.92, 0.97], ddof=1))
    pooled = pd.concat([pd.read_csv(r / "predictions" / "val.csv") for r in runs])
    assert summary["validation"]["pooled_auc"] == pytest.approx(roc_auc_score(pooled["label"], pooled["prob"]))
    assert summary["validation"]["kind"].startswith("out-of-fold") and summary["validation"]["unique_patches"] == 90
    assert [r["roc_auc_ci"] for r in summary["per_run"]][0] == [0.85, 0.93]
    assert all((tmp_path / "agg" / f"aggregate.{ext}").is_file() for ext in ("json", "html", "png"))
    # seeds sharing one validation split: pooled, and said to be
    seeds = [fake_run(tmp_path / f"seed{s}", s, 0, 0.9, folds=1) for s in (0, 1)]
    assert aggregate(seeds, tmp_path / "agg2")["validation"]["kind"].startswith("pooled")


def test_runs_that_differ_in_more_than_seed_and_fold_are_refused_naming_the_keys(tmp_path):
    a = fake_run(tmp_path / "a", 0, 0, 0.9)
    b = fake_run(tmp_path / "b", 1, 1, 0.9, **{"optim.lr": 0.5, "data.image_size": 64})
    with pytest.raises(UserError, match=r"differ in more than seed and fold.*data\.image_size: 96, 64.*optim\.lr"):
        aggregate([a, b], tmp_path / "agg")
    with pytest.raises(UserError, match="no finished run"):
        aggregate([a, tmp_path / "nothing"], tmp_path / "agg")


@pytest.mark.parametrize(
    "key, value",
    [
        ("optim.lr", 0.5),
        ("data.image_size", 64),
        ("model.arch", "resnet18"),
        ("train.epochs", 7),
        ("data.augment", "none"),
    ],
)
def test_runs_that_differ_in_one_setting_besides_seed_and_fold_are_refused(tmp_path, key, value):
    """One changed setting is enough to make two runs different experiments, not two seeds of one."""
    a = fake_run(tmp_path / "a", 0, 0, 0.9)
    b = fake_run(tmp_path / "b", 1, 1, 0.9, **{key: value})
    with pytest.raises(UserError, match="differ in more than seed and fold.*" + re.escape(key)):
        aggregate([a, b], tmp_path / "agg")
