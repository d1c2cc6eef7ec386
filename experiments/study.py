"""A study: several training runs made by one command, kept in one folder.

Layout of a study folder::

    DIR/study.json          the command that made it: kind, its options, the training options
                            passed through to models/train.py, the member names, created date
    DIR/members/<name>/     one normal run folder per member (test.py and the report read it)
    DIR/summary.json        the kind's figures over the finished members, rewritten after each

Re-running the same command continues the study: finished members (those with
``test_report.json``) are skipped, a member with ``checkpoints/last.pt`` but no report is resumed
with ``--resume``, a new one is trained with ``--run-dir``. A different command on an existing
study is refused in one line. Nothing a member wrote is ever deleted by the study.

Public API:
    StudyError, Study, Member, open_study, check_train_options, member_dir, member_state,
    member_runs, is_study, expand_runs, run_member, run_members, write_summary, read_json,
    FORMAT, STUDY_JSON, SUMMARY_JSON, MEMBERS_DIR (the folder's layout and lookups are defined
    in :mod:`experiments.folder` and re-exported here).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

import models.train as train_script
from dataset.errors import DataError
from experiments.folder import (  # noqa: F401  (re-exported: see the module docstring)
    MEMBERS_DIR,
    STUDY_JSON,
    SUMMARY_JSON,
    StudyError,
    expand_runs,
    is_study,
    member_dir,
    member_runs,
    member_state,
    read_json,
    read_record,
)
from training.config.cli import build_parser
from training.engine.atomic import write_atomically
from training.engine.checkpoint import CheckpointError
from training.engine.run_dir import RESUME_FILE, RUN_MARKERS
from training.evaluation.report import REPORT_JSON, evaluate_run, save_report

#: version of ``study.json``'s layout; a study written by a newer layout is refused.
FORMAT = 1

#: exit code of a run stopped by Ctrl-C (models/train.py returns it too).
INTERRUPTED = 130


@dataclass
class Member:
    """One run of a study: its name (a path under ``members/``) and its fresh-run training
    options (without ``--run-dir``, which the study adds)."""

    name: str
    train_argv: list[str]


@dataclass
class Study:
    """What ``study.json`` holds, plus the folder it lies in."""

    path: Path
    kind: str
    options: dict[str, Any]
    train_argv: list[str]
    members: list[str]
    command: list[str]
    created: str
    format: int = FORMAT

    def record(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "kind": self.kind,
            "options": self.options,
            "train_argv": self.train_argv,
            "members": self.members,
            "command": self.command,
            "created": self.created,
        }


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text))


def _command_text(command: Sequence[str]) -> str:
    return "python -m experiments " + shlex.join(command)


def _differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What differs between two study records, as short phrases (kind, each option, the
    training options); empty when the same command made both."""
    diffs = []
    if stored.get("kind") != wanted["kind"]:
        diffs.append(f"kind {stored.get('kind')!r} vs {wanted['kind']!r}")
    old, new = stored.get("options") or {}, wanted["options"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            diffs.append(f"{key} {old.get(key)!r} vs {new.get(key)!r}")
    if stored.get("train_argv") != wanted["train_argv"]:
        diffs.append(
            f"training options {shlex.join(stored.get('train_argv') or [])!r} "
            f"vs {shlex.join(wanted['train_argv'])!r}"
        )
    return diffs


def open_study(
    path: str | Path,
    *,
    kind: str,
    options: dict[str, Any],
    train_argv: Sequence[str],
    members: Sequence[str],
    command: Sequence[str],
) -> Study:
    """Create the study in ``path``, or reopen the one there when the same command made it.

    ``options`` must be JSON-plain (it is compared with the stored copy after a round trip).

    Raises:
        StudyError: ``path`` is a file, a non-empty folder that holds no study, a study whose
            ``study.json`` is not a JSON object or has an invalid or newer format, or a study
            made by a different command (the line names what differs and gives the stored
            command).
    """
    path = Path(path)
    wanted = json.loads(
        json.dumps({"kind": kind, "options": options, "train_argv": list(train_argv)})
    )
    record_path = path / STUDY_JSON
    if path.exists() and not path.is_dir():
        raise StudyError(f"--study-dir {path} is a file; give a folder")
    if record_path.is_file():
        stored = read_record(record_path)
        stored_format = stored.get("format", 0)
        # bool is an int subclass, but `true` is no format number.
        if not isinstance(stored_format, int) or isinstance(stored_format, bool):
            raise StudyError(
                f"{record_path}: format {stored_format!r} is invalid; allowed: an int <= {FORMAT}"
            )
        if stored_format > FORMAT:
            raise StudyError(
                f"{record_path}: written by a newer version (format {stored_format!r}, "
                f"this one reads {FORMAT}); use that version or another --study-dir"
            )
        diffs = _differences(stored, wanted)
        if diffs:
            raise StudyError(
                f"study {path} was made by a different command ({'; '.join(diffs)}); continue it "
                f"with its own command: {_command_text(stored.get('command') or [])}, "
                "or pick another --study-dir"
            )
        return Study(
            path=path,
            kind=stored["kind"],
            options=stored["options"],
            train_argv=list(stored["train_argv"]),
            members=list(stored.get("members") or members),
            command=list(stored.get("command") or command),
            created=str(stored.get("created", "")),
            format=stored.get("format", FORMAT),
        )
    if path.is_dir() and any(path.iterdir()):
        raise StudyError(
            f"--study-dir {path} is not empty and holds no {STUDY_JSON}; "
            "give a new or empty folder, or a study made by this command"
        )
    study = Study(
        path=path,
        kind=kind,
        options=wanted["options"],
        train_argv=wanted["train_argv"],
        members=list(members),
        command=list(command),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    path.mkdir(parents=True, exist_ok=True)
    _write_json(record_path, study.record())
    return study


def check_train_options(
    train_argv: Sequence[str],
    flags: Sequence[str] = ("--run-dir", "--resume", "--overwrite"),
    settings: Mapping[str, str] | None = None,
) -> argparse.Namespace:
    """Parse a study's training options (after ``--``) with models/train.py's own parser, so its
    abbreviations count too, and refuse in one line what it rejects and what the study sets for
    each member itself.

    Args:
        train_argv: the options.
        flags: train.py options the study sets (``--run-dir``, ``--seed``, ...).
        settings: ``--set`` keys the study sets, each with the study option that sets it.

    Raises:
        StudyError: naming the option.
    """
    parser = build_parser()

    def refuse(message: str) -> None:
        raise StudyError(f"training options after --: {message}")

    parser.error = refuse  # type: ignore[method-assign]  # one line, no usage text
    try:
        args = parser.parse_args(list(train_argv))
    except SystemExit:  # --help after --
        raise StudyError("training options after --: see python models/train.py --help") from None
    for flag in flags:
        if getattr(args, flag.lstrip("-").replace("-", "_"), None) not in (None, False, [], ""):
            refuse(f"{flag} is set by the study for each member; leave it out")
    own = {"run.run_dir": "--study-dir", **(settings or {})}
    for item in args.overrides or []:
        key = item.partition("=")[0].strip()
        if key in own:
            refuse(f"--set {key} is set by the study ({own[key]}); leave it out")
    return args


def run_member(
    study_dir: Path,
    member: Member,
    console: Console,
    *,
    batch_size: int = 256,
    device: str = "auto",
) -> int:
    """Train member ``member`` (fresh or resumed) and test it; its exit code (0 when done).

    A member whose run already trained every epoch is resumed too: models/train.py then only
    says there is nothing to do and returns 0, and the test step that was missing follows.
    """
    run_dir = member_dir(study_dir, member.name)
    state = member_state(run_dir)
    if state == "finished":
        return 0
    if state == "stuck":
        markers = [m for m in RUN_MARKERS if (run_dir / m).exists()]
        console.print(
            f"member {member.name}: {run_dir} holds a run that saved no epoch "
            f"({', '.join(markers) or 'other files'}, no {RESUME_FILE}); nothing to resume: "
            "delete that folder to train the member again",
            markup=False,
            soft_wrap=True,
        )
        return 2
    if state == "in progress":
        argv = ["--resume", str(run_dir)]
        console.print(f"[bold]member {member.name}[/]: resuming {run_dir}", soft_wrap=True)
    else:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        argv = [*member.train_argv, "--run-dir", str(run_dir)]
        console.print(f"[bold]member {member.name}[/]: training {run_dir}", soft_wrap=True)
    # Looked up at call time, so a test can count or interrupt the calls.
    code = train_script.main(argv)
    if code != 0:
        return code
    try:
        report = evaluate_run(run_dir, batch_size=batch_size, device=device)
        save_report(report, run_dir)
    except (CheckpointError, DataError, ValueError, OSError) as error:
        console.print(
            f"member {member.name}: testing failed: {error}", markup=False, soft_wrap=True
        )
        return 1
    console.print(f"member {member.name}: tested, {run_dir / REPORT_JSON}", soft_wrap=True)
    return 0


def run_members(
    study: Study,
    members: Sequence[Member],
    console: Console,
    *,
    after_each: Callable[[], None] | None = None,
    batch_size: int = 256,
    device: str = "auto",
) -> int:
    """Train and test every unfinished member in order; 0 when all are finished.

    Stops at once with 130 when a member's training was interrupted (Ctrl-C), and at the first
    other failure with that member's exit code and one line naming it. ``after_each`` runs
    after every member that finished (to rewrite the summary).
    """
    for member in members:
        if member_state(member_dir(study.path, member.name)) == "finished":
            console.print(f"member {member.name}: finished already, skipped", soft_wrap=True)
            continue
        try:
            code = run_member(study.path, member, console, batch_size=batch_size, device=device)
        except KeyboardInterrupt:  # during the test step, outside the trainer's own handler
            code = INTERRUPTED
        if code == INTERRUPTED:
            console.print(
                f"[yellow]study stopped at member {member.name}; run the same command again to "
                "continue it[/]",
                soft_wrap=True,
            )
            return INTERRUPTED
        if code != 0:
            console.print(
                f"[bold red]error:[/] study stopped: member {member.name} exited with code {code}",
                soft_wrap=True,
            )
            return code
        if after_each is not None:
            after_each()
    return 0


def write_summary(study_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Write ``summary.json`` atomically; its path."""
    path = Path(study_dir) / SUMMARY_JSON
    _write_json(path, summary)
    return path
