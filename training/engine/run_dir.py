"""The run folder: one run per folder, writable, and free of temp files a killed run left.

Public API:
    RUN_MARKERS, RESUME_FILE, prepare_run_dir, remove_temp_leftovers.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from training.config.schema import ConfigError
from training.engine.atomic import TEMP_SUFFIX

#: entries that only a training run writes; ``--overwrite`` clears a folder holding one of
#: them, and refuses any other folder, so a mistyped path never deletes unrelated files.
RUN_MARKERS: tuple[str, ...] = ("config.yaml", "checkpoints", "metrics.jsonl")

#: the checkpoint ``--resume`` continues from, relative to the run folder; a run writes it at
#: the end of each epoch, so a run stopped earlier leaves its other files but not this one.
RESUME_FILE = Path("checkpoints", "last.pt")


_LISTED = 4


def _listing(entries: list[Path]) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in entries)
    more = f", ... ({len(names)} in all)" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def _clear(run_dir: Path, entries: list[Path]) -> None:
    if not any((run_dir / marker).exists() for marker in RUN_MARKERS):
        raise ConfigError(
            f"--overwrite clears only a run folder (one holding {' or '.join(RUN_MARKERS)}); "
            f"{run_dir} holds none of them ({_listing(entries)}): pick another --run-dir"
        )
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _not_empty(run_dir: Path, entries: list[Path]) -> str:
    """Why a new run cannot start in ``run_dir``, naming only the ways out that work there."""
    held = f"run folder {run_dir} is not empty ({_listing(entries)})"
    if (run_dir / RESUME_FILE).is_file():
        return (
            f"{held}; continue that run with --resume {run_dir}, "
            "or delete what it holds with --overwrite"
        )
    if any((run_dir / marker).exists() for marker in RUN_MARKERS):
        # --resume would fail for want of a checkpoint. Not taken silently as a fresh start:
        # the folder may belong to a run still in its first epoch, which clearing would break.
        return (
            f"{held}: its run stopped before its first epoch was saved ({RESUME_FILE} missing), "
            "so there is nothing to resume; start again there with --overwrite, which deletes "
            "what it holds, or pick another --run-dir"
        )
    # Neither flag applies: --overwrite clears only run folders, and there is no run to resume.
    return f"{held} and holds no run: pick another --run-dir, or empty this one"


def prepare_run_dir(run_dir: str | Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Make ``run_dir`` ready for a run, or refuse it in one line.

    A new run needs an empty (or missing) folder: the files of an earlier run would mix with
    its own (metrics appended, an old ``swa.pt`` beside a new ``best.pt``). ``overwrite``
    deletes what an earlier run left instead; ``resume`` continues the run that is there.

    Args:
        run_dir: the run folder; created with its parents when missing.
        resume: the folder holds the run being continued; it is kept as it is.
        overwrite: clear a non-empty run folder (see :data:`RUN_MARKERS`) before starting.

    Raises:
        ConfigError: the folder is not empty (and neither flag allows it), is not a run folder
            but ``overwrite`` asks to clear it, or cannot be created or written.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} is a file, not a folder: pick another --run-dir")
    try:
        entries = list(run_dir.iterdir()) if run_dir.is_dir() else []
        if entries and not resume:
            if not overwrite:
                raise ConfigError(_not_empty(run_dir, entries))
            _clear(run_dir, entries)
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"run folder {run_dir} cannot be prepared: {error.strerror or error} "
            f"({error.filename or run_dir})"
        ) from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"run folder {run_dir} is not writable: pick another --run-dir")


def remove_temp_leftovers(run_dir: str | Path) -> list[Path]:
    """Delete the temp files of atomic writes that a killed run left in ``run_dir``.

    They are named ``.<file>.<random>.tmp`` (:func:`training.atomic.create_temp_beside`) and
    sit in the run folder and its ``checkpoints/``; only a training run writes them there, and
    one run folder is trained by one process at a time.

    Returns:
        the files removed.
    """
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for path in folder.glob(f".*{TEMP_SUFFIX}"):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
