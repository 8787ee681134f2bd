"""Imported by the fork server that loader workers start from (signals.fork_server), and only
there (with the cancernet modules the rank had imported, so every worker finds its dataset's
code imported once): the stop signals are ignored, because a TERM sent to the job's process
group must not end the server (its workers would exit with it)."""

import signal

from cancernet.runtime.signals import STOP_SIGNALS

# First of all: the server starts with the stop signals blocked (signals.fork_server); ignored
# from here on, they need no blocking.
for _signal in STOP_SIGNALS:
    signal.signal(_signal, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

import torch  # noqa: E402, F401
