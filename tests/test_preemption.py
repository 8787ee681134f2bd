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


def torchrun(root, out, log, *overrides) -> subprocess.Popen:
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
        env=python_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
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
    first = saved["mid_epoch"]["samples"]
    assert saved["epoch"] == 1 and 0 < first < 34 * 8 and first % (10 * 8) == 0  # at a sync point
    assert len(pd.read_csv(out / "summary.csv")) == 1

    log_path = tmp_path / "second.log"
    with open(log_path, "w") as log:  # resumed inside epoch 2, and stopped again inside it
        code = stop(torchrun(packed_root, out, log), log_path, after="resumed from")
    assert_stopped_cleanly(log_path.read_text(), code)
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    second = saved["mid_epoch"]["samples"]
    assert saved["epoch"] == 1 and first < second < 34 * 8, (first, second)  # from the epoch's start

    with open(tmp_path / "resume.log", "w") as log:
        assert torchrun(packed_root, out, log).wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert "resumed from" in (tmp_path / "resume.log").read_text()
    assert_same_run(uninterrupted, out, epochs=[1, 2])
