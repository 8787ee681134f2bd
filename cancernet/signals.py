"""Stop signals: the main process of each rank owns the stop; its worker processes ignore it.

Slurm's time-limit warning (USR1) and preemption (TERM) reach torchrun, which passes TERM to each
trainer's whole process group, and under Slurm's process tracking every process of the job gets
it directly. DataLoader workers and process pools are in that group: PyTorch's worker handler
exits only on a TERM from the worker's own parent, so without this a stop would kill the workers
and the trainer would crash with "DataLoader worker ... is killed by signal" instead of
checkpointing. Workers still exit when their loader shuts them down (end of iteration, or the
trainer exiting) or when their parent dies (PyTorch's watchdog), and SIGKILL still ends them.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from dataclasses import dataclass

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@dataclass
class StopFlag:
    """Set from a signal handler; the training loop checks it (on all ranks together) at sync points."""

    requested: bool = False


@contextlib.contextmanager
def stop_on_signals(stop: StopFlag):
    """While inside, USR1 and TERM only set the flag; the previous handlers come back on exit."""

    def handler(signum, frame):
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
