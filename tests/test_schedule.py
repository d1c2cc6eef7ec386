"""Learning-rate schedules: warmup + cosine, and the staged regimen with plateau and floors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from training.schedule import (
    LRSchedule,
    PlateauState,
    StagedSchedule,
    plot_schedule,
    scaled,
    staged_lr,
    warmup_cosine,
)

S = StagedSchedule()  # the designed defaults: 5 / 20 / 40, peak 1e-2, floors at 40 and 50


def lr_at(epoch: float, steps_per_epoch: int = 10, scale: float = 1.0) -> float:
    return staged_lr(round(epoch * steps_per_epoch), steps_per_epoch, S, scale)


def test_warmup_cosine_values():
    f = dict(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert warmup_cosine(0, **f) == pytest.approx(0.25)
    assert warmup_cosine(4, **f) == pytest.approx(1.0)
    assert warmup_cosine(9, **f) == pytest.approx(0.55)
    assert warmup_cosine(14, **f) == pytest.approx(0.1) == pytest.approx(warmup_cosine(99, **f))


@pytest.mark.parametrize(
    "epoch, expected",
    [
        (0, 1e-2 / 25),
        (5, 1e-2),
        (12.5, (1e-2 + 2e-3) / 2),  # middle of the one-cycle cosine
        (20, 2e-3),
        (30, (2e-3 + 1e-3) / 2),  # middle of the cosine phase
        (40, 1e-3),
        (55, 1e-3),  # plateau phase without reductions
    ],
)
def test_staged_values_at_boundaries(epoch, expected):
    assert lr_at(epoch) == pytest.approx(expected, rel=1e-9)


def test_staged_is_monotonic_within_phases_and_per_step():
    for lo, hi, direction in ((0, 5, 1), (5, 20, -1), (20, 40, -1)):
        values = [staged_lr(s, 7, S) for s in range(lo * 7, hi * 7)]
        diffs = [direction * (b - a) for a, b in zip(values, values[1:], strict=False)]
        assert all(d > 0 for d in diffs)
    assert staged_lr(33, 10, S) == pytest.approx(lr_at(3.3, 100))


def test_floors_bound_plateau_reductions():
    # A scale of 0.01 would give 1e-5; the floor holds 1e-3 until epoch 50, then 1e-4.
    assert lr_at(45, scale=0.01) == pytest.approx(1e-3)
    assert lr_at(50, scale=0.01) == pytest.approx(1e-4)
    assert lr_at(51, scale=0.5) == pytest.approx(5e-4)


def test_plateau_counts_only_in_its_phase_and_respects_floors():
    p = PlateauState(S)
    for epoch in range(1, 41):  # epochs before the plateau phase never count
        assert not p.update(epoch, 0.5, "max")
    reduced = [p.update(epoch, 0.5, "max") for epoch in range(41, 60)]
    assert p.reductions and reduced.count(True) == len(p.reductions)
    # epoch 41 sets the best; before epoch 50 the floor 1e-3 (= cosine_end) blocks every cut and
    # restarts the count (bad at 42-44, 45-47), so the first cut lands on 48-50.
    assert p.reductions[0] == 50
    assert p.scale == pytest.approx(0.1)
    assert staged_lr(600, 10, S, p.scale) == pytest.approx(1e-4)


def test_plateau_improvement_resets_and_state_round_trip():
    p = PlateauState(S)
    for epoch, metric in ((51, 0.5), (52, 0.5), (53, 0.6), (54, 0.6)):
        p.update(epoch, metric, "max")
    assert p.bad_epochs == 1 and p.best == 0.6
    q = PlateauState(S)
    q.load_state_dict(p.state_dict())
    for epoch in range(55, 62):
        assert p.update(epoch, 0.6, "max") == q.update(epoch, 0.6, "max")
    assert p.scale == q.scale


def test_scaled_boundaries():
    short = scaled(S, 0.2)
    assert (short.warmup_epochs, short.onecycle_end_epoch, short.cosine_end_epoch) == (1, 4, 8)
    assert [start for start, _ in short.floors] == [8, 10]


@pytest.mark.parametrize(
    "change, match",
    [
        ({"peak": -1.0}, "peak"),
        ({"plateau_factor": 1.5}, "plateau_factor"),
        ({"onecycle_end_epoch": 3}, "onecycle_end_epoch"),
    ],
)
def test_invalid_schedules_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(S, **change)


def test_late_group_follows_the_staged_curve_with_its_ratio():
    w1, w2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w1], lr=1e-2)
    sched = LRSchedule(opt, S.factor_fn(10, 1e-2))
    for _ in range(100):
        sched.step()
    opt.add_param_group({"params": [w2], "lr": 5e-3, "base_lr": 5e-3})  # half the base rate
    for _ in range(150):
        sched.step()
    a, b = sched.lrs()
    assert a == pytest.approx(lr_at(25))
    assert b == pytest.approx(a / 2)


def test_plot_writes_png(tmp_path):
    path = plot_schedule(S, 10, 60, tmp_path / "lr_schedule.png", plateau_epochs=[53])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["lr_schedule.png"]
    assert not math.isnan(lr_at(60))
