"""torchrun --max-restarts: a worker killed with SIGKILL is replaced and the run resumes from last.pt."""

import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import ROOT, python_env

pytestmark = pytest.mark.slow


def test_killed_worker_is_restarted_and_the_run_completes(synth_root, tmp_path):
    out = tmp_path / "run"
    log = open(tmp_path / "torchrun.log", "w")
    torchrun = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "--max-restarts=1",
            "train_ddp.py",
            "--config",
            "configs/cpu_test.yaml",
            f"data.root={synth_root}",
            "data.limit=300",
            "train.epochs=3",
            f"train.out_dir={out}",
        ],
        cwd=ROOT,
        env=python_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 180
    # the checkpoint is written in the background: wait for the file, not just the summary row
    while not (out / "checkpoints" / "last.pt").is_file():
        assert torchrun.poll() is None and time.time() < deadline, (tmp_path / "torchrun.log").read_text()[-3000:]
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(torchrun.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    subprocess.run(["kill", "-9", workers[0]], check=True)
    assert torchrun.wait(timeout=300) == 0, (tmp_path / "torchrun.log").read_text()[-3000:]
    text = (tmp_path / "torchrun.log").read_text()
    assert "exitcode: -9" in text and "resumed from" in text
    assert pd.read_csv(out / "summary.csv")["epoch"].tolist() == [1, 2, 3]
    assert (out / "report" / "metrics.json").is_file()
