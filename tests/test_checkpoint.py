import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from cancernet.engine import checkpoint
from cancernet.runtime.atomic import write_text
from cancernet.runtime.distributed import DistInfo
from cancernet.runtime.errors import CheckpointError, UserError
from cancernet.train import loop as engine

from conftest import RESUME_COMMON as COMMON
from conftest import ROOT, assert_same_run, python_env, train, train_stopping


@pytest.mark.slow
def test_checkpoint_loads_weights_only_with_clean_keys(uninterrupted):
    ckpt_dir = uninterrupted / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.pt", "last.pt"]  # no temp files left
    state = torch.load(ckpt_dir / "last.pt", weights_only=True)
    assert {
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "epoch",
        "run_state",
        "rng",
        "config",
        "ema",
    } <= set(state)
    assert {"best_auc", "wandb_id", "position", "mid_epoch", "history", "budget_plan"} <= set(state["run_state"])
    assert state["epoch"] == 4 and state["config"]["model"]["arch"] == "resnet18"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"epoch": 1})

    def broken(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*last.pt: No space left on device"):
        checkpoint.save(path, {"epoch": 2})
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_run_files_get_the_permissions_open_would_give(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "summary.csv", "epoch\n1\n")
        checkpoint.save(tmp_path / "last.pt", {"epoch": 1})
    finally:
        os.umask(old)
    for name in ("summary.csv", "last.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name  # teammates can read results


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=f"{path}.*corrupt"):
        checkpoint.Checkpoint.load(path)


def test_each_background_checkpoint_holds_the_state_at_its_own_epoch(tmp_path):
    """The writer copies into the previous checkpoint's buffers (no allocation after the first);
    a later epoch's training must never show through in an earlier file, nor the reverse."""
    model = torch.nn.Linear(4, 2)
    writer = checkpoint.CheckpointWriter()
    files, buffers = [], []
    for epoch in range(3):
        with torch.no_grad():
            model.weight.fill_(epoch)
        state = {"model": model.state_dict(), "ema": model.state_dict(), "epoch": epoch}
        path = tmp_path / f"epoch{epoch}.pt"
        copies = writer.copy({path: state})
        buffers.append(copies[path]["model"]["weight"].data_ptr())
        assert copies[path]["ema"]["weight"] is copies[path]["model"]["weight"]  # copied once
        with torch.no_grad():
            model.weight.fill_(-1)  # training goes on while the file is written
        writer.start(copies)
        files.append(path)
    writer.wait()
    assert buffers[1] == buffers[0] and buffers[2] == buffers[0]
    for epoch, path in enumerate(files):
        saved = torch.load(path, weights_only=True)
        assert saved["epoch"] == epoch and torch.all(saved["model"]["weight"] == epoch)


def test_each_rank_restores_only_its_own_rng_state():
    torch.manual_seed(1)
    saved = [checkpoint.rng_state(torch.device("cpu"))]
    expected = torch.rand(3)
    assert checkpoint.set_rng_state(saved, DistInfo(rank=0, world_size=2))
    assert torch.equal(torch.rand(3), expected)
    # a rank the checkpoint has no state for (the world grew) is told so, instead of crashing
    assert not checkpoint.set_rng_state(saved, DistInfo(rank=1, world_size=2))


@pytest.fixture(scope="module")
def uninterrupted(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train(synth_root, out, *COMMON)
    return out


@pytest.mark.slow
def test_stop_after_two_epochs_then_resume_matches_uninterrupted(synth_root, tmp_path, uninterrupted):
    out = tmp_path / "resumed"
    assert train_stopping(synth_root, out, after_epochs=2) == "stopped"
    assert len(pd.read_csv(out / "summary.csv")) == 2
    assert train(synth_root, out, *COMMON) == "done"
    assert_same_run(uninterrupted, out)


@pytest.mark.slow
def test_checkpoint_every_skips_last_pt_between_saves_but_a_stop_and_the_end_still_save(
    synth_root, tmp_path, uninterrupted
):
    from cancernet.runtime.signals import StopFlag
    from cancernet.train.runner import run

    from conftest import make_cfg, session

    out, seen = tmp_path / "resumed", []
    every = (*COMMON, "train.checkpoint_every=1h")
    stop = StopFlag()

    def look(training, row):  # after each epoch's save: what a preemption now would resume from
        training.checkpointer.wait()
        last = training.run.last
        seen.append(torch.load(last, weights_only=True)["epoch"] if last.is_file() else None)
        stop.requested = row["epoch"] == 2

    with session("cpu") as dist:
        assert run(make_cfg(synth_root, out, *every), dist, stop, look) == "stopped"
    assert seen == [None, None]  # an hour had not passed: no last.pt written after epochs 1 and 2
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2  # the stop saved
    seen.clear()
    with session("cpu") as dist:
        assert run(make_cfg(synth_root, out, *every), dist, None, look) == "done"
    assert seen == [2, 4]  # epoch 3 not saved; the final epoch always is
    assert_same_run(uninterrupted, out)


@pytest.mark.slow
def test_mid_epoch_stop_resumes_exactly(synth_root, tmp_path, uninterrupted):
    out = tmp_path / "resumed"
    # 168 training images / 32 = 5 micro-batches, 3 windows (sync points) and 1 epoch-end check per
    # epoch: the 9th look at the stop request is the first sync point of epoch 3, one window (2
    # micro-batches) into it
    assert train_stopping(synth_root, out, after_syncs=9) == "stopped"
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert saved["epoch"] == 2 and saved["run_state"]["mid_epoch"]["samples"] == 64
    assert len(pd.read_csv(out / "summary.csv")) == 2  # the unfinished epoch is not in the summary
    # as an older cancernet wrote it, the run state at the top level: it still resumes exactly
    older = {k: v for k, v in saved.items() if k != "run_state"} | saved["run_state"]
    checkpoint.save(out / "checkpoints" / "last.pt", older)
    assert train(synth_root, out, *COMMON) == "done"
    assert_same_run(uninterrupted, out)


@pytest.mark.slow
def test_best_pt_holds_the_best_epoch_and_only_what_inference_needs(uninterrupted):
    summary = pd.read_csv(uninterrupted / "summary.csv")
    # best by val AUC, ties to the lower val loss
    best_epoch = max(summary.itertuples(), key=lambda r: (r.val_auc, -r.val_loss)).epoch
    best = torch.load(uninterrupted / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == best_epoch and best["weights"] == "ema"
    assert not {"optimizer", "rng", "history"} & set(best)
    last_size = (uninterrupted / "checkpoints" / "last.pt").stat().st_size
    assert (uninterrupted / "checkpoints" / "best.pt").stat().st_size < 0.5 * last_size


@pytest.mark.slow
def test_every_epoch_trains_the_images_in_a_new_order(synth_root, tmp_path, monkeypatch):
    from cancernet.data.augment import Augment

    seen = []
    real = Augment.forward

    def spy(self, images, index, epoch):
        seen.append(index.tolist())  # the training images, in the order the loop trains them
        return real(self, images, index, epoch)

    monkeypatch.setattr(Augment, "forward", spy)
    train(synth_root, tmp_path / "run", "data.limit=120", "train.epochs=2", "train.batch_size=16")
    per_epoch = len(seen) // 2
    first, second = sum(seen[:per_epoch], []), sum(seen[per_epoch:], [])
    assert sorted(first) != first and first != second  # shuffled, and reshuffled for epoch 2
    assert len(set(first)) == len(first)


@pytest.mark.parametrize(
    "scripted, best",
    [
        ([(0.9, 0.5), (0.8, 0.4)], 1),  # a worse AUC later: best.pt keeps epoch 1
        ([(1.0, 0.3), (1.0, 0.5)], 1),  # tied AUC: the lower validation loss wins
        ([(0.9, 0.5), (0.9, 0.4)], 2),
    ],
)
@pytest.mark.slow
def test_best_pt_is_the_best_validated_epoch_not_the_last(synth_root, tmp_path, monkeypatch, scripted, best):
    from cancernet.train import runner

    real, rows = runner.epoch_row, iter(scripted)

    def scripted_row(*args, **kwargs):
        row = real(*args, **kwargs)
        row.val_auc, row.val_loss = next(rows)
        return row

    monkeypatch.setattr(runner, "epoch_row", scripted_row)
    out = tmp_path / "run"
    train(synth_root, out, "data.limit=100", "train.epochs=2")
    assert torch.load(out / "checkpoints" / "best.pt", weights_only=True)["epoch"] == best


@pytest.mark.slow
def test_extending_a_finished_run_follows_the_new_schedule(synth_root, tmp_path, caplog):
    out = tmp_path / "run"
    base = ("data.limit=240", "train.seed=3")
    train(synth_root, out, *base, "train.epochs=2")
    with caplog.at_level(logging.INFO):
        train(synth_root, out, *base, "train.epochs=4")
    summary = pd.read_csv(out / "summary.csv")
    assert summary["epoch"].tolist() == [1, 2, 3, 4]
    assert (summary["lr"].iloc[2:] > 1e-5).all()  # the old schedule had reached 0 here
    assert summary["train_loss"].iloc[2] < summary["train_loss"].iloc[0]  # from the trained weights, not anew
    assert "train.epochs: 2 -> 4" in caplog.text
    assert f"report: open {out / 'report' / 'index.html'}" in caplog.text  # the run's last line names it
    # finished, then asked for another learning rate: it would train nothing and record an lr its
    # weights never saw; refused, its record kept
    config, metrics = (out / "config.yaml").read_text(), (out / "report" / "metrics.json").read_text()
    with pytest.raises(
        CheckpointError, match=r"finished training \(4 epochs\).*optim.lr: .*-> 0.05.*raise train.epochs"
    ):
        train(synth_root, out, *base, "train.epochs=4", "optim.lr=0.05")
    assert (out / "config.yaml").read_text() == config and (out / "report" / "metrics.json").read_text() == metrics
    train(synth_root, out, *base, "train.epochs=4", "train.progress=off")  # how it runs, not what it learns: fine


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.freeze_backbone=true", "model.freeze_backbone"),
        ("optim.name=sgd", "optim.name"),
        ("model.arch=resnet34", "model.arch"),
    ],
)
@pytest.mark.slow
def test_resume_that_would_change_the_model_or_optimizer_is_refused_before_training(
    synth_root, tmp_path, uninterrupted, override, key
):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    before = (out / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match=f"{key}=.*cannot resume"):
        train(synth_root, out, *COMMON, "train.epochs=5", override)
    assert (out / "checkpoints" / "last.pt").read_bytes() == before
    assert len(pd.read_csv(out / "summary.csv")) == 4


@pytest.mark.slow
def test_a_fresh_run_never_mixes_with_an_existing_one(synth_root, tmp_path, uninterrupted):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    with pytest.raises(UserError, match="already holds a run.*train.resume=auto.*train.overwrite=true"):
        train(synth_root, out, "data.limit=120", "train.resume=none", "train.epochs=1")
    assert len(pd.read_csv(out / "summary.csv")) == 4  # untouched
    train(synth_root, out, "data.limit=120", "train.resume=none", "train.overwrite=true", "train.epochs=1")
    assert len(pd.read_csv(out / "summary.csv")) == 1
    assert len(pd.read_csv(out / "splits.csv")) == 120  # the new run's splits, not the old ones


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(synth_root, tmp_path):
    out = tmp_path / "run"
    train(synth_root, out, "data.limit=150", "train.epochs=1")
    before = (out / "checkpoints" / "last.pt").read_bytes()
    # extended with a learning rate that blows the weights up: the loss is inf/NaN within a few steps
    with pytest.raises(engine.NonFiniteLossError, match="epoch 2"):
        train(synth_root, out, "data.limit=150", "train.epochs=2", "optim.lr=1e35", "train.sync_every=1")
    assert (out / "checkpoints" / "last.pt").read_bytes() == before
    assert len(pd.read_csv(out / "summary.csv")) == 1


SLOW_SAVE = """
import sys, time, torch
from cancernet.engine import checkpoint
real = torch.save
calls = {"n": 0}
def slow(obj, f):
    calls["n"] += 1
    if calls["n"] >= 3:  # epoch 2's last.pt: write half of it, then hang (the kill comes now)
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        time.sleep(600)
    real(obj, f)
checkpoint.torch.save = slow
sys.argv = ["train_ddp.py", *sys.argv[1:]]
import runpy
runpy.run_path("train_ddp.py", run_name="__main__")
"""


@pytest.mark.slow
def test_a_kill_during_a_background_checkpoint_write_leaves_a_loadable_last_pt(synth_root, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "slow_save.py").write_text(SLOW_SAVE)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(tmp_path / "slow_save.py"),
            "--config",
            "configs/cpu_test.yaml",
            f"data.root={synth_root}",
            "data.limit=120",
            "train.epochs=3",
            f"train.out_dir={out}",
        ],
        cwd=ROOT,
        env=python_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not any(p.read_bytes() == b"half a checkpoint" for p in (out / "checkpoints").glob(".last.*.tmp.pt")):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = checkpoint.Checkpoint.load(out / "checkpoints" / "last.pt").state
    assert state["epoch"] == 1  # the previous, complete checkpoint
