"""An exclusive inter-process lock on a file, for cache builds and downloads.

Two runs started on the same dataset at once (a sweep, or a training run beside ``test.py``)
would otherwise both build ``data_npy/<name>/`` or both append to one ``.part`` download. The
lock is :func:`fcntl.flock` on a small lock file beside the target: the operating system drops it
when its holder exits, even on ``SIGKILL``, so a killed run never leaves a stale lock. The lock
file itself stays (removing it would let a third process lock a different inode). Where
``fcntl`` is missing (Windows) the lock does nothing and runs must not build the same cache at
the same time.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["exclusive_lock"]


@contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` body.

    Args:
        path: the lock file.
        what: what the lock guards, for the line printed to stderr while waiting for another
            holder ("building the cache data_npy/bloodmnist_28").
    """
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that is {what} (lock {path})", file=sys.stderr)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
