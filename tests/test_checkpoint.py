import pandas as pd
import pytest
import torch

from cancernet import checkpoint, engine
from cancernet.errors import UserError
from conftest import train


def test_checkpoint_loads_weights_only_with_clean_keys(synth_root, tmp_path):
    train(synth_root, tmp_path / "run", "train.epochs=1", "data.limit=150")
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.pt", "last.pt"]  # no temp files left
    state = torch.load(ckpt_dir / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "best_auc", "rng", "config",
            "wandb_id"} <= set(state)
    assert state["epoch"] == 1 and state["config"]["model"]["arch"] == "resnet18"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"epoch": 1})
    def broken(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        checkpoint.save(path, {"epoch": 2})
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=f"{path}.*corrupt"):
        checkpoint.load(path)


def test_resume_with_another_arch_names_both(synth_root, tmp_path):
    train(synth_root, tmp_path / "run", "train.epochs=1", "data.limit=150")
    with pytest.raises(UserError, match="holds resnet18"):
        train(synth_root, tmp_path / "run", "train.epochs=2", "data.limit=150", "model.arch=resnet34")


def _train_stopping(root, out, monkeypatch, after_epochs=None, after_steps=None, *overrides):
    """Run training that gets a stop request after some epochs or training steps."""
    from cancernet import runner
    from conftest import make_cfg, session
    stop = engine.StopFlag()
    if after_epochs is not None:
        write = runner.write_summary
        def write_then_stop(out_dir, history):
            write(out_dir, history)
            stop.requested = stop.requested or len(history) >= after_epochs
        monkeypatch.setattr(runner, "write_summary", write_then_stop)
    if after_steps is not None:
        loss = engine.F.cross_entropy
        steps = {"n": 0}
        def counting(*args, **kwargs):
            if kwargs.get("reduction") != "none":  # a training step, not evaluation
                steps["n"] += 1
                stop.requested = stop.requested or steps["n"] >= after_steps
            return loss(*args, **kwargs)
        monkeypatch.setattr(engine.F, "cross_entropy", counting)
    with session("cpu") as dist:
        status = runner.run(make_cfg(root, out, *overrides), dist, stop=stop)
    monkeypatch.undo()
    return status


COMMON = ("data.limit=240", "train.seed=3", "train.epochs=4", "train.sync_every=1")


@pytest.fixture(scope="module")
def uninterrupted(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train(synth_root, out, *COMMON)
    return out


def _assert_same_run(a, b):
    sa, sb = pd.read_csv(a / "summary.csv"), pd.read_csv(b / "summary.csv")
    assert sa["epoch"].tolist() == sb["epoch"].tolist() == [1, 2, 3, 4]
    for col in ("train_loss", "train_acc", "val_loss", "val_auc", "lr"):
        assert sa[col].to_numpy() == pytest.approx(sb[col].to_numpy(), abs=1e-4), col
    wa = torch.load(a / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(b / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5) for k in wa)


def test_stop_after_two_epochs_then_resume_matches_uninterrupted(synth_root, tmp_path, uninterrupted, monkeypatch):
    out = tmp_path / "resumed"
    assert _train_stopping(synth_root, out, monkeypatch, 2, None, *COMMON) == "stopped"
    assert len(pd.read_csv(out / "summary.csv")) == 2
    assert train(synth_root, out, *COMMON) == "done"
    _assert_same_run(uninterrupted, out)


def test_mid_epoch_stop_resumes_exactly(synth_root, tmp_path, uninterrupted, monkeypatch):
    out = tmp_path / "resumed"
    # 168 training images / 32 = 5 steps per epoch: stop 2 steps into the third epoch
    assert _train_stopping(synth_root, out, monkeypatch, None, 12, *COMMON) == "stopped"
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert saved["epoch"] == 2 and saved["mid_epoch"]["step"] == 2
    assert len(pd.read_csv(out / "summary.csv")) == 2  # the unfinished epoch is not in the summary
    assert train(synth_root, out, *COMMON) == "done"
    _assert_same_run(uninterrupted, out)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(synth_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(synth_root, out, "data.limit=150", "train.epochs=1")
    before = (out / "checkpoints" / "last.pt").read_bytes()
    loss = engine.F.cross_entropy
    monkeypatch.setattr(engine.F, "cross_entropy", lambda *a, **k: loss(*a, **k) * float("nan"))
    with pytest.raises(engine.NonFiniteLossError, match="epoch 2"):
        train(synth_root, out, "data.limit=150", "train.epochs=2")
    assert (out / "checkpoints" / "last.pt").read_bytes() == before
    assert len(pd.read_csv(out / "summary.csv")) == 1
