"""The layout of a study folder and how to look inside it, apart from the running of studies.

models/train.py and test.py read study folders (a study given as ``--teacher`` or as runs to
ensemble) through this module, while :mod:`experiments.study` trains members by calling
models/train.py; keeping the lookups here, with no import of models/train.py, is what spares
the two a circular import.

Public API:
    StudyError, read_json, read_record, member_dir, member_state, member_runs, is_study,
    expand_runs, STUDY_JSON, SUMMARY_JSON, MEMBERS_DIR.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.engine.run_dir import RESUME_FILE
from training.evaluation.report import REPORT_JSON

STUDY_JSON = "study.json"
SUMMARY_JSON = "summary.json"
MEMBERS_DIR = "members"


class StudyError(Exception):
    """A study cannot start or go on; the message is one line for the user."""


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or a one-line :class:`StudyError` naming the file."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise StudyError(f"{path}: cannot be read as JSON ({error})") from None


def read_record(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (a ``study.json``), or a one-line :class:`StudyError`."""
    record = read_json(path)
    if not isinstance(record, dict):
        raise StudyError(f"{path}: is not a JSON object (holds a {type(record).__name__})")
    return record


def member_dir(study_dir: str | Path, name: str) -> Path:
    """The run folder of member ``name``."""
    return Path(study_dir) / MEMBERS_DIR / name


def member_state(run_dir: Path) -> str:
    """``"finished"`` (tested), ``"in progress"`` (has ``last.pt``: resume it), ``"stuck"`` (a
    run started there but saved no epoch: nothing to resume, and starting again would delete
    it) or ``"new"``."""
    if (run_dir / REPORT_JSON).is_file():
        return "finished"
    if (run_dir / RESUME_FILE).is_file():
        return "in progress"
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return "stuck"
    return "new"


def member_runs(study_dir: str | Path) -> list[Path]:
    """The run folders of the study's finished members (tested), in the study's order."""
    study_dir = Path(study_dir)
    names = read_record(study_dir / STUDY_JSON).get("members") or []
    runs = (member_dir(study_dir, name) for name in names)
    return [run for run in runs if member_state(run) == "finished"]


def is_study(path: str | Path) -> bool:
    """Whether ``path`` is a study folder (it holds ``study.json``)."""
    return (Path(path) / STUDY_JSON).is_file()


def expand_runs(paths: Sequence[str | Path]) -> list[Path]:
    """The run folders ``paths`` stand for: a study folder becomes its finished members, in the
    study's order (:func:`member_runs`); any other path is taken as a run folder.

    Raises:
        StudyError: a study folder without a finished member, or whose ``study.json`` is not a
            JSON object.
    """
    runs: list[Path] = []
    for path in map(Path, paths):
        if not is_study(path):
            runs.append(path)
            continue
        finished = member_runs(path)
        if not finished:
            raise StudyError(
                f"study {path} has no finished member yet (none has a {REPORT_JSON}); "
                "run its command again to train them"
            )
        runs.extend(finished)
    return runs
