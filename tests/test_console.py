"""ConsoleCallback: header, progress per mode, epoch lines and their colours, banners, summary."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from rich.text import Text

from dataset.cache import CacheInfo
from models.basic_cnn_model import BasicCNNModel, ModelConfig
from models.staged import stage_summary
from training.callbacks.console import ConsoleCallback, resolve_mode, warn

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
        direction="grow",
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
    rows = {r["name"]: r for r in stage_summary(model)}
    assert rows["block2"]["params"] > 0 and not rows["block2"]["active"]
    assert f"{rows['block2']['params']:,}" in out
    assert f"{rows['block1']['trainable']:,}" in out
    assert "16 x 2" in out and "runs/test-run" in out and "tinyderm" in out
    assert "cpu" in out and "AMP off" in out
    assert "basic_cnn, 3 stages, grows from stage 1" in out
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
    cb = ConsoleCallback(console, "auto", quiet_seconds=0)
    assert cb.mode == "plain"
    run_epoch(cb, trainer, 1, metrics(1), batches=40)
    out = buf.getvalue()
    assert "\x1b[" not in out
    progress = [line for line in out.splitlines() if "batch " in line]
    assert [line.split("batch ")[1].split()[0] for line in progress] == ["10/40", "20/40", "30/40"]
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch 1/5")]
    assert len(epoch_lines) == 1
    assert "80.00%" in epoch_lines[0] and "lr 1.00e-03" in epoch_lines[0]


def test_plain_mode_keeps_a_short_epoch_to_its_result_line(model):
    console, buf = make_console()
    trainer = make_trainer(model, batches_per_epoch=40)
    cb = ConsoleCallback(console, "plain", quiet_seconds=3600)
    run_epoch(cb, trainer, 1, metrics(1), batches=40)
    lines = buf.getvalue().splitlines()
    assert [line for line in lines if "batch " in line] == []
    assert len([line for line in lines if line.startswith("epoch 1/5")]) == 1


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
    assert "new best" in out
    assert f"{GREEN}80.00%" in out


def test_drop_is_red_and_not_best(model):
    console, buf = make_console(terminal=True)
    best = {"metric": "val_acc", "value": 0.8, "epoch": 1}
    trainer = make_trainer(model, best=best, history=[metrics(1, 0.8), metrics(2, 0.7)])
    ConsoleCallback(console, "plain").on_epoch_end(trainer, metrics(2, val_acc=0.7))
    out = buf.getvalue()
    assert "new best" not in out and GREEN not in out
    assert f"{RED}70.00%" in out


def test_loss_monitor_turns_red_when_the_loss_rises(model):
    console, buf = make_console(terminal=True)
    trainer = make_trainer(model, best={"metric": "val_loss", "value": 0.5, "epoch": 1})
    previous = {**metrics(1), "val_loss": 0.5}
    trainer.history = [previous]
    ConsoleCallback(console, "plain").on_epoch_end(trainer, {**metrics(2), "val_loss": 0.6})
    assert f"{RED}0.6000" in buf.getvalue()


def test_no_change_keeps_the_default_colour(model):
    console, buf = make_console(terminal=True)
    trainer = make_trainer(model, best={"metric": "val_acc", "value": 0.9, "epoch": 1})
    trainer.history = [metrics(1, 0.7)]
    ConsoleCallback(console, "plain").on_epoch_end(trainer, metrics(2, val_acc=0.75))
    out = buf.getvalue()
    assert GREEN not in out and RED not in out and " 75.00%" in out


# ------------------------------------------------------------------------- epoch line text


def test_epoch_line_says_where_the_run_is_stage_lr_and_best_so_far(model):
    console, buf = make_console()
    best = {"metric": "val_acc", "value": 0.9, "epoch": 3}
    trainer = make_trainer(model, best=best, history=[metrics(3, 0.9)])
    ConsoleCallback(console, "plain").on_epoch_end(trainer, metrics(4, val_acc=0.85))
    line = buf.getvalue().strip()
    assert line.startswith("epoch 4/5  stage 2/3  ")  # 2 of the model's 3 blocks active
    assert "train 0.5000 81.00%" in line and "val 0.6000 85.00%" in line
    assert "f1 70.00%" in line and "lr 1.00e-03" in line and "12.3s" in line
    assert line.endswith("best 90.00% @3")
    assert len(line) <= 110  # fits a README-wide terminal


def test_epoch_lines_keep_their_columns_across_digit_counts(model):
    console, buf = make_console()
    trainer = make_trainer(model, best={"metric": "val_acc", "value": 0.99, "epoch": 1})
    trainer.config.run.epochs = 10
    cb = ConsoleCallback(console, "plain")
    cb.on_epoch_end(trainer, {**metrics(9, val_acc=0.095), "train_acc": 0.5})
    cb.on_epoch_end(trainer, {**metrics(10, val_acc=0.95), "train_acc": 0.999})
    short, long = buf.getvalue().splitlines()
    assert short.startswith("epoch  9/10") and long.startswith("epoch 10/10")
    for field in ("stage", "train", "val", "f1", "lr", "best"):
        assert short.index(f" {field} ") == long.index(f" {field} "), field


# ------------------------------------------------------------------------------- banners


def test_plain_block_banner_is_a_titled_frame_with_indented_lines(model):
    console, buf = make_console()
    cb = ConsoleCallback(console, "plain")
    lines = ["block2 unfrozen: 83,584 parameters", "lr warmup 2 epochs"]
    cb.on_notice(make_trainer(model), "stage", "STAGE 2: block 2 active", lines)
    out = buf.getvalue().splitlines()
    assert len(out) == 3  # no separator or closing frame
    assert out[0].startswith("== STAGE 2: block 2 active ==") and out[0].endswith("=")
    assert out[1:] == [f"   {line}" for line in lines]
    assert "\x1b[" not in buf.getvalue()


@pytest.mark.parametrize("terminal", [False, True])
def test_a_one_line_decision_is_one_line(model, terminal):
    console, buf = make_console(terminal)
    cb = ConsoleCallback(console, "plain" if not terminal else "bar")
    reason = "gap +0.0875 > overfit_gap 0.05: dropout raised [0.0, 0.05] -> [0.05, 0.1]"
    cb.on_notice(make_trainer(model), "dropout", "dropout", [reason])
    out = Text.from_ansi(buf.getvalue()).plain
    assert out.count("\n") == 1 and "dropout: gap +0.0875" in out and reason in out
    assert "╭" not in out


@pytest.mark.parametrize("terminal", [False, True])
def test_a_banner_title_that_names_its_kind_is_shown_once(model, terminal):
    console, buf = make_console(terminal)
    cb = ConsoleCallback(console, "bar" if terminal else "plain")
    trainer = make_trainer(model)
    cb.on_notice(trainer, "swa", "SWA finished: 2 epochs averaged", ["saved swa.pt"])
    cb.on_notice(trainer, "rollback", "ROLLBACK 1/3: back to epoch 4", ["nan", "restored"])
    out = Text.from_ansi(buf.getvalue()).plain
    assert out.count("SWA") == 1 and out.count("ROLLBACK") == 1
    assert "swa:" not in out.casefold() and "rollback:" not in out.casefold()


def test_plain_warning_is_one_named_line(model):
    console, buf = make_console()
    cb = ConsoleCallback(console, "plain")
    cb.on_notice(make_trainer(model), "warning", "rollback pending", ["val_acc fell", "wait 1"])
    assert buf.getvalue() == "WARNING: rollback pending; val_acc fell; wait 1\n"


@pytest.mark.parametrize(("kind", "code"), [("stage", "\x1b[35m"), ("rollback", "\x1b[31m")])
def test_terminal_block_banner_is_a_coloured_panel(model, kind, code):
    console, buf = make_console(terminal=True)
    cb = ConsoleCallback(console, "bar")
    cb.on_notice(make_trainer(model), kind, "STAGE 2: block 2 active", ["block2 unfrozen", "x"])
    out = buf.getvalue()
    assert "STAGE 2: block 2 active" in out and "block2 unfrozen" in out
    assert "╭" in out and code in out  # a panel with the kind's border colour


def test_a_notice_without_banner_is_not_printed(model):
    console, buf = make_console()
    cb = ConsoleCallback(console, "plain")
    trainer = make_trainer(model)
    cb.on_notice(trainer, "schedule", "learning rate reduced on plateau", ["x"], banner=False)
    assert buf.getvalue() == ""


@pytest.mark.parametrize("mode", ["plain", "bar"])
def test_decisions_follow_their_epoch_line_and_warnings_come_at_once(model, mode):
    console, buf = make_console(terminal=mode == "bar")
    trainer = make_trainer(model)
    cb = ConsoleCallback(console, mode)
    cb.on_epoch_start(trainer, 2)
    cb.on_notice(trainer, "warning", "non-finite loss", ["epoch 2, batch 3: nan"])
    cb.on_notice(trainer, "stage", "STAGE 3: block 3 active", ["a", "b"])
    cb.on_notice(trainer, "balance", "class penalty", ["normal 1.00 -> 1.50 since the start"])
    assert "non-finite loss" in buf.getvalue() and "STAGE 3" not in buf.getvalue()
    cb.on_epoch_end(trainer, metrics(2))
    out = Text.from_ansi(buf.getvalue()).plain
    order = [
        out.index(s) for s in ("non-finite loss", "epoch 2/5  stage", "STAGE 3", "class penalty")
    ]
    assert order == sorted(order)
    cb.on_notice(trainer, "swa", "SWA finished: 3 epochs averaged", ["saved swa.pt"])
    assert "SWA finished" in buf.getvalue()  # between epochs: at once


def test_decisions_of_an_epoch_that_never_ended_still_show(model):
    console, buf = make_console()
    trainer = make_trainer(model)
    cb = ConsoleCallback(console, "plain")
    cb.on_epoch_start(trainer, 3)
    cb.on_notice(trainer, "rollback", "training diverged", ["loss is nan"])
    cb.on_fit_end(trainer, finish(stopped="diverged: loss is nan"))
    out = buf.getvalue()
    assert out.index("training diverged") < out.index("training stopped: diverged")


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


def test_summary_shows_the_temperatures_with_their_tta(model):
    console, buf = make_console()
    calibration = {
        "best": {
            "temperature": 1.066,
            "nll_before": 0.1185,
            "nll_after": 0.1181,
            "ece_before": 0.0203,
            "ece_after": 0.0254,
            "tta": "none",
        },
        "swa": {
            "temperature": 1.321,
            "nll_before": 0.1236,
            "nll_after": 0.1164,
            "ece_before": 0.0232,
            "ece_after": 0.0151,
            "tta": "d4",
        },
    }
    ConsoleCallback(console, "plain").on_fit_end(
        make_trainer(model), {**finish(), "calibration": calibration}
    )
    rows = {line.split("  ")[0]: line for line in buf.getvalue().splitlines()}
    assert "T=1.066  NLL 0.1185 -> 0.1181  ECE 2.03% -> 2.54%" in rows["temperature best"]
    assert "tta" not in rows["temperature best"]
    assert rows["temperature swa"].rstrip().endswith("ECE 2.32% -> 1.51%  tta=d4")


def test_summary_says_why_a_temperature_was_kept_at_one(model):
    console, buf = make_console()
    reason = "every validation image is right (40 of 40), so T is not identifiable"
    kept = {"temperature": 1.0, "nll_before": 0.0004, "nll_after": 0.0004, "reason": reason}
    calibration = {"best": {**kept, "ece_before": 0.001, "ece_after": 0.001, "tta": "none"}}
    ConsoleCallback(console, "plain").on_fit_end(
        make_trainer(model), {**finish(), "calibration": calibration}
    )
    shown = " ".join(buf.getvalue().split())  # the row may wrap
    assert f"T=1.000 NLL 0.0004 -> 0.0004 ECE 0.10% -> 0.10% (kept at 1: {reason})" in shown


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


def test_header_names_a_source_once_when_it_is_the_cache_name():
    from training.callbacks.console import _data_name

    assert _data_name("bloodcells_mini", "bloodcells_mini") == "bloodcells_mini"
    assert _data_name("brain", "../data/brain.npz") == "brain (../data/brain.npz)"
