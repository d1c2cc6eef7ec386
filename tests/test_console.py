"""ConsoleCallback: header, progress per mode, epoch lines and their colours, notices, summary."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from dataset.cache import CacheInfo
from models.basic_cnn_model import BasicCNNModel, ModelConfig, model_summary
from training.console import ConsoleCallback, resolve_mode, warn

CLASSES = ["benign", "malignant", "normal"]
COUNTS = {"train": [101, 202, 3303], "val": [11, 22, 33], "test": [21, 42, 63]}
GREEN = "\x1b[1;32m"  # bold green in rich's standard colour system
RED = "\x1b[31m"


@pytest.fixture(scope="module")
def model() -> BasicCNNModel:
    return BasicCNNModel(ModelConfig(width=0.125, num_classes=3))


def make_trainer(model, **changes) -> SimpleNamespace:
    meta = {
        "name": "tinyderm",
        "class_names": CLASSES,
        "image_shape": [28, 28, 3],
        "counts": COUNTS,
    }
    config = SimpleNamespace(
        data=SimpleNamespace(source="tinyderm.npz"),
        optim=SimpleNamespace(batch_size=16, accumulation=2),
        run=SimpleNamespace(epochs=5, monitor="val_acc", progress="auto", tensorboard=False),
    )
    trainer = SimpleNamespace(
        config=config,
        device=torch.device("cpu"),
        amp_dtype=None,
        cache=CacheInfo(Path("unused"), meta),
        model=model,
        run_dir=Path("runs/test-run"),
        epoch=1,
        batches_per_epoch=8,
        best={"metric": "val_acc", "value": None, "epoch": None},
        history=[],
        is_main=True,
        start_epoch=1,
    )
    for key, value in changes.items():
        setattr(trainer, key, value)
    return trainer


def metrics(epoch: int, val_acc: float = 0.8) -> dict:
    return {
        "epoch": epoch,
        "train_loss": 0.5,
        "train_acc": 0.81,
        "val_loss": 0.6,
        "val_acc": val_acc,
        "val_macro_f1": 0.7,
        "lr": [1e-3, 1e-4],
        "active_blocks": 2,
        "epoch_s": 12.3,
        "images_per_s": 4321.0,
    }


def make_console(terminal: bool = False) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    if terminal:
        return Console(file=buf, force_terminal=True, color_system="standard", width=120), buf
    return Console(file=buf, force_terminal=False, width=120), buf


def run_epoch(cb: ConsoleCallback, trainer, epoch: int, m: dict, batches: int = 8) -> None:
    trainer.epoch = epoch
    cb.on_epoch_start(trainer, epoch)
    for b in range(batches):
        cb.on_batch_end(trainer, b, 1.0 / (b + 1), stepped=b % 2 == 1)
    trainer.history.append(m)
    cb.on_epoch_end(trainer, m)


def finish(
    epoch: int = 3, stopped: str | None = "early stopping: no gain in 5 epochs", best_value=0.91
) -> dict:
    return {
        "best_epoch": epoch,
        "best_value": best_value,
        "monitor": "val_acc",
        "seconds": 3723.0,
        "stopped": stopped,
        "files": {
            "run dir": "runs/test-run",
            "best": "runs/test-run/checkpoints/best.pt",
            "last": "runs/test-run/checkpoints/last.pt",
            "metrics": "runs/test-run/metrics.jsonl",
            "tensorboard": "runs/test-run/tensorboard",
        },
    }


# ----------------------------------------------------------------------------------- mode


@pytest.mark.parametrize(
    ("mode", "terminal", "expected"),
    [
        ("auto", True, "bar"),
        ("auto", False, "plain"),
        ("bar", False, "bar"),
        ("plain", True, "plain"),
        ("off", True, "off"),
    ],
)
def test_resolve_mode(mode, terminal, expected):
    console, _ = make_console(terminal)
    assert resolve_mode(mode, console) == expected


def test_bad_mode_is_refused_with_its_value():
    with pytest.raises(ValueError, match="'fancy'.*auto"):
        ConsoleCallback(make_console()[0], mode="fancy")


# --------------------------------------------------------------------------------- header


def test_header_shows_classes_counts_and_block_parameters(model):
    console, buf = make_console()
    trainer = make_trainer(model)
    ConsoleCallback(console, "plain").on_fit_start(trainer)
    out = buf.getvalue()
    for name in CLASSES:
        assert name in out
    assert "3,303" in out and "63" in out  # a per-class count, formatted
    assert "3,606" in out  # train total
    rows = {r["name"]: r for r in model_summary(model, 0)}
    assert rows["block2"]["params"] > 0 and not rows["block2"]["active"]
    assert f"{rows['block2']['params']:,}" in out
    assert f"{rows['block1']['trainable']:,}" in out
    assert "16 x 2" in out and "runs/test-run" in out and "tinyderm" in out
    assert "cpu" in out and "AMP off" in out
    assert "resuming" not in out


def test_header_names_amp_dtype_and_resume_epoch(model):
    console, buf = make_console()
    trainer = make_trainer(model, amp_dtype=torch.bfloat16, start_epoch=4)
    ConsoleCallback(console, "plain").on_fit_start(trainer)
    assert "AMP bfloat16" in buf.getvalue()
    assert "resuming at epoch 4" in buf.getvalue()


# ------------------------------------------------------------------------------- progress


def test_plain_mode_prints_few_progress_lines_and_no_escapes(model):
    console, buf = make_console()
    best = {"metric": "val_acc", "value": 0.8, "epoch": 1}
    trainer = make_trainer(model, best=best, batches_per_epoch=40)
    cb = ConsoleCallback(console, "auto")
    assert cb.mode == "plain"
    run_epoch(cb, trainer, 1, metrics(1), batches=40)
    out = buf.getvalue()
    assert "\x1b[" not in out
    progress = [line for line in out.splitlines() if "batch " in line]
    assert [line.split("batch ")[1].split()[0] for line in progress] == ["10/40", "20/40", "30/40"]
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch 1/5")]
    assert len(epoch_lines) == 1
    assert "80.00%" in epoch_lines[0] and "1.00e-03 [2 groups]" in epoch_lines[0]
    assert "4,321 img/s" in epoch_lines[0]


def test_off_mode_prints_nothing_per_batch(model):
    console, buf = make_console(terminal=True)
    trainer = make_trainer(model)
    cb = ConsoleCallback(console, "off")
    cb.on_epoch_start(trainer, 1)
    for b in range(20):
        cb.on_batch_end(trainer, b, 0.5, stepped=True)
    assert buf.getvalue() == ""
    cb.on_epoch_end(trainer, metrics(1))
    assert "epoch 1/5" in buf.getvalue()  # the result line still comes


def test_bar_mode_shows_running_loss_and_ends_with_the_epoch_line(model):
    console, buf = make_console(terminal=True)
    trainer = make_trainer(model)
    cb = ConsoleCallback(console, "auto")
    assert cb.mode == "bar"
    run_epoch(cb, trainer, 1, metrics(1), batches=4)
    out = buf.getvalue()
    # Mean of 1, 1/2, 1/3, 1/4: the bar's final refresh shows the running loss.
    assert "8/8" not in out and "4/8" in out and "loss 0.5208" in out
    assert cb._progress is None  # stopped at epoch end
    assert "epoch 1/5" in out.split("\x1b[2K")[-1]


# ------------------------------------------------------------------------------ epoch line


def test_new_best_is_marked_and_green(model):
    console, buf = make_console(terminal=True)
    trainer = make_trainer(model, best={"metric": "val_acc", "value": 0.8, "epoch": 1})
    cb = ConsoleCallback(console, "plain")
    cb.on_epoch_end(trainer, metrics(1, val_acc=0.8))
    out = buf.getvalue()
    assert "(best)" in out
    assert f"{GREEN}acc 80.00%" in out


def test_drop_is_red_and_not_best(model):
    console, buf = make_console(terminal=True)
    best = {"metric": "val_acc", "value": 0.8, "epoch": 1}
    trainer = make_trainer(model, best=best, history=[metrics(1, 0.8), metrics(2, 0.7)])
    ConsoleCallback(console, "plain").on_epoch_end(trainer, metrics(2, val_acc=0.7))
    out = buf.getvalue()
    assert "(best)" not in out and GREEN not in out
    assert f"{RED}acc 70.00%" in out


def test_loss_monitor_turns_red_when_the_loss_rises(model):
    console, buf = make_console(terminal=True)
    trainer = make_trainer(model, best={"metric": "val_loss", "value": 0.5, "epoch": 1})
    previous = {**metrics(1), "val_loss": 0.5}
    trainer.history = [previous]
    ConsoleCallback(console, "plain").on_epoch_end(trainer, {**metrics(2), "val_loss": 0.6})
    assert f"{RED}loss 0.6000" in buf.getvalue()


def test_no_change_keeps_the_default_colour(model):
    console, buf = make_console(terminal=True)
    trainer = make_trainer(model, best={"metric": "val_acc", "value": 0.9, "epoch": 1})
    trainer.history = [metrics(1, 0.7)]
    ConsoleCallback(console, "plain").on_epoch_end(trainer, metrics(2, val_acc=0.75))
    out = buf.getvalue()
    assert GREEN not in out and RED not in out and "acc 75.00%" in out


# --------------------------------------------------------------------------------- notices


def test_plain_notice_is_a_framed_block(model):
    console, buf = make_console()
    cb = ConsoleCallback(console, "plain")
    lines = ["block2 unfrozen: 83,584 parameters", "lr warmup 2 epochs"]
    cb.on_notice(make_trainer(model), "stage", "STAGE 2: block 2 active", lines)
    out = buf.getvalue().splitlines()
    assert out[0].startswith("=" * 40) and out[-1].startswith("=" * 40)
    assert "STAGE 2: block 2 active" in out[1]
    assert [line.strip() for line in out[3:5]] == lines
    assert "\x1b[" not in buf.getvalue()


def test_plain_notice_names_a_warning(model):
    console, buf = make_console()
    ConsoleCallback(console, "plain").on_notice(make_trainer(model), "warning", "NaN loss", [])
    assert "WARNING: NaN loss" in buf.getvalue()


@pytest.mark.parametrize(("kind", "code"), [("stage", "\x1b[35m"), ("error", "\x1b[31m")])
def test_terminal_notice_is_a_coloured_panel(model, kind, code):
    console, buf = make_console(terminal=True)
    cb = ConsoleCallback(console, "bar")
    cb.on_notice(make_trainer(model), kind, "STAGE 2: block 2 active", ["block2 unfrozen"])
    out = buf.getvalue()
    assert "STAGE 2: block 2 active" in out and "block2 unfrozen" in out
    assert "╭" in out and code in out  # a panel with the kind's border colour


# --------------------------------------------------------------------------------- summary


def test_summary_lists_best_time_stop_reason_and_files(model):
    console, buf = make_console()
    ConsoleCallback(console, "plain").on_fit_end(make_trainer(model), finish())
    out = buf.getvalue()
    assert "training stopped: early stopping" in out
    assert "best val_acc" in out and "91.00%" in out
    assert "1h 02m 03s" in out
    for path in finish()["files"].values():
        assert path in out


def test_summary_without_stop_reason_says_finished(model):
    console, buf = make_console()
    ConsoleCallback(console, "plain").on_fit_end(make_trainer(model), finish(stopped=None))
    assert "training finished" in buf.getvalue() and "stopped" not in buf.getvalue()


# ------------------------------------------------------------------------------ misc


def test_only_the_main_process_prints(model):
    console, buf = make_console(terminal=True)
    trainer = make_trainer(model, is_main=False, start_epoch=2)
    cb = ConsoleCallback(console, "bar")
    cb.on_fit_start(trainer)
    run_epoch(cb, trainer, 1, metrics(1))
    cb.on_notice(trainer, "stage", "STAGE 2", ["x"])
    cb.on_fit_end(trainer, finish())
    assert buf.getvalue() == ""


def test_warn_is_yellow():
    console, buf = make_console(terminal=True)
    warn(console, "no GPU found: the full preset will be slow; use --preset cpu")
    out = buf.getvalue()
    assert "use --preset cpu" in out and "\x1b[33m" in out


def test_close_stops_a_live_bar_after_a_crash(model):
    console, buf = make_console(terminal=True)
    cb = ConsoleCallback(console, "bar")
    cb.on_epoch_start(make_trainer(model), 1)
    assert cb._progress is not None
    cb.close()
    assert cb._progress is None
    assert "\x1b[?25h" in buf.getvalue()  # the cursor is shown again
