"""SIGTERM to the launcher in the middle of an epoch, with loader workers, twice (as Slurm's
preemption does: it signals every process, and the batch script or srun forwards it once more),
and again while the ranks stop and checkpoint. torchrun passes it to each trainer's whole process
group, loader workers included, which must read on: with the default train.sync_every a rank takes
up to 10 more steps before it reaches the sync point where every rank stops. last.pt must hold the
position inside the epoch, counted from the epoch's start also when the epoch was resumed and
stopped again, and the twice-resumed run must end equal to an uninterrupted one."""

import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from conftest import ROOT, assert_same_run, python_env

pytestmark = pytest.mark.slow
# 280 training patches, 2 ranks x batch 4: 34 steps per epoch, each a sync point and a log line
COMMON = (
    "data.format=packed",
    "data.num_workers=2",
    "train.batch_size=4",
    "train.epochs=2",
    "train.seed=5",
    # train.sync_every: the default (10); no log lines, which would add sync points
    "data.image_size=32",
    "train.ema_decay=0.9",
)


def torchrun(root, out, log, *overrides, env=None, session=False) -> subprocess.Popen:
    """session: its own process group, as a command started from a terminal (Ctrl-C goes to all of it)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cancernet.cli.launch",
            "--standalone",
            "--nproc_per_node=2",
            "train_ddp.py",
            "--config",
            "configs/cpu_test.yaml",
            f"data.root={root}",
            f"train.out_dir={out}",
            *COMMON,
            *overrides,
        ],
        cwd=ROOT,
        env=env or python_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=session,
    )


@pytest.fixture(scope="module")
def uninterrupted(packed_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    with open(out / "torchrun.log", "w") as log:
        assert torchrun(packed_root, out / "run", log).wait(timeout=300) == 0, (out / "torchrun.log").read_text()[
            -3000:
        ]
    return out / "run"


def stop(proc: subprocess.Popen, log_path, after: str) -> int:
    """TERM twice once `after` is in the log, then twice more while the ranks stop and save."""
    deadline = time.time() + 180
    while after not in log_path.read_text():
        assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun alone would exit now and leave its workers behind
    for _ in range(2):  # later signals, during the stop and the checkpoint, change nothing
        time.sleep(0.3)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=120)


def assert_stopped_cleanly(text: str, code: int) -> None:
    # no loader worker died and no rank raised: both stopped at the same sync point and checkpointed
    assert "killed by signal" not in text and "[rank0]: Traceback" not in text and "[rank1]: Traceback" not in text
    for rank in (0, 1):
        assert f"[rank{rank}] WARNING stopped in epoch 2 after" in text, text[-3000:]
    # the launcher waited for them, then exits 128 + 15 with one line (docs/SLURM.md)
    assert code == 143 and "cancernet.cli.launch: stopped by signal 15" in text, text[-3000:]
    assert text.index("stopped by signal 15") > max(text.index(f"[rank{r}] WARNING stopped in") for r in (0, 1))


def test_term_to_torchrun_mid_epoch_with_loader_workers_stops_cleanly_twice_and_resumes_exactly(
    packed_root, tmp_path, uninterrupted
):
    out = tmp_path / "run"
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = torchrun(packed_root, out, log)
        code = stop(proc, log_path, after="epoch 1/2 train_loss")  # the line that ends epoch 1
    assert_stopped_cleanly(log_path.read_text(), code)
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    first = saved["run_state"]["mid_epoch"]["samples"]
    assert saved["epoch"] == 1 and 0 < first < 34 * 8 and first % (10 * 8) == 0  # at a sync point
    assert len(pd.read_csv(out / "summary.csv")) == 1

    log_path = tmp_path / "second.log"
    with open(log_path, "w") as log:  # resumed inside epoch 2, and stopped again inside it
        code = stop(torchrun(packed_root, out, log), log_path, after="resumed from")
    assert_stopped_cleanly(log_path.read_text(), code)
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    second = saved["run_state"]["mid_epoch"]["samples"]
    assert saved["epoch"] == 1 and first < second < 34 * 8, (first, second)  # from the epoch's start

    with open(tmp_path / "resume.log", "w") as log:
        assert torchrun(packed_root, out, log).wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert "resumed from" in (tmp_path / "resume.log").read_text()
    assert_same_run(uninterrupted, out, epochs=[1, 2])


# Loaded into both ranks through PYTHONPATH: rank 0 cannot write last.pt (a full disk).
DISK_FULL = """
import builtins, errno, os
_import = builtins.__import__
def _patched(name, *args, **kwargs):
    module = _import(name, *args, **kwargs)
    if name == "torch" and hasattr(module, "save") and not hasattr(module.save, "full"):
        real = module.save
        def save(obj, f, *a, **k):
            if os.environ.get("RANK") == "0" and isinstance(f, (str, os.PathLike)) and ".last." in os.fspath(f):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(obj, f, *a, **k)
        save.full = True
        module.save = save
    return module
builtins.__import__ = _patched
"""


def test_a_checkpoint_that_cannot_be_written_ends_the_run_with_one_line_instead_of_hanging(packed_root, tmp_path):
    # Seen in CI on a nearly full disk: rank 0 raised, then waited forever at exit for its loader
    # workers (they ignore TERM), so torchrun never saw it fail and rank 1 sat in a collective.
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(DISK_FULL)
    env = {**python_env(), "PYTHONPATH": str(tmp_path / "inject")}
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = torchrun(packed_root, tmp_path / "run", log, env=env)
        try:
            code = proc.wait(timeout=180)
        finally:
            if proc.poll() is None:  # hung: leave nothing behind
                proc.kill()
                subprocess.run(["pkill", "-9", "-f", str(tmp_path / "run")])
    text = log_path.read_text()
    assert code != 0 and "error: cannot write checkpoint" in text and "No space left on device" in text, text[-3000:]
    assert "epoch 1/2 train_loss" in text and "epoch 2/2" not in text
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()  # no half file under the name


# Loaded into rank 1 through PYTHONPATH: it cannot see last.pt (a node whose view of the shared
# filesystem is seconds old), as if the file had never been written.
STALE_LAST = """
import builtins, os, os.path, pathlib
if os.environ.get("RANK") == "1":
    def hidden(p):
        return str(p).endswith("last.pt")
    for cls, name in ((pathlib.Path, "is_file"), (pathlib.Path, "exists")):
        real = getattr(cls, name)
        setattr(cls, name, lambda self, *a, real=real, **k: False if hidden(self) else real(self, *a, **k))
    for name in ("isfile", "exists"):
        real = getattr(os.path, name)
        setattr(os.path, name, lambda p, real=real: False if hidden(p) else real(p))
    real_open = builtins.open
    def open_(f, *a, **k):
        if hidden(f):
            raise FileNotFoundError(2, "No such file or directory", str(f))
        return real_open(f, *a, **k)
    builtins.open = open_
"""


def test_a_rank_that_cannot_see_last_pt_resumes_with_the_others(packed_root, tmp_path, uninterrupted):
    """Rank 0 alone decides whether and from what to resume, and sends the checkpoint: a rank
    whose filesystem does not show last.pt yet resumes from it all the same, and the run ends
    equal to an uninterrupted one."""
    out = tmp_path / "run"
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        code = stop(torchrun(packed_root, out, log), log_path, after="epoch 1/2 train_loss")
    assert_stopped_cleanly(log_path.read_text(), code)
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(STALE_LAST)
    env = {**python_env(), "PYTHONPATH": str(tmp_path / "inject")}
    with open(tmp_path / "resume.log", "w") as log:
        code = torchrun(packed_root, out, log, env=env).wait(timeout=300)
    text = (tmp_path / "resume.log").read_text()
    assert code == 0 and "resumed from" in text, text[-3000:]
    assert_same_run(uninterrupted, out, epochs=[1, 2])


def test_ctrl_c_mid_epoch_saves_the_epoch_with_one_line_and_the_rerun_continues_there(
    packed_root, tmp_path, uninterrupted
):
    """Ctrl-C in the terminal: SIGINT to the whole process group (the launcher, both ranks, their
    loader workers). Like a preemption, the ranks stop together at the next sync point with last.pt
    inside the epoch: one line each, no traceback, and the same command continues there."""
    import os

    out, log_path = tmp_path / "run", tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = torchrun(packed_root, out, log, session=True)
        deadline = time.time() + 180
        while "epoch 1/2 train_loss" not in log_path.read_text():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=120)
    text = log_path.read_text()
    assert code in (0, 130) and "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    for rank in (0, 1):
        assert f"[rank{rank}] WARNING stopped in epoch 2 after" in text, text[-3000:]
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["run_state"]["mid_epoch"]["samples"] > 0  # inside epoch 2
    with open(tmp_path / "resume.log", "w") as log:
        assert torchrun(packed_root, out, log).wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert "into epoch 2" in (tmp_path / "resume.log").read_text()
    assert_same_run(uninterrupted, out, epochs=[1, 2])
