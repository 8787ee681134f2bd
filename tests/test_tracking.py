import json
import logging
import time

import pandas as pd
import pytest
import torch

from cancernet.train import tracking

from conftest import train
from wandb_log import history, records, run_ids


@pytest.fixture
def offline(tmp_path, monkeypatch):
    wandb_dir = tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    return wandb_dir


def _logs(wandb_dir):
    return sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))


@pytest.mark.slow
def test_offline_run_holds_one_val_auc_per_epoch_equal_to_summary(synth_root, tmp_path, offline, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.delenv("WANDB_MODE")  # the config's wandb.mode decides here
    train(
        synth_root,
        out,
        "train.epochs=2",
        "data.limit=200",
        "report.figures=true",
        "wandb.log_model=true",
        "wandb.mode=offline",
    )
    (log,) = _logs(offline)
    epochs = [row for row in history(log) if "val_auc" in row]
    summary = pd.read_csv(out / "summary.csv")
    assert [row["epoch"] for row in epochs] == summary["epoch"].tolist() == [1, 2]
    assert [row["val_auc"] for row in epochs] == pytest.approx(summary["val_auc"].tolist(), abs=1e-9)
    assert all({"lr", "images_per_s", "train_loss"} <= set(row) for row in epochs)
    images = {key.split("/")[1] for row in history(log) for key in row if key.startswith("report/")}
    assert {"roc", "confusion_matrix", "sample_grid"} <= images
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert run_ids(log) == {saved["run_state"]["wandb_id"]}
    (artifact,) = [r.artifact for r in records(log) if r.WhichOneof("record_type") == "artifact"]
    assert artifact.type == "model" and [m.path for m in artifact.manifest.contents] == ["best.pt"]
    assert "optimizer" not in torch.load(out / "checkpoints" / "best.pt", weights_only=True)  # weights only


@pytest.mark.slow
def test_an_offline_node_with_an_api_key_falls_back_to_offline_in_bounded_time(
    synth_root, tmp_path, offline, monkeypatch, caplog
):
    """The usual cluster setup: WANDB_API_KEY set, no network. The online start gives up after
    wandb.init_timeout, and offline mode still gets the same run (a syncable offline-run folder)."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)  # a fake key
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: like a cut-off node
    out = tmp_path / "run"
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        assert train(synth_root, out, "train.epochs=1", "data.limit=150", "wandb.init_timeout=5") == "done"
    assert time.perf_counter() - start < 60
    assert "could not start in online mode" in caplog.text and "logging is off" not in caplog.text
    (log,) = _logs(offline)
    assert [row["epoch"] for row in history(log) if "val_auc" in row] == [1]
    assert run_ids(log) == {torch.load(out / "checkpoints" / "last.pt", weights_only=True)["run_state"]["wandb_id"]}
    assert not [r for r in records(log) if r.WhichOneof("record_type") == "artifact"]  # log_model is off


@pytest.mark.slow
def test_resumed_run_continues_the_same_wandb_run(synth_root, tmp_path, offline):
    out = tmp_path / "run"
    train(synth_root, out, "train.epochs=1", "data.limit=150")
    train(synth_root, out, "train.epochs=2", "data.limit=150")
    logs = _logs(offline)
    assert len(logs) == 2
    assert run_ids(logs[0]) == run_ids(logs[1])
    assert [row["epoch"] for row in history(logs[1]) if "val_auc" in row] == [2]


@pytest.mark.slow
def test_training_survives_wandb_failing_to_start(synth_root, tmp_path, offline, monkeypatch, caplog):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("no network, no login")

    monkeypatch.setattr(wandb, "init", broken_init)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        assert train(synth_root, out, "train.epochs=1", "data.limit=150") == "done"
    assert json.loads((out / "report" / "metrics.json").read_text())["n"] > 0
    assert "W&B logging is off" in caplog.text


@pytest.mark.slow
def test_training_survives_wandb_failing_mid_run(synth_root, tmp_path, offline, monkeypatch):
    import wandb

    def broken_log(self, *args, **kwargs):
        raise ConnectionError("lost the connection")

    monkeypatch.setattr(wandb.Run, "log", broken_log)
    monkeypatch.setattr(wandb.Run, "log_artifact", broken_log)
    out = tmp_path / "run"
    assert train(synth_root, out, "train.epochs=2", "data.limit=150") == "done"
    assert len(pd.read_csv(out / "summary.csv")) == 2
    assert (out / "report" / "metrics.json").is_file()


def test_environment_mode_wins_over_config(monkeypatch):
    from cancernet.config import Config

    cfg = Config()
    cfg.wandb.mode = "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode(cfg) == "disabled"
