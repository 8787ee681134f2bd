"""Stop signals: the main process of each rank owns the stop; its worker processes ignore it.

Slurm's time-limit warning (USR1) and preemption (TERM) reach torchrun, which passes TERM to each
trainer's whole process group, and under Slurm's process tracking every process of the job gets
it directly. DataLoader workers and process pools are in that group: PyTorch's worker handler
exits only on a TERM from the worker's own parent, so without this a stop would kill the workers
and the trainer would crash with "DataLoader worker ... is killed by signal" instead of
checkpointing. Workers exit when their loader shuts them down (end of iteration, or the loader
collected); those still alive when the rank exits (after an error, whose traceback holds the
loader) are killed then: multiprocessing's own exit handler would TERM them, which they ignore,
and wait for them forever (the rank would never exit, so torchrun would never see it fail).

Loader workers are forked from a fork server, not from the rank: a rank has threads (gloo's or
NCCL's, the checkpoint writer, a pin-memory thread), and a fork taken while one of them holds a
lock of the interpreter's leaves the child waiting on that lock forever. Seen here: a validation
loader's worker stuck in PyOS_AfterFork_Child, a gloo thread having been creating its Python
thread state at the fork, and both ranks hung in the epoch's gather. The server is a fresh,
single-threaded interpreter (started by fork + exec) that has imported torch and the datasets
once, so a worker starts in about 0.1 s; it ignores the stop signals too, since a worker exits
when its parent, the server, goes.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)
# Slurm's time-limit warning, preemption, and Ctrl-C (a terminal sends SIGINT to the whole
# foreground process group: torchrun, the ranks and their loader workers)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


@dataclass
class StopFlag:
    """Set from a signal handler; the training loop checks it (on all ranks together) at sync points."""

    requested: bool = False
    interrupted: bool = False  # Ctrl-C came once: a second one quits at once


@contextlib.contextmanager
def stop_on_signals(stop: StopFlag):
    """While inside, USR1, TERM and a first Ctrl-C only set the flag (the run stops at its next sync
    point with a checkpoint, inside the epoch); a second Ctrl-C raises KeyboardInterrupt, which the
    command ends on with one line. The previous handlers come back on exit."""

    def handler(signum, frame):
        if signum == signal.SIGINT:
            if stop.interrupted:
                raise KeyboardInterrupt
            stop.interrupted = True
            log.warning("Ctrl-C: stopping at the next sync point with a checkpoint; Ctrl-C again quits at once")
        else:
            log.warning("received signal %d: stopping at the next sync point", signum)
        stop.requested = True

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def ignore_stop_signals(*_) -> None:
    """worker_init_fn of every DataLoader and initializer of every process pool a rank starts."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def auto_workers() -> int:
    """Loader processes per rank when the config does not say: the cores this process may use,
    shared by the ranks of its node (torchrun's LOCAL_WORLD_SIZE), less one for the rank itself; at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(0, min(8, cores // max(ranks, 1) - 1))


def loader_workers(num_workers: int) -> dict:
    """DataLoader arguments for num_workers worker processes that ignore the stop signals and start
    from the fork server (none: the loader reads in the rank's own process). As with spawn, a
    worker runs the main script's top level again: a script that builds loaders needs the
    `if __name__ == "__main__":` guard (train_ddp.py and `python -m cancernet` have it)."""
    if num_workers <= 0:
        return {"num_workers": 0}
    return {"num_workers": num_workers, "worker_init_fn": ignore_stop_signals, "multiprocessing_context": fork_server()}


def forks_this_process(num_workers: int) -> bool:
    """Whether starting num_workers loader workers forks the calling (threaded) process itself:
    only where the platform has no fork server."""
    return num_workers > 0 and fork_server() is None


@functools.cache
def fork_server():
    """The forkserver start method, preloaded with cancernet.runtime._forkserver (the platform's default
    where there is no fork server)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    # A worker starts by running the main script's top level again (the rule of spawn and
    # forkserver; train_ddp.py's `if __name__` guard keeps it from training). The server imports
    # the cancernet modules this process has, and so their dependencies, once: that re-run then
    # finds them imported and takes milliseconds, not the seconds of importing torchvision & co.
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "cancernet" and not m.endswith("__main__"))
    context.set_forkserver_preload(["cancernet.runtime._forkserver", *loaded])
    # Started now, with the stop signals blocked: the server inherits the mask through fork and
    # exec, so a TERM sent to the job's process group while it starts (a preemption right after a
    # requeued run resumes) cannot end it before it ignores them; the rank gets the signal as soon
    # as the server is up (it stays pending meanwhile).
    # (The resource tracker first: starting it unblocks SIGTERM.)
    multiprocessing.resource_tracker.ensure_running()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    atexit.register(_kill_workers)  # runs before multiprocessing's handler (registered earlier)
    return context


def _kill_workers() -> None:
    for child in multiprocessing.active_children():
        child.kill()
