"""One process at a time on this host: an exclusive advisory lock on a file (``flock``), waited for.

The kernel drops the lock when its holder closes the file or dies (``kill -9`` included), so a crashed
holder never leaves a stale lock behind. Used per install root (install.py) and per registry repository
for publishers (release_lock.py)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from trtbuild.core.errors import TrtbuildError


@contextlib.contextmanager
def exclusive(path: Path, problem: str, fix: str) -> Iterator[None]:
    """Holds the lock on ``path`` (its folder created if missing) for the ``with`` block; waits while
    another process holds it. An unusable path is a TrtbuildError: ``problem`` and the OS reason, ``fix``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise TrtbuildError(f"{problem}: {exc.strerror}", fix) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
