"""MetricsLogger: one JSON line per epoch, resume truncation, TensorBoard events, rank 0 only."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from training.callbacks.metrics_log import MetricsLogger, read_metrics, to_plain, truncate_metrics

KEYS = {
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "val_macro_f1",
    "lr",
    "active_blocks",
    "epoch_s",
    "images_per_s",
}


def metrics(epoch: int) -> dict:
    return {
        "epoch": epoch,
        "train_loss": 1.0 / epoch,
        "train_acc": 0.5 + 0.01 * epoch,
        "val_loss": 1.2 / epoch,
        "val_acc": 0.4 + 0.01 * epoch,
        "val_macro_f1": 0.3 + 0.01 * epoch,
        "lr": [1e-3, 5e-4],
        "active_blocks": 1 + (epoch > 2),
        "epoch_s": 2.5,
        "images_per_s": 1000.0,
    }


def make_trainer(run_dir, start_epoch: int = 1, is_main: bool = True) -> SimpleNamespace:
    return SimpleNamespace(
        run_dir=run_dir, start_epoch=start_epoch, epoch=start_epoch, is_main=is_main
    )


def fit(logger: MetricsLogger, trainer, epochs: range, crash: bool = False) -> None:
    logger.on_fit_start(trainer)
    for epoch in epochs:
        trainer.epoch = epoch
        logger.on_validation_end(trainer, metrics(epoch))
    if not crash:
        logger.on_fit_end(trainer, {})


def test_one_line_per_epoch_with_the_required_keys(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    fit(logger, make_trainer(tmp_path), range(1, 4))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[-1]) == {"event": "fit_end"}
    rows = [json.loads(line) for line in lines[:3]]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert set(row) == KEYS
        assert row["lr"] == [1e-3, 5e-4]
        assert isinstance(row["val_acc"], float) and isinstance(row["epoch"], int)
    assert read_metrics(tmp_path / "metrics.jsonl") == [metrics(e) for e in (1, 2, 3)]
    assert read_metrics(tmp_path / "metrics.jsonl", events=True)[-1] == {"event": "fit_end"}
    assert not (tmp_path / "tensorboard").exists()


def test_each_line_is_on_disk_before_the_run_ends(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    fit(logger, make_trainer(tmp_path), range(1, 3), crash=True)
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    logger.close()


def test_resume_drops_the_interrupted_epochs(tmp_path):
    # First run: epochs 1-4 written, then it dies inside epoch 5 with a half-written line.
    fit(MetricsLogger(tmp_path, tensorboard=False), make_trainer(tmp_path), range(1, 5))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 5, "train_lo')
    # The last checkpoint was after epoch 2: the run resumes at 3 and redoes 3 and 4.
    fit(MetricsLogger(tmp_path, tensorboard=False), make_trainer(tmp_path, 3), range(3, 6))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[2] == metrics(3)
    assert not list(tmp_path.glob("*.tmp"))  # no temp file left behind


def test_fresh_run_appends(tmp_path):
    fit(MetricsLogger(tmp_path, tensorboard=False), make_trainer(tmp_path), range(1, 3))
    fit(MetricsLogger(tmp_path, tensorboard=False), make_trainer(tmp_path), range(1, 2))
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 1]


def test_truncate_keeps_earlier_epochs_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3, 2)) + "\nnot json\n")
    truncate_metrics(path, 3)
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n{"epoch": 2}\n'


def test_read_metrics_skips_blank_and_broken_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"epoch": 1}\n\n[1, 2]\n{"epoch": 2}\n{"epo')
    assert read_metrics(path) == [{"epoch": 1}, {"epoch": 2}]


def test_to_plain_turns_tensors_and_numpy_into_json_types():
    value = {"a": torch.tensor(0.5), "b": np.float32(0.25), "c": (1, np.int64(2)), "d": [0.1]}
    assert to_plain(value) == {"a": 0.5, "b": 0.25, "c": [1, 2], "d": [0.1]}
    assert json.loads(json.dumps(to_plain(value))) == to_plain(value)


def _strict(constant: str):
    raise ValueError(f"{constant} is not JSON")


def test_non_finite_values_are_written_as_strict_json_null(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    trainer = make_trainer(tmp_path)
    logger.on_fit_start(trainer)
    nan = float("nan")
    diverged = {
        **metrics(1),
        "train_loss": nan,
        "val_loss": torch.tensor(float("inf")),
        "val_acc": np.float32(nan),
        "lr": [1e-3, -float("inf")],
        "per_class": np.array([0.5, nan]),
    }
    logger.on_validation_end(trainer, diverged)
    logger.on_fit_end(trainer, {"calibration": {"best": {"nll_before": nan}}})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    # A strict parser (NaN, Infinity and -Infinity refused) reads every line.
    rows = [json.loads(line, parse_constant=_strict) for line in lines]
    assert rows[0]["train_loss"] is None and rows[0]["val_loss"] is None
    assert rows[0]["val_acc"] is None and rows[0]["lr"] == [1e-3, None]
    assert rows[0]["per_class"] == [0.5, None] and rows[0]["epoch"] == 1
    assert rows[1]["calibration"]["best"]["nll_before"] is None
    assert read_metrics(tmp_path / "metrics.jsonl") == [rows[0]]
    # The resume still keeps the row (by its epoch) and drops the rest.
    truncate_metrics(tmp_path / "metrics.jsonl", 2)
    assert read_metrics(tmp_path / "metrics.jsonl", events=True) == [rows[0]]


def test_a_log_from_before_null_still_reads_its_nan(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "train_loss": NaN}\n')
    (row,) = read_metrics(path)
    assert row["epoch"] == 1 and row["train_loss"] != row["train_loss"]  # NaN


def test_metrics_with_tensor_values_are_written_as_numbers(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    trainer = make_trainer(tmp_path)
    logger.on_fit_start(trainer)
    logger.on_validation_end(trainer, {**metrics(1), "val_acc": torch.tensor(0.75)})
    logger.on_fit_end(trainer, {})
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["val_acc"] == 0.75


def test_tensorboard_scalars_and_notices(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, tensorboard=True)
    trainer = make_trainer(tmp_path)
    logger.on_fit_start(trainer)
    logger.on_validation_end(trainer, metrics(1))
    trainer.epoch = 2
    logger.on_notice(trainer, "stage", "STAGE 2: block 2 active", ["block2 unfrozen"])
    logger.on_validation_end(trainer, metrics(2))
    logger.on_fit_end(trainer, {})
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/acc", "val/loss", "val/acc", "val/macro_f1"}
    assert expected | {"lr/group0", "lr/group1", "active_blocks", "images_per_s"} <= tags
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("val/acc")] == [(1, 0.41), (2, 0.42)]
    assert "notices/text_summary" in acc.Tags()["tensors"]


def test_tensorboard_notice_names_its_kind_once(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, tensorboard=True)
    trainer = make_trainer(tmp_path)
    logger.on_fit_start(trainer)
    notices = [
        ("swa", "SWA finished: 2 epochs averaged"),
        ("rollback", "ROLLBACK 1/3: back to epoch 4"),
        ("dropout", "dropout"),
        ("rollback", "training diverged"),
    ]
    for step, (kind, title) in enumerate(notices, start=1):
        trainer.epoch = step
        logger.on_notice(trainer, kind, title, ["why"])
    logger.on_fit_end(trainer, {})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("notices/text_summary")]
    assert [t.split("\n\n")[0] for t in texts] == [
        "**SWA finished: 2 epochs averaged**",
        "**ROLLBACK 1/3: back to epoch 4**",
        "**dropout**",
        "**rollback: training diverged**",  # a title that does not say its kind keeps it
    ]


def test_other_ranks_write_nothing(tmp_path):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(run_dir, tensorboard=True)
    trainer = make_trainer(run_dir, is_main=False)
    fit(logger, trainer, range(1, 3))
    logger.on_notice(trainer, "warning", "x", [])
    assert not run_dir.exists()


def test_resume_hides_the_interrupted_tensorboard_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(MetricsLogger(tmp_path), make_trainer(tmp_path), range(1, 5))
    fit(MetricsLogger(tmp_path), make_trainer(tmp_path, 3), range(3, 5))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/acc")] == [1, 2, 3, 4]
