"""The run folder: one run per folder, refusals in one line, and temp leftovers removed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from training.config.schema import ConfigError
from training.engine.run_dir import prepare_run_dir, remove_temp_leftovers


def earlier_run(folder: Path) -> Path:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "swa.pt").write_bytes(b"old")
    (folder / "checkpoints" / "last.pt").write_bytes(b"old")
    (folder / "config.yaml").write_text("run: {}\n")
    (folder / "metrics.jsonl").write_text('{"event": "fit_end"}\n')
    return folder


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_missing_folder_is_created_with_its_parents(tmp_path):
    prepare_run_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()


def test_an_empty_folder_is_taken_as_it_is(tmp_path):
    prepare_run_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_of_an_earlier_run_is_refused_naming_both_ways_out(tmp_path):
    run_dir = earlier_run(tmp_path / "run")
    with pytest.raises(ConfigError) as error:
        prepare_run_dir(run_dir)
    message = one_line(error)
    assert str(run_dir) in message and "not empty" in message
    assert f"--resume {run_dir}" in message and "--overwrite" in message
    assert "checkpoints/" in message and "config.yaml" in message
    assert (run_dir / "checkpoints" / "swa.pt").read_bytes() == b"old"  # nothing touched


def run_stopped_before_its_first_epoch(folder: Path) -> Path:
    """What a run leaves when it stops before saving ``checkpoints/last.pt``."""
    (folder / "tensorboard").mkdir(parents=True)
    (folder / "config.yaml").write_text("run: {}\n")
    (folder / "metrics.jsonl").write_text("")
    (folder / "lr_schedule.png").write_bytes(b"png")
    return folder


def test_a_run_stopped_before_its_first_epoch_names_only_overwrite(tmp_path):
    run_dir = run_stopped_before_its_first_epoch(tmp_path / "run")
    with pytest.raises(ConfigError) as error:
        prepare_run_dir(run_dir)
    message = one_line(error)
    assert "stopped before its first epoch was saved" in message
    assert "--resume" not in message  # it would fail: there is no checkpoint to resume from
    assert "--overwrite" in message and str(run_dir) in message
    prepare_run_dir(run_dir, overwrite=True)  # the way out it names works
    assert list(run_dir.iterdir()) == []


def test_a_folder_that_holds_no_run_names_neither_flag(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(ConfigError) as error:
        prepare_run_dir(folder)
    message = one_line(error)
    assert "holds no run" in message and "pick another --run-dir" in message
    assert "--resume" not in message and "--overwrite" not in message


def test_overwrite_clears_an_earlier_run_but_keeps_the_folder(tmp_path):
    run_dir = earlier_run(tmp_path / "run")
    outside = tmp_path / "keep.txt"
    outside.write_text("x")
    (run_dir / "link").symlink_to(outside)
    prepare_run_dir(run_dir, overwrite=True)
    assert run_dir.is_dir() and list(run_dir.iterdir()) == []
    assert outside.read_text() == "x"  # a link is removed, not followed


def test_overwrite_refuses_a_folder_that_holds_no_run(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(ConfigError) as error:
        prepare_run_dir(folder, overwrite=True)
    assert "holds none of them (holiday.jpg)" in one_line(error)
    assert (folder / "holiday.jpg").exists()


def test_resume_keeps_the_run_it_continues(tmp_path):
    run_dir = earlier_run(tmp_path / "run")
    prepare_run_dir(run_dir, resume=True, overwrite=True)
    assert (run_dir / "checkpoints" / "swa.pt").read_bytes() == b"old"


def test_a_file_in_place_of_the_folder_is_refused(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        prepare_run_dir(tmp_path / "run")


def test_a_folder_that_cannot_be_created_gives_one_line(tmp_path, monkeypatch):
    target = tmp_path / "locked" / "run"

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(ConfigError) as error:
        prepare_run_dir(target)
    assert one_line(error) == (
        f"run folder {target} cannot be prepared: Permission denied ({target})"
    )


def _denied(path) -> PermissionError:
    return PermissionError(13, "Permission denied", str(path))


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)``: nothing can be created or deleted in ``folder``, even by root.

    The mode is set to 0555 too, but root ignores it (and every machine here runs as root), so
    the calls ``prepare_run_dir`` makes are also made to fail as the kernel fails them for an
    ordinary user: creating or deleting inside the folder raises ``PermissionError``, and
    ``os.access`` reports it unwritable.
    """
    locked: list[Path] = []
    real_mkdir, real_unlink, real_rmtree = Path.mkdir, Path.unlink, shutil.rmtree
    real_access = os.access

    def inside(path) -> bool:
        return any(Path(path).parent == folder for folder in locked)

    def mkdir(self, *args, **kwargs):
        if inside(self) and not self.is_dir():
            raise _denied(self)
        return real_mkdir(self, *args, **kwargs)

    def unlink(self, *args, **kwargs):
        if inside(self):
            raise _denied(self)
        return real_unlink(self, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        if inside(path):
            raise _denied(path)
        return real_rmtree(path, *args, **kwargs)

    def access(path, mode, *args, **kwargs):
        if Path(path) in locked and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(Path, "unlink", unlink)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(os, "access", access)

    def lock(folder: Path) -> None:
        folder.chmod(0o555)
        locked.append(folder)

    yield lock
    for folder in locked:
        folder.chmod(0o755)


def test_a_read_only_parent_gives_one_line(tmp_path, read_only):
    parent = tmp_path / "ro"
    parent.mkdir()
    read_only(parent)
    with pytest.raises(ConfigError) as error:
        prepare_run_dir(parent / "run")
    assert one_line(error) == (
        f"run folder {parent / 'run'} cannot be prepared: Permission denied ({parent / 'run'})"
    )
    assert list(parent.iterdir()) == []


def test_a_read_only_run_folder_to_resume_gives_one_line(tmp_path, read_only):
    run_dir = earlier_run(tmp_path / "run")
    read_only(run_dir)
    with pytest.raises(ConfigError) as error:
        prepare_run_dir(run_dir, resume=True)
    assert one_line(error) == f"run folder {run_dir} is not writable: pick another --run-dir"


def test_overwrite_of_a_run_that_cannot_be_deleted_gives_one_line(tmp_path, read_only):
    run_dir = earlier_run(tmp_path / "run")
    read_only(run_dir)
    with pytest.raises(ConfigError) as error:
        prepare_run_dir(run_dir, overwrite=True)
    message = one_line(error)
    assert message.startswith(f"run folder {run_dir} cannot be prepared: Permission denied (")
    assert (run_dir / "config.yaml").is_file()


def test_an_unreadable_run_folder_gives_one_line(tmp_path, monkeypatch):
    run_dir = earlier_run(tmp_path / "run")

    def denied(self):
        raise _denied(self)

    monkeypatch.setattr(Path, "iterdir", denied)  # what listing a mode-0 folder does, but root
    with pytest.raises(ConfigError) as error:
        prepare_run_dir(run_dir)
    assert one_line(error) == (
        f"run folder {run_dir} cannot be prepared: Permission denied ({run_dir})"
    )


# The same with real modes: these run only where the modes bind (not as root).
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_gives_one_line_with_real_modes(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="Permission denied"):
            prepare_run_dir(parent / "run")
    finally:
        parent.chmod(0o755)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_to_resume_gives_one_line_with_real_modes(tmp_path):
    run_dir = earlier_run(tmp_path / "run")
    run_dir.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="is not writable"):
            prepare_run_dir(run_dir, resume=True)
    finally:
        run_dir.chmod(0o755)


def test_temp_leftovers_of_a_killed_run_are_removed_and_nothing_else(tmp_path):
    run_dir = earlier_run(tmp_path / "run")
    leftovers = [
        run_dir / "checkpoints" / ".best.pt.1a2b3c4d.tmp",
        run_dir / "checkpoints" / ".rollback.pt.0f0f0f0f.tmp",
        run_dir / "checkpoints" / ".last.pt.abcdef12.tmp",
        run_dir / ".config.yaml.12345678.tmp",
        run_dir / ".metrics.jsonl.87654321.tmp",
    ]
    for path in leftovers:
        path.write_bytes(b"partial")
    kept = sorted(p for p in run_dir.rglob("*") if p not in leftovers)
    assert sorted(remove_temp_leftovers(run_dir)) == sorted(leftovers)
    assert sorted(run_dir.rglob("*")) == kept


def test_removing_leftovers_of_a_run_not_started_yet_is_a_no_op(tmp_path):
    assert remove_temp_leftovers(tmp_path / "not-yet") == []


def test_resuming_a_run_stopped_before_its_first_epoch_names_overwrite(tmp_path):
    from training.build import load_resume
    from training.engine.checkpoint import CheckpointError

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("run: {}\n")
    with pytest.raises(CheckpointError) as error:
        load_resume(tmp_path / "run")
    message = str(error.value)
    assert "\n" not in message and "stopped before its first epoch" in message
    assert "--overwrite" in message
    with pytest.raises(CheckpointError, match="no run was saved there"):
        load_resume(tmp_path / "empty")
