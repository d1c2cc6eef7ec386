"""Learning-rate schedules: warmup_cosine unchanged, the staged regimen, plateau state, figure."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from PIL import Image

from training.engine.schedule import (
    LR_PLOT_NAME,
    LRSchedule,
    Marker,
    PlateauState,
    StagedSchedule,
    plot_schedule,
    staged_lr,
    warmup_cosine,
)

DEFAULT = StagedSchedule()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def lr_at(epoch: float, sched: StagedSchedule = DEFAULT, scale: float = 1.0) -> float:
    """The staged lr at a whole-step position, with 100 steps per epoch."""
    return staged_lr(round(epoch * 100), 100, sched, scale)


def run_plateau(state: PlateauState, metrics: dict[int, float], mode: str = "max") -> list[int]:
    """Feed ``{epoch: metric}`` in epoch order; return the epochs whose update reduced."""
    return [e for e, m in sorted(metrics.items()) if state.update(e, m, mode)]


# --------------------------------------------------------------------------- warmup_cosine


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.1), (9, 1.0), (10, 1.0), (55, 0.55), (100, 0.1), (150, 0.1)],
)
def test_warmup_cosine_unchanged(step, expected):
    # warmup 10 -> (step + 1) / 10; cosine to 0.1 at 100; the midpoint of the cosine is 0.55.
    got = warmup_cosine(step, warmup_steps=10, total_steps=100, min_ratio=0.1)
    assert got == pytest.approx(expected)


# --------------------------------------------------------------------------- staged values


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (0, 1e-2 / 25),  # warmup starts at peak / 25
        (2.5, (1e-2 / 25 + 1e-2) / 2),  # linear: halfway at the middle
        (5, 1e-2),  # end of warmup = peak
        (12.5, (1e-2 + 2e-3) / 2),  # middle of the one-cycle cosine
        (20, 2e-3),  # end of the one-cycle
        (30, (2e-3 + 1e-3) / 2),  # middle of the cosine phase
        (40, 1e-3),  # start of the plateau phase
        (55, 1e-3),  # the plateau holds without reductions
    ],
)
def test_staged_values_at_boundaries_and_midpoints(epoch, expected):
    assert lr_at(epoch) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("start", "end", "direction"),
    [(0, 5, 1), (5, 20, -1), (20, 40, -1)],
    ids=["warmup", "onecycle", "cosine"],
)
def test_monotonic_within_phases(start, end, direction):
    lrs = [staged_lr(s, 10, DEFAULT) for s in range(start * 10, end * 10)]
    steps = [direction * (b - a) for a, b in zip(lrs, lrs[1:], strict=False)]
    assert all(d > 0 for d in steps), "each step moves the lr the phase's way"


def reference(epoch: float) -> float:
    """The default regimen written out by hand, independent of the module's phase code."""
    if epoch < 5:
        return 4e-4 + (1e-2 - 4e-4) * epoch / 5
    if epoch < 20:
        return 2e-3 + (1e-2 - 2e-3) * 0.5 * (1 + math.cos(math.pi * (epoch - 5) / 15))
    if epoch < 40:
        return 1e-3 + (2e-3 - 1e-3) * 0.5 * (1 + math.cos(math.pi * (epoch - 20) / 20))
    return 1e-3


@pytest.mark.parametrize("steps_per_epoch", [1, 3, 7])
def test_per_step_granularity(steps_per_epoch):
    # The lr at step k is the curve at epoch k / steps_per_epoch, with no per-epoch staircase.
    for k in range(45 * steps_per_epoch):
        got = staged_lr(k, steps_per_epoch, DEFAULT)
        assert got == pytest.approx(reference(k / steps_per_epoch), rel=1e-12)
    inside = [staged_lr(k, 7, DEFAULT) for k in range(7 * 2, 7 * 3)]
    assert len(set(inside)) == 7, "the warmup moves at every step inside an epoch"


@pytest.mark.parametrize("epoch", [0, 10, 30])
def test_plateau_scale_only_applies_in_plateau_phase(epoch):
    assert lr_at(epoch, scale=0.01) == lr_at(epoch)


def test_warmup_of_zero_starts_at_peak():
    sched = StagedSchedule(warmup_epochs=0)
    assert lr_at(0, sched) == pytest.approx(1e-2)


# --------------------------------------------------------------------------- floors


@pytest.mark.parametrize(
    ("epoch", "scale", "expected"),
    [
        (45, 0.01, 1e-3),  # 1e-5 wanted, floor 1e-3 before epoch 50
        (49.99, 0.1, 1e-3),
        (50, 0.1, 1e-4),  # the second floor starts: one reduction now shows
        (60, 0.01, 1e-4),  # never under 1e-4 after 50
        (60, 0.5, 5e-4),  # above the floor, the scale acts
    ],
)
def test_floors_bound_the_plateau(epoch, scale, expected):
    assert lr_at(epoch, scale=scale) == pytest.approx(expected)


def test_floors_apply_to_the_whole_curve():
    sched = StagedSchedule(floors=((10, 5e-3), (30, 1.2e-3)))
    assert lr_at(9.99, sched) > 5e-3  # before the floor: the one-cycle value
    assert lr_at(15, sched) == pytest.approx(5e-3)  # one-cycle is 4.4e-3 here
    assert lr_at(35, sched) == pytest.approx(1.2e-3)
    assert sched.floor_at(0) == 0.0 and sched.floor_at(30) == 1.2e-3


def test_plateau_state_cannot_go_under_floor_then_reaches_next():
    state = PlateauState(DEFAULT)
    flat = {e: 0.5 for e in range(41, 62)}
    reduced = run_plateau(state, flat)
    # Before 50 the scale is held at floor 1e-3 / cosine_end 1e-3 = 1; the first reduction that
    # takes effect at or after 50 goes to 1e-4, and the floor stops any further cut.
    assert reduced == [50]
    assert state.scale == pytest.approx(0.1)
    assert lr_at(61, scale=state.scale) == pytest.approx(1e-4)


def test_plateau_scale_clipped_at_floor_not_past_it():
    sched = StagedSchedule(cosine_end=1e-3, floors=((40, 3e-4),))
    state = PlateauState(sched)
    reduced = run_plateau(state, {e: 0.5 for e in range(41, 60)})
    assert reduced == [44], "0.1 would go under the floor, so it stops at the floor, once"
    assert state.scale == pytest.approx(0.3)


# --------------------------------------------------------------------------- PlateauState


@pytest.mark.parametrize("patience", [1, 3, 5])
def test_plateau_counts_patience(patience):
    sched = StagedSchedule(floors=(), plateau_patience=patience)
    state = PlateauState(sched)
    assert not state.update(41, 0.80, "max")  # first plateau epoch: the baseline
    for i in range(patience - 1):
        assert not state.update(42 + i, 0.79, "max")
    assert state.update(41 + patience, 0.79, "max")
    assert state.scale == pytest.approx(0.1)
    assert state.reductions == [41 + patience]
    assert state.bad_epochs == 0, "the count restarts after a reduction"


def test_plateau_ignores_epochs_before_the_plateau_phase():
    sched = StagedSchedule(floors=(), plateau_patience=2)
    state = PlateauState(sched)
    # A great early metric and bad epochs up to epoch 40 (trained over [39, 40)) leave no trace.
    assert run_plateau(state, {10: 0.99, 38: 0.1, 39: 0.1, 40: 0.1}) == []
    assert state.best is None and state.bad_epochs == 0
    assert run_plateau(state, {41: 0.5, 42: 0.5}) == []  # baseline, then one bad epoch
    assert state.update(43, 0.4, "max")


@pytest.mark.parametrize(
    ("mode", "better", "worse"),
    [("max", 0.9, 0.7), ("min", 0.3, 0.6)],
)
def test_plateau_improvement_resets_count(mode, better, worse):
    state = PlateauState(StagedSchedule(floors=(), plateau_patience=2))
    seq = {41: 0.5, 42: worse, 43: better, 44: worse}
    assert run_plateau(state, seq, mode) == []
    assert state.best == better and state.bad_epochs == 1
    assert state.update(45, worse, mode)


def test_plateau_min_delta_and_nan():
    state = PlateauState(StagedSchedule(floors=(), plateau_patience=3, plateau_min_delta=0.01))
    # +0.005 is under min_delta and NaN is never an improvement: three bad epochs.
    assert run_plateau(state, {41: 0.5, 42: 0.505, 43: math.nan, 44: 0.509}) == [44]
    assert state.best == 0.5


def test_plateau_state_dict_round_trip():
    sched = StagedSchedule(floors=(), plateau_patience=2)
    state = PlateauState(sched)
    run_plateau(state, {41: 0.5, 42: 0.4, 43: 0.4, 44: 0.45})
    saved = state.state_dict()
    resumed = PlateauState(sched)
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == saved
    assert saved["reductions"] == [43] and saved["bad_epochs"] == 1
    # Both now decide the same: one more bad epoch reduces.
    assert resumed.update(45, 0.3, "max") and state.update(45, 0.3, "max")
    assert resumed.scale == state.scale == pytest.approx(0.01)


def test_plateau_bad_mode_and_state():
    state = PlateauState(DEFAULT)
    with pytest.raises(ValueError, match=r"mode='acc'.*max \| min"):
        state.update(41, 0.5, "acc")
    with pytest.raises(ValueError, match=r"scale.*\(0, 1\]"):
        state.load_state_dict({"scale": 0.0, "best": None, "bad_epochs": 0, "reductions": []})


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"peak": 0.0}, r"peak=0\.0 .*> 0"),
        ({"peak": math.nan}, r"peak=nan .*finite"),
        ({"warmup_epochs": -1}, r"warmup_epochs=-1 .*>= 0"),
        ({"onecycle_end_epoch": 5}, r"onecycle_end_epoch=5 .*> warmup_epochs=5"),
        ({"cosine_end_epoch": 15}, r"cosine_end_epoch=15 .*> onecycle_end_epoch=20"),
        ({"onecycle_end": 0.02}, r"onecycle_end=0\.02 .*\(0, peak=0\.01\]"),
        ({"cosine_end": 3e-3}, r"cosine_end=0\.003 .*\(0, onecycle_end=0\.002\]"),
        ({"plateau_factor": 1.0}, r"plateau_factor=1\.0 .*\(0, 1\)"),
        ({"plateau_factor": 0}, r"plateau_factor=0 .*\(0, 1\)"),
        ({"plateau_patience": 0}, r"plateau_patience=0 .*integer >= 1"),
        ({"plateau_patience": 2.5}, r"plateau_patience=2\.5 .*integer >= 1"),
        ({"plateau_min_delta": -0.1}, r"plateau_min_delta=-0\.1 .*>= 0"),
        ({"floors": ((50, 1e-4), (40, 1e-3))}, r"floors\[1\]\.from_epoch=40 .*> 50"),
        ({"floors": ((40, 0.0),)}, r"floors\[0\]\.min_lr=0\.0 .*> 0"),
        ({"floors": ((-1, 1e-3),)}, r"floors\[0\]\.from_epoch=-1 .*>= 0"),
        ({"floors": 5}, r"floors=5 .*pairs"),
    ],
)
def test_validation_names_field_value_and_range(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        StagedSchedule(**kwargs)


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: staged_lr(0, 0, DEFAULT), r"steps_per_epoch=0 .*integer >= 1"),
        (lambda: staged_lr(-1, 10, DEFAULT), r"step=-1 .*>= 0"),
        (lambda: staged_lr(0, 10, DEFAULT, 0.0), r"plateau_scale=0\.0 .*\(0, 1\]"),
        (lambda: DEFAULT.factor_fn(10, 0.0), r"base_lr=0\.0 .*> 0"),
    ],
)
def test_function_arguments_validated(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_frozen_and_floors_normalised():
    sched = StagedSchedule(floors=[[40, 1e-3]])
    assert sched.floors == ((40, 1e-3),)
    assert hash(sched) == hash(StagedSchedule(floors=[(40, 1e-3)]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        sched.peak = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------- LRSchedule


def test_lr_schedule_drives_groups_with_their_ratio():
    base_lr, spe = 1e-2, 4
    state = PlateauState(DEFAULT)
    w1, w2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([w1], lr=base_lr)
    schedule = LRSchedule(optimizer, DEFAULT.factor_fn(spe, base_lr, state))
    assert schedule.lrs() == [pytest.approx(1e-2 / 25)]
    for _ in range(10 * spe):
        schedule.step()
    # A block unfrozen later, trained at a tenth of the base lr, joins at step 40.
    optimizer.add_param_group({"params": [w2], "lr": 0.0, "base_lr": base_lr * 0.1})
    schedule.apply()
    for _ in range(35 * spe):  # to epoch 45
        schedule.step()
        expected = reference(schedule.last_step / spe)
        assert schedule.lrs() == [pytest.approx(expected), pytest.approx(expected * 0.1)]
    # A plateau reduction is read at the next step; the floor is on the staged (base) curve, so
    # before epoch 50 it holds the base group at 1e-3 and the late group at its tenth of that.
    state.scale = 0.1
    schedule.step()
    assert schedule.lrs() == [pytest.approx(1e-3), pytest.approx(1e-4)]
    while schedule.last_step < 50 * spe:
        schedule.step()
    assert schedule.lrs() == [pytest.approx(1e-4), pytest.approx(1e-5)]


# --------------------------------------------------------------------------- figure


def test_plot_written_as_png_into_folder(tmp_path):
    out = plot_schedule(DEFAULT, 5, 60, tmp_path / "run", plateau_epochs=(44, 53))
    assert out == tmp_path / "run" / LR_PLOT_NAME
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in out.parent.iterdir()) == [LR_PLOT_NAME], "no temp file left"


def test_plot_replaces_named_file(tmp_path):
    target = tmp_path / "sched.png"
    target.write_bytes(b"old")
    short = dataclasses.replace(
        DEFAULT, warmup_epochs=1, onecycle_end_epoch=4, cosine_end_epoch=8, floors=((8, 1e-3),)
    )
    assert plot_schedule(short, 3, 12, target) == target
    assert target.read_bytes()[:8] == PNG_MAGIC


def test_plot_rejects_reduction_before_plateau(tmp_path):
    with pytest.raises(ValueError, match=r"plateau_epochs=\(30,\).*cosine_end_epoch=40"):
        plot_schedule(DEFAULT, 2, 60, tmp_path, plateau_epochs=(30,))
    assert not (tmp_path / LR_PLOT_NAME).exists()


def test_plot_draws_the_plans_spans_in_lanes_under_the_curve(tmp_path):
    plain = plot_schedule(DEFAULT, 5, 60, tmp_path / "plain.png")
    moment = [Marker("block 2 joins", 15.0)]
    spans = [Marker("SWA", 44.0, 60.0, "epochs 45-60 averaged"), Marker("Mixup", 0.0, 15.0)]
    marked = plot_schedule(DEFAULT, 5, 60, tmp_path / "marked.png", markers=[*moment, *spans])
    late = plot_schedule(DEFAULT, 5, 60, tmp_path / "late.png", markers=[Marker("SWA", 61, 70)])
    height = {p.stem: Image.open(p).size[1] for p in (plain, marked, late)}
    assert height["marked"] > height["plain"]  # the lanes add height
    assert height["late"] == height["plain"]  # a span after the run is left out
    assert (
        plain.read_bytes()
        != plot_schedule(DEFAULT, 5, 60, tmp_path / "m.png", markers=moment).read_bytes()
    )


def test_plot_of_a_schedule_without_floors(tmp_path):
    # schedule.floor_epochs=[] with floor_lrs=[] is a valid config: its plot must not fail.
    bare = dataclasses.replace(DEFAULT, floors=())
    assert plot_schedule(bare, 3, 60, tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC
