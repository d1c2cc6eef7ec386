"""Temporary files for atomic writes that end up with the mode of a plain ``open()``.

``tempfile.mkstemp`` creates its file with mode 0600 whatever the umask, so a file written
through it and renamed into place is readable by its owner only. The run's files (checkpoints,
``config.yaml``, ``metrics.jsonl``) are meant to be shared like any other output, so the temp
file here is created with 0666 and the umask applied, exactly as ``open(path, "w")`` would
(0644 under the usual umask 022).

Public API:
    TEMP_SUFFIX, create_temp_beside, write_atomically.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

#: every temp file made here ends so; a run removes its leftovers by this suffix.
TEMP_SUFFIX = ".tmp"


_ATTEMPTS = 100


def create_temp_beside(path: str | Path) -> tuple[int, str]:
    """Create a new, empty temp file next to ``path``, named ``.<name>.<random>.tmp``.

    Returns:
        ``(fd, name)`` as ``tempfile.mkstemp`` does: an open write-only descriptor and the path.

    Raises:
        FileExistsError: when no free name was found (practically never).
        OSError: when the folder cannot be written.
    """
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(_ATTEMPTS):
        name = str(path.parent / f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            # O_EXCL: never opens a file that already exists, as mkstemp guarantees too.
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a new temp file beside ``path``, then rename it onto ``path``.

    For writers that take a file name (``savefig``, ``json.dump`` into an ``open``); the file
    gets the umask's mode, and the temp file never outlives a failure.
    """
    fd, tmp = create_temp_beside(path)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
