"""UnfreezeSchedule: scheduled and plateau activations, gaps, scaling, group rates, resume."""

from __future__ import annotations

import io
import random
import re

import pytest
import torch

from training.callbacks.unfreeze import UnfreezeSchedule

NAN = float("nan")


def rising(n: int) -> list[float]:
    """A metric that improves every epoch, so the plateau rule never fires."""
    return [0.01 * e for e in range(1, n + 1)]


def run(
    schedule: UnfreezeSchedule, metrics: list[float], active: int = 1, first_epoch: int = 1
) -> list[tuple[int, int]]:
    """Call ``decide`` once per epoch like the callback will; returns (epoch, block) activations."""
    activations = []
    for epoch, metric in enumerate(metrics, start=first_epoch):
        block = schedule.decide(epoch, metric, active)
        if block is not None:
            assert block == active + 1  # blocks come in order, one at a time
            active = block
            activations.append((epoch, block))
    return activations


# --------------------------------------------------------------------------- activations


def test_default_schedule_activates_at_15_and_30():
    schedule = UnfreezeSchedule()
    reasons = []
    active = 1
    for epoch, metric in enumerate(rising(40), start=1):
        block = schedule.decide(epoch, metric, active)
        if block is not None:
            active = block
            reasons.append((epoch, block, schedule.last_reason))
            assert schedule.last_activation_epoch == epoch
    assert reasons == [
        (15, 2, "block 2: scheduled at epoch 15"),
        (30, 3, "block 3: scheduled at epoch 30"),
    ]


def test_sequence_of_pairs_equals_dict():
    pairs = UnfreezeSchedule([(3, 20), (2, 8)], plateau_patience=None)
    mapping = UnfreezeSchedule({2: 8, 3: 20}, plateau_patience=None)
    assert pairs.activate_at == mapping.activate_at == {2: 8, 3: 20}
    assert run(pairs, rising(25)) == run(mapping, rising(25)) == [(8, 2), (20, 3)]


def test_late_start_activates_one_block_per_gap():
    # Resumed without schedule state at epoch 40, both blocks are overdue: still one at a time,
    # min_gap apart, and never two in the same epoch.
    schedule = UnfreezeSchedule(plateau_patience=None, min_gap=5)
    assert schedule.decide(40, 0.5, 1) == 2
    assert schedule.decide(40, 0.5, 2) is None
    assert run(schedule, rising(10), active=2, first_epoch=41) == [(45, 3)]


def test_plateau_activates_early_and_respects_min_gap():
    # Improves until epoch 4, then flat: patience 3 fires at epoch 7. The counter restarts at
    # the activation and reaches 3 at epoch 10, but min_gap holds block 3 back until epoch 12.
    schedule = UnfreezeSchedule({2: 15, 3: 30}, plateau_patience=3, min_gap=5)
    metrics = [0.1, 0.2, 0.3, 0.4] + [0.4] * 16
    active, seen = 1, []
    for epoch, metric in enumerate(metrics, start=1):
        block = schedule.decide(epoch, metric, active)
        if block is not None:
            active = block
            seen.append((epoch, block, schedule.last_reason))
    assert seen == [
        (7, 2, "block 2: val_acc plateaued for 3 epochs"),
        (12, 3, "block 3: val_acc plateaued for 5 epochs"),
    ]


def test_first_activation_waits_min_gap_after_start():
    schedule = UnfreezeSchedule({2: 15, 3: 30}, plateau_patience=1, min_gap=5)
    assert run(schedule, [0.5] * 12) == [(5, 2), (10, 3)]


def test_improvement_resets_plateau_counter():
    schedule = UnfreezeSchedule({2: 15, 3: 30}, plateau_patience=3, min_gap=2)
    # Two flat epochs, a new best, two flat epochs: never three in a row before epoch 15.
    metrics = [0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3, 0.4, 0.4, 0.4, 0.5, 0.5, 0.5]
    assert run(schedule, metrics) == [(15, 2)]
    assert schedule.last_reason == "block 2: scheduled at epoch 15"


def test_plateau_in_min_mode():
    schedule = UnfreezeSchedule(
        {2: 15, 3: 30}, plateau_patience=2, min_gap=3, mode="min", monitor="val_loss"
    )
    # Falling loss is an improvement: nothing early while it falls, then a plateau.
    assert run(schedule, [1.0, 0.9, 0.8, 0.7, 0.6]) == []
    assert run(schedule, [0.65, 0.61], first_epoch=6) == [(7, 2)]
    assert schedule.last_reason == "block 2: val_loss plateaued for 2 epochs"


def test_nan_metric_counts_as_no_improvement():
    schedule = UnfreezeSchedule({2: 15, 3: 30}, plateau_patience=2, min_gap=2)
    assert run(schedule, [NAN, 0.5, NAN, NAN]) == [(4, 2)]
    assert schedule.best == 0.5


def test_plateau_rule_off():
    schedule = UnfreezeSchedule({2: 6, 3: 12}, plateau_patience=None, min_gap=3)
    assert run(schedule, [0.5] * 14) == [(6, 2), (12, 3)]


@pytest.mark.parametrize("patience", [1, 5, None])
def test_nothing_after_block_3(patience):
    schedule = UnfreezeSchedule({2: 2, 3: 4}, plateau_patience=patience, min_gap=1)
    assert [block for _, block in run(schedule, [0.5] * 30)] == [2, 3]
    assert all(schedule.decide(e, 0.1, 3) is None for e in range(31, 40))


def test_unscheduled_block_never_activates():
    schedule = UnfreezeSchedule({2: 5}, plateau_patience=1, min_gap=1)
    # The flat metric brings block 2 forward to epoch 2; block 3 has no epoch, so it never comes.
    assert run(schedule, [0.5] * 30) == [(2, 2)]
    assert schedule.final_activation_epoch() == 5


def test_empty_schedule_never_activates():
    schedule = UnfreezeSchedule({}, plateau_patience=1, min_gap=1)
    assert run(schedule, [0.5] * 10) == []
    assert schedule.final_activation_epoch() == 0


@pytest.mark.parametrize("seed", range(20))
def test_random_histories_keep_the_invariants(seed):
    # Whatever the metric does: blocks come in order, at most one per epoch, min_gap apart,
    # never later than scheduled, and all are in by final_activation_epoch().
    rng = random.Random(seed)
    schedule = UnfreezeSchedule({2: 12, 3: 24}, plateau_patience=rng.randint(1, 6), min_gap=4)
    metrics = [rng.choice([0.5, 0.6, rng.random()]) for _ in range(40)]
    activations = run(schedule, metrics)
    epochs = [epoch for epoch, _ in activations]
    assert [block for _, block in activations] == [2, 3]
    assert epochs[0] >= 4 and epochs[1] - epochs[0] >= 4
    assert all(epoch <= schedule.activate_at[block] for epoch, block in activations)
    assert epochs[-1] <= schedule.final_activation_epoch() == 24


# --------------------------------------------------------------------------- scaling


# --------------------------------------------------------------------------- learning rates


@pytest.mark.parametrize(
    ("block", "since", "expected"),
    [
        (2, 0.0, 0.05),  # 0.5 * 0.1 at activation
        (2, 1.0, 0.275),  # halfway through a 2-epoch warmup: 0.5 * 0.55
        (2, 2.0, 0.5),
        (2, 7.5, 0.5),  # stays at lr_mult after the warmup
        (3, 0.5, 0.325),  # 1.0 (not in lr_mult) * (0.1 + 0.9 * 0.25)
        (1, 3.0, 1.0),
    ],
)
def test_group_lr_factor_with_warmup(block, since, expected):
    schedule = UnfreezeSchedule(lr_mult={2: 0.5}, warmup_epochs=2.0)
    assert schedule.group_lr_factor(block, since) == pytest.approx(expected)


@pytest.mark.parametrize("since", [0.0, 0.3, 10.0])
def test_group_lr_factor_without_warmup_is_lr_mult(since):
    schedule = UnfreezeSchedule(lr_mult={2: 2.0, 3: 0.25})
    assert schedule.group_lr_factor(2, since) == 2.0
    assert schedule.group_lr_factor(3, since) == 0.25


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((4, 0.0), "group_lr_factor: block=4 is invalid; allowed: an int in 1..3"),
        ((2, -1.0), "group_lr_factor: epochs_since_activation=-1.0 is invalid"),
    ],
)
def test_group_lr_factor_validation(args, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        UnfreezeSchedule().group_lr_factor(*args)


def test_old_group_factor_compounds_per_later_activation():
    schedule = UnfreezeSchedule(old_group_decay=0.5)
    assert [schedule.old_group_factor(b, 3) for b in (1, 2, 3)] == [0.25, 0.5, 1.0]
    assert schedule.old_group_factor(1, 1) == 1.0
    assert UnfreezeSchedule().old_group_factor(1, 3) == 1.0
    with pytest.raises(ValueError, match=re.escape("old_group_factor: block=3 is invalid")):
        schedule.old_group_factor(3, 2)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (
            {"activate_at": {3: 30}},
            "UnfreezeSchedule.activate_at={3: 30} is invalid; allowed: blocks",
        ),
        ({"activate_at": {2: 10, 3: 20, 4: 30}}, "allowed: blocks 2..k without holes, k <= 3"),
        ({"activate_at": {2: 3}}, "activate_at[2]=3 is invalid; allowed: an int >= 5 (min_gap=5"),
        ({"activate_at": {2: 10, 3: 12}}, "activate_at[3]=12 is invalid; allowed: an int >= 15"),
        ({"activate_at": {2: 10.0}}, "activate_at[2]=10.0 is invalid"),
        ({"activate_at": [(2, 10), (2, 20)]}, "allowed: each block at most once"),
        ({"activate_at": [(2, 10, 1)]}, "UnfreezeSchedule.activate_at=[(2, 10, 1)] is invalid"),
        ({"activate_at": {"2": 10}}, "allowed: a dict block -> epoch"),
        ({"plateau_patience": 0}, "plateau_patience=0 is invalid; allowed: None or an int >= 1"),
        ({"min_gap": 0}, "UnfreezeSchedule.min_gap=0 is invalid; allowed: an int >= 1"),
        ({"mode": "maximize"}, "UnfreezeSchedule.mode='maximize' is invalid"),
        ({"lr_mult": {1: 2.0}}, "UnfreezeSchedule.lr_mult key=1 is invalid; allowed: a block in"),
        ({"lr_mult": {2: 0.0}}, "UnfreezeSchedule.lr_mult[2]=0.0 is invalid; allowed: a finite"),
        ({"lr_mult": [1.0]}, "UnfreezeSchedule.lr_mult=[1.0] is invalid"),
        ({"old_group_decay": 1.5}, "old_group_decay=1.5 is invalid; allowed: a float in (0, 1]"),
        ({"old_group_decay": 0}, "old_group_decay=0 is invalid"),
        ({"warmup_epochs": -1}, "warmup_epochs=-1 is invalid; allowed: a finite float >= 0"),
    ],
)
def test_validation_messages(kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        UnfreezeSchedule(**kwargs)


def test_decide_rejects_bad_active_blocks():
    with pytest.raises(ValueError, match=re.escape("decide: active_blocks=0 is invalid")):
        UnfreezeSchedule().decide(1, 0.5, 0)


def test_default_dicts_are_not_shared():
    first, second = UnfreezeSchedule(), UnfreezeSchedule()
    first.lr_mult[2] = 9.0
    first.activate_at[2] = 9
    assert second.lr_mult == {2: 1.0, 3: 1.0} and second.activate_at == {2: 15, 3: 30}


# --------------------------------------------------------------------------- resume


def make() -> UnfreezeSchedule:
    return UnfreezeSchedule({2: 15, 3: 30}, plateau_patience=3, min_gap=5)


# Improves, then stays flat: block 2 comes early at epoch 6; the counter reaches 3 again at
# epoch 9, but min_gap holds block 3 back until epoch 11.
HISTORY = [0.1, 0.2, 0.3] + [0.3] * 17


@pytest.mark.parametrize("cut", [2, 5, 6, 8, 10, 15])
def test_state_round_trip_gives_the_same_future(cut):
    whole = make()
    expected = run(whole, HISTORY)
    assert expected == [(6, 2), (11, 3)]

    first = make()
    before = run(first, HISTORY[:cut])
    active = 1 + len(before)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as in a checkpoint, read back with weights_only
    buffer.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    after = run(resumed, HISTORY[cut:], active=active, first_epoch=cut + 1)
    assert before + after == expected
    assert resumed.state_dict() == whole.state_dict()


def test_fresh_state_differs_from_resumed():
    # Without the saved state the plateau counter restarts, so the decision would differ:
    # the round trip above is not passing by accident.
    fresh = make()
    assert run(fresh, HISTORY[9:], active=2, first_epoch=10) == [(13, 3)]
