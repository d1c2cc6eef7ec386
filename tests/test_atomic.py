"""Files the run writes through a temp file get the mode a plain ``open()`` would give them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from training.callbacks.metrics_log import truncate_metrics
from training.config.schema import TrainConfig, save_config
from training.engine.atomic import create_temp_beside
from training.engine.checkpoint import copy_checkpoint, save_checkpoint


@pytest.fixture(params=[0o022, 0o027, 0o077], ids=["umask022", "umask027", "umask077"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def plain_open_mode(folder: Path) -> int:
    """What ``open(path, "w")`` gives here, the reference every writer must match."""
    reference = folder / "plain.txt"
    reference.write_text("x")
    return mode(reference)


def test_temp_file_is_new_hidden_beside_the_target_and_open_for_writing(tmp_path, umask):
    fd, name = create_temp_beside(tmp_path / "last.pt")
    with os.fdopen(fd, "wb") as f:
        f.write(b"abc")
    temp = Path(name)
    assert temp.parent == tmp_path
    assert temp.name.startswith(".last.pt.") and temp.name.endswith(".tmp")
    assert temp.read_bytes() == b"abc"
    assert mode(temp) == 0o666 & ~umask


def test_two_temp_files_for_one_target_never_share_a_name(tmp_path):
    names = {create_temp_beside(tmp_path / "best.pt")[1] for _ in range(50)}
    assert len(names) == 50


def write_checkpoint(folder: Path) -> Path:
    path = folder / "last.pt"
    save_checkpoint({"format": 1, "model": {"w": torch.ones(2)}}, path)
    return path


def write_copy(folder: Path) -> Path:
    copy_checkpoint(write_checkpoint(folder), folder / "best.pt")
    return folder / "best.pt"


def write_config(folder: Path) -> Path:
    save_config(TrainConfig(), folder / "config.yaml")
    return folder / "config.yaml"


def write_truncated_metrics(folder: Path) -> Path:
    path = folder / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2}\n')
    os.chmod(path, 0o600)  # the rewrite must not inherit a stricter mode either
    truncate_metrics(path, 2)
    assert path.read_text() == '{"epoch": 1}\n'
    return path


@pytest.mark.parametrize(
    "write", [write_checkpoint, write_copy, write_config, write_truncated_metrics]
)
def test_run_files_are_readable_like_files_from_a_plain_open(tmp_path, umask, write):
    path = write(tmp_path)
    assert mode(path) == plain_open_mode(tmp_path) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_write_atomically_renames_into_place_and_leaves_nothing_on_failure(tmp_path):
    from training.engine.atomic import write_atomically

    target = tmp_path / "report.json"
    write_atomically(target, lambda tmp: tmp.write_text("{}"))
    assert target.read_text() == "{}"

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomically(target, fail)
    assert target.read_text() == "{}"  # the old file stands
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
