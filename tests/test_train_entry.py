"""``models/train.py``'s ``main`` in process: refusals in one line, run folders, Ctrl-C twice."""

from __future__ import annotations

import functools
import signal

import pytest
import torch

import models.train as train_script
import training.engine.device as device_module
from tests.test_entry_points import train_cmd
from training.callbacks.metrics_log import read_metrics
from training.engine.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from training.engine.events import Callback


def argv(tiny_npz, tmp_path, run_dir, *extra) -> list[str]:
    return train_cmd(tiny_npz, tmp_path, run_dir, *extra)[2:]  # without python and the script


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "device, expected",
    [
        ("cuda", "error: run.device 'cuda' requested but CUDA is not available; found: CPU only"),
        ("mps", "error: run.device 'mps' requested but MPS is not available; found: CPU only"),
    ],
)
def test_an_accelerator_the_machine_lacks_is_one_line(
    tiny_npz, tmp_path, capsys, monkeypatch, device, expected
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module, "_mps_available", lambda: False)
    code = train_script.main(argv(tiny_npz, tmp_path, tmp_path / "run", "--device", device))
    assert code == 2
    assert error_line(capsys).startswith(expected)


@pytest.mark.parametrize("dropped", ["config", "epoch"])
def test_resuming_from_a_checkpoint_without_what_resuming_needs_is_one_line(
    tmp_path, capsys, dropped
):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"
    payload = {"format": FORMAT, "model": {}, "config": {}, "epoch": 1, "optimizer": {}}
    payload.update(scheduler={}, stepper={}, best={}, rng={})
    del payload[dropped]
    save_checkpoint(payload, last)
    assert train_script.main(["--resume", str(run_dir)]) == 2
    line = error_line(capsys)
    assert f"checkpoint {last} cannot resume a run: it lacks {dropped}" in line


def test_a_used_run_folder_is_refused_and_overwrite_starts_afresh(tiny_npz, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "swa.pt").write_bytes(b"an earlier run's")
    (run_dir / "metrics.jsonl").write_text('{"event": "fit_end", "best_epoch": 6}\n')
    args = argv(tiny_npz, tmp_path, run_dir, "--epochs", "1")
    assert train_script.main(args) == 2
    line = error_line(capsys)
    assert f"run folder {run_dir} is not empty" in line and "--overwrite" in line
    assert (run_dir / "checkpoints" / "swa.pt").read_bytes() == b"an earlier run's"

    assert train_script.main([*args, "--overwrite"]) == 0
    assert not (run_dir / "checkpoints" / "swa.pt").exists()
    ends = [row for row in read_metrics(run_dir / "metrics.jsonl", events=True) if "event" in row]
    assert [row["event"] for row in ends].count("fit_end") == 1

    # A kill during a checkpoint write leaves its temp file; resuming removes it.
    leftover = run_dir / "checkpoints" / ".rollback.pt.0badc0de.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert train_script.main(["--resume", str(run_dir), "--epochs", "2"]) == 0
    assert not leftover.exists()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 2


class CtrlCTwice(Callback):
    """Presses Ctrl-C twice at the start of ``epoch``, as an impatient user would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, trainer, epoch: int) -> None:
        if epoch == self.epoch:
            signal.raise_signal(signal.SIGINT)  # the first asks to finish the step and save
            signal.raise_signal(signal.SIGINT)  # the second asks to stop at once


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tiny_npz, tmp_path, capsys, monkeypatch):
    build = functools.partial(train_script.build_trainer, extra_callbacks=[CtrlCTwice(2)])
    monkeypatch.setattr(train_script, "build_trainer", build)
    run_dir = tmp_path / "run"
    try:
        code = train_script.main(argv(tiny_npz, tmp_path, run_dir, "--epochs", "3"))
    except KeyboardInterrupt:  # caught here so that a failure does not end the whole session
        pytest.fail("the second Ctrl-C escaped main() as a KeyboardInterrupt")
    assert code == 130
    out = capsys.readouterr().out
    resume = f"python models/train.py --resume {run_dir}"
    assert f"stopped at once; resume from the last epoch with: {resume}" in out
    assert "Traceback" not in out
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1


def test_stopped_at_once_before_any_checkpoint_says_so(tmp_path):
    assert train_script.stopped_at_once(tmp_path) == "stopped at once, before any epoch was saved"
    assert train_script.stopped_at_once(None) == "stopped at once, before any epoch was saved"
