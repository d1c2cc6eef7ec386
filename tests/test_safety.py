"""RollbackPolicy and EarlyStopping: each rule checked on hand-written metric histories."""

from __future__ import annotations

import io
import re

import pytest
import torch

from training.callbacks.early_stop import EarlyStopping
from training.callbacks.rollback import RollbackDecision, RollbackPolicy

NAN, INF = float("nan"), float("inf")


# --------------------------------------------------------------------------- RollbackPolicy


@pytest.mark.parametrize(
    ("mode", "relative", "best", "metric", "due"),
    [
        # absolute, higher is better: due when more than 0.05 below the best
        ("max", False, 0.80, 0.76, False),
        ("max", False, 0.80, 0.74, True),
        ("max", False, 0.80, 0.90, False),  # an improvement
        # absolute, lower is better: due when more than 0.05 above the best
        ("min", False, 0.40, 0.44, False),
        ("min", False, 0.40, 0.46, True),
        ("min", False, 0.40, 0.20, False),
        # relative: 5 % of the best
        ("max", True, 0.50, 0.48, False),  # 4 % below
        ("max", True, 0.50, 0.47, True),  # 6 % below
        ("min", True, 2.00, 2.09, False),  # 4.5 % above
        ("min", True, 2.00, 2.11, True),  # 5.5 % above
    ],
)
def test_metric_drop_against_threshold(mode, relative, best, metric, due):
    policy = RollbackPolicy(threshold=0.05, mode=mode, relative=relative)
    decision = policy.decide(epoch=7, metric=metric, loss=0.3, best=best)
    if not due:
        assert decision is None
        return
    assert decision.kind == "rollback" and decision.restore and not decision.fatal
    assert decision.epoch == 7 and decision.count == 1
    assert decision.lr_factor == pytest.approx(0.5)
    assert ("below" if mode == "max" else "above") in decision.reason


def test_relative_threshold_scales_with_best():
    # A 0.03 drop is 6 % of 0.5 (due) but only 3 % of 1.0 (not due).
    policy = RollbackPolicy(threshold=0.05, relative=True)
    assert policy.decide(1, 0.47, 0.1, best=0.5) is not None
    assert policy.decide(1, 0.97, 0.1, best=1.0) is None


def test_drop_equal_to_threshold_is_allowed():
    # Values exact in binary, so the drop is exactly the threshold.
    policy = RollbackPolicy(threshold=0.25)
    assert policy.decide(1, metric=0.5, loss=0.1, best=0.75) is None
    assert policy.decide(1, metric=0.4375, loss=0.1, best=0.75) is not None


def test_no_best_means_no_drop():
    assert RollbackPolicy().decide(1, metric=0.0, loss=1.0, best=None) is None


@pytest.mark.parametrize("loss", [NAN, INF, -INF])
def test_non_finite_loss_rolls_back_even_when_metric_is_fine(loss):
    decision = RollbackPolicy().decide(3, metric=0.9, loss=loss, best=0.8)
    assert decision.kind == "rollback" and decision.restore
    assert decision.reason.startswith("non-finite loss")


@pytest.mark.parametrize("loss", [NAN, INF])
def test_non_finite_loss_without_best_aborts(loss):
    policy = RollbackPolicy()
    decision = policy.decide(1, metric=0.1, loss=loss, best=None)
    assert decision.kind == "abort" and not decision.restore and decision.fatal
    assert decision.reason.startswith("non-finite loss")
    policy.record(decision)
    assert policy.count == 0  # nothing was rolled back


def test_non_finite_metric_rolls_back():
    decision = RollbackPolicy(mode="min", monitor="val_loss").decide(4, INF, 0.5, best=0.7)
    assert decision.kind == "rollback" and "non-finite val_loss" in decision.reason


def test_lr_factor_compounds_with_count():
    policy = RollbackPolicy(lr_cut=0.5, max_rollbacks=5)
    totals = []
    for epoch in range(1, 4):
        decision = policy.decide(epoch, 0.1, 0.2, best=0.9)
        assert decision.lr_factor == pytest.approx(0.5)  # each cut applies to the current lr
        policy.record(decision)
        totals.append(decision.total_lr_factor)
    assert totals == pytest.approx([0.5, 0.25, 0.125])
    assert policy.count == 3


def drive(policy: RollbackPolicy, steps: list[tuple[float, float]], best: float = 0.9) -> list:
    """Feed (metric, loss) pairs, recording each decision; returns the decisions' kinds."""
    kinds = []
    for epoch, (metric, loss) in enumerate(steps, start=1):
        decision = policy.decide(epoch, metric, loss, best)
        kinds.append(None if decision is None else decision.kind)
        if decision is not None:
            policy.record(decision)
    return kinds


def test_exhausted_once_after_max_rollbacks():
    policy = RollbackPolicy(max_rollbacks=2)
    kinds = drive(policy, [(0.5, 0.3)] * 5)
    assert kinds == ["rollback", "rollback", "exhausted", None, None]
    assert policy.count == 2 and policy.exhausted_reported


def test_exhausted_decision_restores_nothing():
    policy = RollbackPolicy(max_rollbacks=0, lr_cut=0.5)
    decision = policy.decide(2, 0.5, 0.3, best=0.9)
    assert decision.kind == "exhausted" and not decision.restore and not decision.fatal
    assert decision.lr_factor == 1.0 and decision.count == 0 and decision.total_lr_factor == 1.0
    assert "rollback limit 0 reached" in decision.reason


def test_non_finite_loss_after_exhaustion_is_fatal_every_time():
    policy = RollbackPolicy(max_rollbacks=1)
    kinds = drive(policy, [(0.9, NAN), (0.9, NAN), (0.9, NAN), (0.5, 0.3), (0.9, INF)])
    assert kinds == ["rollback", "exhausted", "abort", None, "abort"]
    exhausted = RollbackPolicy(max_rollbacks=0).decide(1, 0.9, NAN, best=0.9)
    assert exhausted.kind == "exhausted" and exhausted.fatal


def test_decide_counts_no_rollback_until_recorded():
    policy = RollbackPolicy(max_rollbacks=1)
    first = policy.decide(1, 0.5, 0.3, best=0.9)
    again = policy.decide(1, 0.5, 0.3, best=0.9)
    assert first == again and policy.count == 0 and policy.history == []


def test_patience_needs_the_drop_to_last_epochs_in_a_row():
    policy = RollbackPolicy(threshold=0.1, patience=2)
    # a swing that recovers, then a drop that lasts, then a drop after the rollback
    kinds = drive(policy, [(0.5, 0.3), (0.85, 0.3), (0.5, 0.3), (0.5, 0.3), (0.5, 0.3)])
    assert kinds == ["wait", None, "wait", "rollback", "wait"]
    assert policy.count == 1 and [epoch for epoch, _ in policy.history] == [4]


def test_a_wait_restores_nothing_and_says_how_long():
    policy = RollbackPolicy(threshold=0.1, patience=3)
    decision = policy.decide(6, 0.5, 0.3, best=0.9)
    assert decision.kind == "wait" and not decision.restore and not decision.fatal
    assert decision.lr_factor == 1.0 and decision.count == 0
    assert decision.reason.endswith("epoch 1 of 3 before a rollback")
    assert "0.4 below best 0.9" in decision.reason


def test_non_finite_values_do_not_wait():
    assert RollbackPolicy(patience=3).decide(2, 0.9, NAN, best=0.9).kind == "rollback"
    assert RollbackPolicy(patience=3).decide(2, INF, 0.3, best=0.9).kind == "rollback"


def test_drops_after_exhaustion_are_not_reported_as_waits():
    policy = RollbackPolicy(max_rollbacks=0, patience=2)
    assert drive(policy, [(0.5, 0.3)] * 4) == ["wait", "exhausted", None, None]


def test_state_round_trip_keeps_the_streak():
    policy = RollbackPolicy(patience=2)
    assert drive(policy, [(0.5, 0.3)]) == ["wait"]
    restored = RollbackPolicy(patience=2)
    restored.load_state_dict(policy.state_dict())
    assert restored.decide(2, 0.5, 0.3, best=0.9).kind == "rollback"
    older = {k: v for k, v in policy.state_dict().items() if k != "streak"}
    fresh = RollbackPolicy(patience=2)
    fresh.load_state_dict(older)  # a state saved before patience existed
    assert fresh.decide(2, 0.5, 0.3, best=0.9).kind == "wait"


def test_state_round_trip_keeps_count_and_history():
    policy = RollbackPolicy(max_rollbacks=2)
    drive(policy, [(0.5, 0.3), (0.9, 0.3), (0.5, 0.3)])
    state = policy.state_dict()
    # The state must survive a weights_only checkpoint load.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = RollbackPolicy(max_rollbacks=2)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.count == 2 and not restored.exhausted_reported
    assert [epoch for epoch, _ in restored.history] == [1, 3]
    assert restored.history[0][1].startswith("rollback: val_acc 0.5 is 0.4 below best 0.9")
    # Same future as the original: the next drop exhausts the budget.
    assert restored.decide(4, 0.5, 0.3, 0.9) == policy.decide(4, 0.5, 0.3, 0.9)
    assert restored.decide(4, 0.5, 0.3, 0.9).kind == "exhausted"


def test_state_round_trip_after_exhaustion_stays_quiet():
    policy = RollbackPolicy(max_rollbacks=1)
    drive(policy, [(0.5, 0.3), (0.5, 0.3)])
    restored = RollbackPolicy(max_rollbacks=1)
    restored.load_state_dict(policy.state_dict())
    assert restored.exhausted_reported
    assert restored.decide(3, 0.5, 0.3, best=0.9) is None  # "exhausted" is not said twice
    assert restored.decide(3, 0.5, NAN, best=0.9).kind == "abort"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"threshold": 0}, "RollbackPolicy.threshold=0 is invalid; allowed: a finite float > 0"),
        ({"threshold": NAN}, "RollbackPolicy.threshold=nan"),
        ({"max_rollbacks": -1}, "RollbackPolicy.max_rollbacks=-1 is invalid; allowed: an int >= 0"),
        ({"max_rollbacks": 2.0}, "RollbackPolicy.max_rollbacks=2.0"),
        ({"lr_cut": 0.0}, "RollbackPolicy.lr_cut=0.0 is invalid; allowed: a float in (0, 1]"),
        ({"lr_cut": 1.5}, "RollbackPolicy.lr_cut=1.5"),
        ({"mode": "maximum"}, "RollbackPolicy.mode='maximum' is invalid; allowed: 'max' | 'min'"),
        ({"relative": 1}, "RollbackPolicy.relative=1"),
        ({"patience": 0}, "RollbackPolicy.patience=0 is invalid; allowed: an int >= 1"),
    ],
)
def test_rollback_validation(kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        RollbackPolicy(**kwargs)


def test_decision_fatal_only_for_unrepaired_divergence():
    common = {"epoch": 1, "count": 0, "lr_factor": 1.0, "total_lr_factor": 1.0}
    assert RollbackDecision("abort", "non-finite loss (nan)", restore=False, **common).fatal
    assert not RollbackDecision("rollback", "non-finite loss (nan)", restore=True, **common).fatal
    assert not RollbackDecision("exhausted", "val_acc 0.5 is ...", restore=False, **common).fatal


# --------------------------------------------------------------------------- EarlyStopping


def first_stop(stopper: EarlyStopping, metrics: list[float]) -> int | None:
    """Epoch (1-based) at which ``update`` first returns True, or None."""
    for epoch, metric in enumerate(metrics, start=1):
        if stopper.update(epoch, metric):
            return epoch
    return None


@pytest.mark.parametrize(
    ("kwargs", "metrics", "stop_at"),
    [
        # best at epoch 2, then three epochs without improvement
        ({"patience": 3}, [0.5, 0.6, 0.6, 0.55, 0.59, 0.7], 5),
        ({"patience": 4}, [0.5, 0.6, 0.6, 0.55, 0.59, 0.7], None),
        # a new best resets the count
        ({"patience": 2}, [0.5, 0.4, 0.6, 0.5, 0.5], 5),
        # min_delta: +0.005 steps are not improvements, so the best stays at epoch 1
        ({"patience": 3, "min_delta": 0.01}, [0.5, 0.505, 0.509, 0.508], 4),
        ({"patience": 3, "min_delta": 0.001}, [0.5, 0.505, 0.509, 0.508], None),
        # lower is better
        ({"patience": 2, "mode": "min"}, [1.0, 0.8, 0.9, 0.85], 4),
        ({"patience": 2, "mode": "min"}, [1.0, 0.8, 0.7, 0.6], None),
        # not before epoch 6, but the count goes on: stops at 7, the first epoch allowed
        ({"patience": 2, "not_before_epoch": 6}, [0.9, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], 7),
        ({"patience": 2, "not_before_epoch": 6}, [0.9, 0.5, 0.5, 0.5, 0.5, 1.0, 0.5], None),
        # NaN never improves and never becomes the best
        ({"patience": 2}, [NAN, 0.5, NAN, NAN], 4),
    ],
)
def test_early_stopping_rules(kwargs, metrics, stop_at):
    assert first_stop(EarlyStopping(**kwargs), metrics) == stop_at


def test_early_stopping_reason_and_counts():
    stopper = EarlyStopping(patience=2, not_before_epoch=3)
    assert first_stop(stopper, [0.7, 0.6, 0.6, 0.6]) == 4
    assert stopper.wait == 3 and stopper.best == 0.7 and stopper.best_epoch == 1
    assert (
        stopper.reason
        == "val_acc has not improved by more than 0 for 3 epochs (best 0.7 at epoch 1)"
    )


def test_early_stopping_reason_empty_until_stop():
    stopper = EarlyStopping(patience=5)
    stopper.update(1, 0.5)
    stopper.update(2, 0.4)
    assert stopper.reason == "" and stopper.wait == 1


def test_early_stopping_state_round_trip():
    history = [0.5, 0.6, 0.58, 0.59, 0.57, 0.61, 0.6, 0.6, 0.6]
    whole = EarlyStopping(patience=3)
    expected = [whole.update(e, m) for e, m in enumerate(history, start=1)]
    first = EarlyStopping(patience=3)
    for epoch, metric in enumerate(history[:4], start=1):
        first.update(epoch, metric)
    resumed = EarlyStopping(patience=3)
    resumed.load_state_dict(first.state_dict())
    rest = [resumed.update(e, m) for e, m in enumerate(history[4:], start=5)]
    assert rest == expected[4:] and True in rest
    assert resumed.state_dict() == whole.state_dict()


def test_early_stopping_state_before_any_update():
    stopper = EarlyStopping()
    stopper.load_state_dict(EarlyStopping().state_dict())
    assert stopper.best is None and stopper.best_epoch is None and stopper.wait == 0


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"patience": 0}, "EarlyStopping.patience=0 is invalid; allowed: an int >= 1"),
        ({"patience": True}, "EarlyStopping.patience=True"),
        ({"min_delta": -0.1}, "EarlyStopping.min_delta=-0.1 is invalid; allowed: a finite float"),
        ({"min_delta": INF}, "EarlyStopping.min_delta=inf"),
        ({"mode": "up"}, "EarlyStopping.mode='up'"),
        ({"not_before_epoch": -1}, "EarlyStopping.not_before_epoch=-1 is invalid"),
    ],
)
def test_early_stopping_validation(kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        EarlyStopping(**kwargs)


def test_non_finite_weights_or_statistics_roll_back_though_loss_and_metric_are_fine():
    # Inf BatchNorm variances leave the eval output constant, so the metric alone looks sane.
    bad = ["block1.bn.running_var"]
    decision = RollbackPolicy().decide(3, metric=0.9, loss=0.2, best=0.8, nonfinite=bad)
    assert decision.kind == "rollback" and decision.reason.startswith("non-finite")
    assert "block1.bn.running_var" in decision.reason


def test_non_finite_state_without_finite_weights_to_restore_aborts():
    decision = RollbackPolicy().decide(1, 0.9, 0.2, best=None, nonfinite=["fc.weight"])
    assert decision.kind == "abort" and decision.fatal
