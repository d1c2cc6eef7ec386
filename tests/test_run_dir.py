"""The run folder: one run per folder, refusals in one line, and temp leftovers removed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from training.config.schema import ConfigError
from training.engine.run_dir import prepare_run_dir, remove_temp_leftovers


def earlier_run(folder: Path) -> Path:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "swa.pt").write_bytes(b"old")
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


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_gives_one_line(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="Permission denied"):
            prepare_run_dir(parent / "run")
    finally:
        parent.chmod(0o755)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_to_resume_gives_one_line(tmp_path):
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
