"""Loader workers are not forked from the rank. A rank has threads (gloo's or NCCL's, the
checkpoint writer, a pin-memory thread); a fork taken while one of them holds an interpreter lock
leaves the worker waiting on it forever, and every rank hangs in the next collective (seen in a
torchrun run: a validation worker stuck in PyOS_AfterFork_Child). Workers start from a fork
server: one thread, started by fork + exec, that ignores the stop signals as they do."""

import os
import signal
import threading
from pathlib import Path

import pandas as pd
import torch

from cancernet.engine.loaders import make_loader
from cancernet.runtime.distributed import DistInfo

from conftest import make_cfg


def status(pid: int) -> dict:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def test_evaluation_workers_start_from_a_single_threaded_server_that_ignores_stops(synth_root, tmp_path):
    cfg = make_cfg(synth_root, tmp_path, "data.num_workers=2", "train.eval_batch_size=8")
    part = pd.read_csv(synth_root / "train_labels.csv").head(64)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    busy = threading.Event()
    thread = threading.Thread(target=busy.wait, daemon=True)  # the rank has other threads, as a real one does
    thread.start()
    try:
        loader = make_loader(cfg, dist, part, train=False).loader
        batches = iter(loader)
        seen = len(next(batches)[1])
        parents = {int(status(w.pid)["PPid"]) for w in batches._workers}
        assert os.getpid() not in parents  # not forked from this (threaded) process
        (server,) = parents
        assert status(server)["Threads"] == "1"
        assert status(server)["SigIgn"] != "0000000000000000"
        os.kill(server, signal.SIGTERM)  # as torchrun's TERM to the process group reaches it
        seen += sum(len(labels) for _, labels, *_ in batches)
        assert seen == 64  # the workers read on: their parent is still there
        assert int(status(server)["Pid"]) == server
    finally:
        busy.set()


def test_validation_starts_its_workers_once_and_runs_while_the_checkpoint_is_written(synth_root, tmp_path, monkeypatch):
    """An epoch pays neither a new set of validation workers nor the previous checkpoint's write
    (350 MB for ResNet34 with Adam and EMA): the write goes on in the background while the model,
    its tensors already copied, validates."""
    from cancernet.engine import checkpoint
    from cancernet.engine.rundir import RunDir
    from cancernet.train.loop import EpochStats, EpochTotals
    from cancernet.train.runner import validate_epoch
    from cancernet.train.state import build

    cfg = make_cfg(synth_root, tmp_path, "data.num_workers=1", "train.eval_batch_size=16")
    training = build(cfg, DistInfo(), RunDir(tmp_path))
    writer = training.checkpointer.writer
    release = threading.Event()
    save = checkpoint.save

    def slow_save(path, state):  # a write that lasts until the test lets it end (or 30 s)
        release.wait(30)
        save(path, state)

    monkeypatch.setattr(checkpoint, "save", slow_save)
    workers = []
    for epoch in range(2):
        release.clear()
        training.checkpointer.save(training, last=True, best=False)
        row = validate_epoch(training, epoch, EpochStats(EpochTotals(), 1, 1.0, 0.0, 0))
        assert writer._thread.is_alive(), "validation waited for the checkpoint's write"
        assert row.val_loss == row.val_loss  # it did validate
        workers.append([w.pid for w in training.task.loaders["val"].loader._iterator._workers])
        release.set()
        writer.wait()
    assert workers[0] == workers[1]  # the same processes, not a new start per epoch
    assert "model" in torch.load(training.run.last, weights_only=False)  # the background write is whole


STARTS_AND_IS_SIGNALLED = """
import os, signal, sys, time
import torch
from cancernet.runtime.signals import fork_server
context = fork_server()
import multiprocessing.forkserver as forkserver
server = forkserver._forkserver._forkserver_pid
os.kill(server, signal.SIGTERM)  # the job's process group signalled while the server starts up
os.kill(server, signal.SIGUSR1)
loader = torch.utils.data.DataLoader(list(range(8)), batch_size=4, num_workers=1, multiprocessing_context=context)
print(sum(int(b.sum()) for b in loader), server)
"""


def test_a_stop_signal_while_the_fork_server_starts_does_not_end_it(tmp_path):
    """A preemption that comes just as a (requeued) run starts its first loader: the server must
    not die before it ignores the stop signals, or the rank's first worker start fails with
    EOFError (seen in the resume-then-stop-again test)."""
    import subprocess
    import sys

    from conftest import python_env

    for _ in range(3):
        proc = subprocess.run(
            [sys.executable, "-c", STARTS_AND_IS_SIGNALLED],
            cwd=tmp_path,
            env=python_env(),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split()[0] == "28"  # 0 + 1 + ... + 7, read by a worker the server started
