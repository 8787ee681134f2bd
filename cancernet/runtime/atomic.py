"""Write files and folders so that a reader never sees a half-written one (a temporary name,
then os.replace)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is fsynced and renamed over `path`.

    The temp file is created like open() would (mode 0666 minus the umask), so teammates on a
    shared cluster can read results; mkstemp would make every file 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")  # keeps the suffix (torch.export)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def partial_dir(target: str | Path) -> Path:
    """A fresh, empty <target>.partial folder beside target (an earlier attempt's leftovers
    removed), to be renamed over target by publish() once whole."""
    target = Path(target)
    partial = target.with_name(f"{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def publish(partial: str | Path, target: str | Path) -> None:
    """Replace target by the whole folder partial (from partial_dir)."""
    if Path(target).exists():
        shutil.rmtree(target)
    os.replace(partial, target)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh folder; when the block ends without an error it replaces target, else it is
    removed: target is whole, or as it was."""
    partial = partial_dir(target)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    publish(partial, target)
