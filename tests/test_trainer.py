"""The training loop end to end on a tiny generated dataset: steps, resume, SIGINT, files."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from training.build import build_trainer, load_resume
from training.callbacks.metrics_log import read_metrics
from training.config.schema import load_config
from training.engine.checkpoint import CheckpointError, load_checkpoint
from training.engine.events import Callback
from training.engine.trainer import Interrupted


def tiny_config(tiny_npz, tmp_path, run="run", *extra):
    return load_config(
        preset="cpu",
        overrides=[
            f"data.source={tiny_npz}",
            f"data.root={tmp_path / 'cache'}",
            "model.width=0.125",
            "model.block_channels=[]",  # the preset's block_channels would win over width
            "model.active_blocks=1",
            "optim.batch_size=8",
            "run.epochs=3",
            "run.progress=off",
            "run.tensorboard=false",
            f"run.run_dir={tmp_path / run}",
            *extra,
        ],
    )


def fit(cfg, resume=None, callbacks=None):
    from pathlib import Path

    trainer = build_trainer(cfg, Path(cfg.run.run_dir), resume=resume, extra_callbacks=callbacks)
    return trainer, trainer.fit()


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class StepCounter(Callback):
    def __init__(self):
        self.batches = 0
        self.steps = 0

    def on_batch_end(self, trainer, batch, loss, stepped):
        self.batches += 1
        self.steps += stepped


@pytest.mark.parametrize("accumulation, steps_per_epoch", [(1, 6), (4, 2), (5, 2), (6, 1)])
def test_optimizer_steps_per_epoch_with_accumulation(
    tiny_npz, tmp_path, accumulation, steps_per_epoch
):
    cfg = tiny_config(
        tiny_npz, tmp_path, "run", f"optim.accumulation={accumulation}", "run.epochs=2"
    )
    counter = StepCounter()
    trainer, _ = fit(cfg, callbacks=[counter])
    assert counter.batches == 12  # 48 images / batch 8, two epochs
    assert counter.steps == trainer.step == 2 * steps_per_epoch
    assert trainer.schedule.last_step == trainer.step  # the schedule moves per optimizer step


def test_run_folder_contents(tiny_npz, tmp_path):
    cfg = tiny_config(tiny_npz, tmp_path)
    trainer, summary = fit(cfg)
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.pt").is_file() and (
        run / "checkpoints" / "best.pt"
    ).is_file()
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for key in (
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "val_macro_f1",
        "lr",
        "active_blocks",
        "epoch_s",
        "images_per_s",
    ):
        assert key in rows[0], key
    assert isinstance(rows[0]["lr"], list) and len(rows[0]["lr"]) == 1
    assert summary["best_epoch"] in (1, 2, 3) and summary["stopped"] is None
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 3 and ckpt["step"] == trainer.step
    assert ckpt["class_names"] == ["0", "1", "2"] and len(ckpt["mean"]) == 3


class StopAfter(Callback):
    """Ends the run after an epoch, as a killed or time-limited job would: without the end
    phase, so that the run is resumable (a run ended by ``StopTraining`` is finished)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, trainer, metrics):
        if trainer.epoch == self.epoch:
            raise Interrupted


def test_resume_gives_identical_weights(tiny_npz, tmp_path):
    straight, _ = fit(tiny_config(tiny_npz, tmp_path, "a"))
    # The same 3-epoch run, ended after epoch 2 and continued from last.pt in a new trainer.
    _, summary = fit(tiny_config(tiny_npz, tmp_path, "b"), callbacks=[StopAfter(2)])
    assert summary["stopped"] == "interrupted"
    cfg, ckpt = load_resume(tmp_path / "b")
    resumed, _ = fit(cfg, resume=ckpt)
    assert resumed.start_epoch == 3
    assert same_weights(straight.model.state_dict(), resumed.model.state_dict())
    assert straight.step == resumed.step
    assert [r["epoch"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3]


class InterruptAt(Callback):
    """Sends this process a SIGINT after a given batch, as Ctrl-C would."""

    def __init__(self, epoch, batch):
        self.at = (epoch, batch)

    def on_batch_end(self, trainer, batch, loss, stepped):
        if (trainer.epoch, batch) == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def test_sigint_saves_and_resumes_exactly(tiny_npz, tmp_path):
    # Python's default handler, or SIG_IGN when the tests run as a background job of a shell.
    handler_before = signal.getsignal(signal.SIGINT)
    straight, _ = fit(tiny_config(tiny_npz, tmp_path, "a", "optim.accumulation=2"))
    cfg = tiny_config(tiny_npz, tmp_path, "b", "optim.accumulation=2")
    interrupted, summary = fit(cfg, callbacks=[InterruptAt(epoch=2, batch=2)])
    assert summary["stopped"] == "interrupted"
    # batch 2 (0-based) is the first of a group of 2: the loop finished that step first
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["progress"]["batches_done"] == 4
    assert ckpt["step"] == 3 + 2
    cfg2, ckpt2 = load_resume(tmp_path / "b")
    resumed, summary2 = fit(cfg2, resume=ckpt2)
    assert summary2["stopped"] is None
    assert same_weights(straight.model.state_dict(), resumed.model.state_dict())
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored


def test_activated_block_joins_optimizer_and_schedule(tiny_npz, tmp_path):
    # The schedule activates nothing in this one epoch (a scaled plan would join block 2 at once).
    cfg = tiny_config(tiny_npz, tmp_path, "run", "run.epochs=1", "unfreeze.activate_at=[2, 4]")
    trainer, _ = fit(cfg)
    notices = []

    class Listen(Callback):
        def on_notice(self, trainer, kind, title, lines, banner=True):
            notices.append((kind, title))

    trainer.callbacks.append(Listen())
    trainer.unfreeze_to(3)
    names = [g["name"] for g in trainer.optimizer.param_groups]
    assert names == ["block1", "block2", "block3"]
    assert notices == [("stage", "STAGE 3: block2, block3 active")]
    trainer.schedule.step()
    lrs = trainer.schedule.lrs()
    assert lrs[0] == pytest.approx(lrs[1]) == pytest.approx(lrs[2])
    with pytest.raises(ValueError, match="depth=2 is invalid"):
        trainer.unfreeze_to(2)


def test_a_run_stored_before_the_downsample_option_resumes_strided(tiny_npz, tmp_path):
    fit(tiny_config(tiny_npz, tmp_path, "a", "run.epochs=1", "model.downsample=stride"))
    path = tmp_path / "a" / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(path)
    del ckpt["config"]["model"]["downsample"]
    # Stored the way checkpoints were before the model record: the model's config alone.
    record, _ = ckpt.pop("model_record"), ckpt.pop("trainable_stages")
    shape = {k: record[k] for k in ("in_channels", "num_classes", "input_size")}
    ckpt["model_config"] = {**shape, **record["options"], **record["settings"]}
    del ckpt["model_config"]["downsample"]
    torch.save(ckpt, path)
    cfg, ckpt = load_resume(tmp_path / "a")
    assert cfg.model.downsample == "stride"
    cfg.run.epochs = 2
    resumed, summary = fit(cfg, resume=ckpt)
    assert resumed.start_epoch == 2 and summary["stopped"] is None
    assert resumed.model.config.downsample == "stride"


def test_resume_with_other_architecture_is_a_clear_error(tiny_npz, tmp_path):
    fit(tiny_config(tiny_npz, tmp_path, "a", "run.epochs=1"))
    cfg, ckpt = load_resume(tmp_path / "a")
    cfg.model.width = 0.25
    with pytest.raises(CheckpointError, match="width"):
        fit(cfg, resume=ckpt)


def test_a_stage_banner_shows_a_scaled_warmup_in_three_digits(tiny_npz, tmp_path):
    cfg = tiny_config(tiny_npz, tmp_path, "run", "run.epochs=1", "unfreeze.activate_at=[2, 4]")
    trainer, _ = fit(cfg)
    shown: list[str] = []

    class Listen(Callback):
        def on_notice(self, trainer, kind, title, lines, banner=True):
            shown.extend(lines)

    trainer.callbacks.append(Listen())
    trainer.unfreeze_to(2, warmup_epochs=1 / 60)
    assert any("warmup 0.0167 ep" in line for line in shown), shown  # not 0.0166667


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after the point where it is raised runs."""


def test_a_kill_right_after_last_pt_keeps_that_epochs_metrics_row(tiny_npz, tmp_path, monkeypatch):
    # A kill between last.pt and the epoch-end hooks (e.g. while rollback.pt is copied) must not
    # lose the epoch's row: the checkpoint says epoch 2 is done, so the log must hold it.
    from training.engine.trainer import Trainer

    real_save = Trainer.save

    def save_then_die(self, name):
        path = real_save(self, name)
        if name == "last.pt" and self.epoch == 2:
            raise Killed
        return path

    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(Killed):
        fit(tiny_config(tiny_npz, tmp_path, "b"))
    monkeypatch.undo()
    cfg, ckpt = load_resume(tmp_path / "b")
    assert ckpt["epoch"] == 2
    fit(cfg, resume=ckpt)
    assert [r["epoch"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3]
