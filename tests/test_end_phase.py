"""The end of a run (SWA average, BatchNorm update, temperature fit) under Ctrl-C, kills and
resumes: every path ends with the files of an uninterrupted run, and a finished run resumed does
nothing.

The data overlap (noisy brightness classes), so the temperature is fitted rather than kept at 1.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from tests.conftest import brightness_npz
from training.build import build_trainer, load_resume
from training.callbacks.metrics_log import read_metrics
from training.config.schema import load_config
from training.engine.checkpoint import load_checkpoint
from training.engine.events import Callback

TIMING = ("epoch_s", "images_per_s")


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after the point where it is raised runs."""


def end_config(npz: Path, root: Path, run: str):
    return load_config(
        preset="cpu",
        overrides=[
            f"data.source={npz}",
            f"data.root={root / 'cache'}",
            "model.block_channels=[]",
            "model.width=0.125",
            "optim.batch_size=16",
            "run.epochs=3",
            "run.progress=off",
            "run.tensorboard=false",
            f"run.run_dir={root / run}",
            "unfreeze.enabled=false",
            "safety.swa_start_epoch=2",
            "safety.early_stop=false",
        ],
    )


def fit(cfg, resume=None, callbacks=()):
    trainer = build_trainer(
        cfg, Path(cfg.run.run_dir), resume=resume, extra_callbacks=list(callbacks)
    )
    return trainer, trainer.fit()


def resume(run_dir: Path):
    cfg, ckpt = load_resume(run_dir)
    cfg.run.run_dir = str(run_dir)  # as train.py --resume does: the folder given, not the stored
    return fit(cfg, resume=ckpt)


def comparable_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without what differs between any two runs: timings, the run's own paths,
    and the notice of the Ctrl-C itself."""
    rows = []
    for row in read_metrics(run_dir / "metrics.jsonl", events=True):
        row = {k: v for k, v in row.items() if k not in TIMING}
        if "events" in row:
            row["events"] = [e for e in row["events"] if e["title"] != "interrupt received"]
        if "swa" in row:
            row["swa"] = {k: v for k, v in row["swa"].items() if k != "file"}
        rows.append(row)
    return rows


def assert_same_end(a: Path, b: Path) -> None:
    for name in ("best.pt", "swa.pt", "last.pt"):
        ca, cb = (load_checkpoint(run / "checkpoints" / name) for run in (a, b))
        assert ca["model"].keys() == cb["model"].keys(), name
        differ = [k for k in ca["model"] if not torch.equal(ca["model"][k], cb["model"][k])]
        assert not differ, f"{name}: {differ}"
        assert ca.get("temperature") == cb.get("temperature"), name
    assert comparable_rows(a) == comparable_rows(b)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("end")
    npz = brightness_npz(root / "noisy.npz", counts=(48, 24, 12), noise=120)
    _, summary = fit(end_config(npz, root, "straight"))
    assert summary["stopped"] is None and summary["swa"]["models"] == 2
    assert "swa" in summary["calibration"]
    return npz, root / "straight"


def sigint_after_batches(real, n: int):
    """``update_bn`` that sends this process a SIGINT after ``n`` batches, as Ctrl-C would."""

    def update_bn(loader, module, device=None):
        def batches():
            for i, batch in enumerate(loader):
                if i == n:
                    os.kill(os.getpid(), signal.SIGINT)
                yield batch

        real(batches(), module, device=device)

    return update_bn


def test_ctrl_c_during_the_bn_update_stops_cleanly_and_resumes_to_the_same_files(
    straight, tmp_path, monkeypatch
):
    import training.callbacks.swa as swa

    npz, reference = straight
    monkeypatch.setattr(swa, "update_bn", sigint_after_batches(swa.update_bn, 1))
    _, summary = fit(end_config(npz, tmp_path, "run"))
    assert summary["stopped"] == "interrupted"
    assert not (tmp_path / "run" / "checkpoints" / "swa.pt").exists()
    monkeypatch.undo()
    _, summary = resume(tmp_path / "run")
    assert summary["stopped"] is None
    assert_same_end(reference, tmp_path / "run")


def test_a_kill_while_best_pt_is_calibrated_resumes_to_the_same_files(
    straight, tmp_path, monkeypatch
):
    import training.callbacks.temperature as temperature

    npz, reference = straight
    real_save = temperature.save_checkpoint

    def save_or_die(payload, path):
        if Path(path).name == "best.pt":
            raise Killed
        real_save(payload, path)

    monkeypatch.setattr(temperature, "save_checkpoint", save_or_die)
    with pytest.raises(Killed):
        fit(end_config(npz, tmp_path, "run"))
    monkeypatch.undo()
    resume(tmp_path / "run")
    assert_same_end(reference, tmp_path / "run")


class SigintAfterValidation(Callback):
    """Sends this process a SIGINT once the given epoch is validated."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_validation_end(self, trainer, metrics):
        if metrics["epoch"] == self.epoch:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_during_the_last_validation_stops_before_the_end_phase(straight, tmp_path):
    npz, reference = straight
    _, summary = fit(end_config(npz, tmp_path, "run"), callbacks=[SigintAfterValidation(3)])
    assert summary["stopped"] == "interrupted"
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["epoch"] == 3 and last["progress"] is None and "finished" not in last
    assert not (tmp_path / "run" / "checkpoints" / "swa.pt").exists()
    resume(tmp_path / "run")
    assert_same_end(reference, tmp_path / "run")


def test_a_finished_run_resumed_changes_nothing_and_says_so(straight, tmp_path, capsys):
    import shutil

    _, reference = straight
    run = tmp_path / "copy"
    shutil.copytree(reference, run)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    before["metrics.jsonl"] = (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    _, summary = resume(run)
    assert summary["already_finished"] and summary["stopped"] is None
    assert "nothing to do: this run has finished" in capsys.readouterr().out
    after = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    after["metrics.jsonl"] = (run / "metrics.jsonl").read_bytes()
    assert after == before
