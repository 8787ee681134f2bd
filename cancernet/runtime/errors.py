"""Errors a user can fix; the command line prints their one-line message and exits non-zero."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Bad input, config or environment; the message names the file or key and what is wrong."""


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message names the key."""


class DataError(UserError, ValueError):
    """Input data that cannot be used; the message names the file or id."""


class BadImageError(DataError):
    def __init__(self, path: Path | str, reason: str | None = None):
        # one argument: a ready message (how DataLoader re-raises a worker's exception)
        super().__init__(f"bad image {path}: {reason}" if reason is not None else str(path))
        self.path, self.reason = Path(path), reason


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or does not fit this run."""


class NonFiniteLossError(UserError, RuntimeError):
    """Raised on every rank together when any rank saw a NaN/inf loss."""
