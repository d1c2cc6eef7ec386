"""DynamicDropout decisions on hand-made gaps, and apply_rates on a tiny BasicCNNModel."""

from __future__ import annotations

import math

import pytest
from torch import nn

from models.basic_cnn_model import BasicCNNModel
from training.callbacks.dropout import DynamicDropout, apply_rates

RATES = [0.1, 0.2, 0.3]


def test_overfitting_raises_every_rate_by_one_step():
    dd = DynamicDropout()
    new = dd.decide(train_value=0.95, val_value=0.80, rates=RATES)
    assert new == pytest.approx([0.15, 0.25, 0.35])
    assert dd.rates == new and dd.num_changes == 1
    assert "gap +0.1500 > overfit_gap 0.05" in dd.last_reason
    assert "raised" in dd.last_reason
    assert dd.last_gap == pytest.approx(0.15)


def test_underfitting_lowers_every_rate_by_one_step():
    dd = DynamicDropout()
    new = dd.decide(train_value=0.70, val_value=0.72, rates=RATES)
    assert new == pytest.approx([0.05, 0.15, 0.25])
    assert "< underfit_gap 0.01" in dd.last_reason and "lowered" in dd.last_reason


@pytest.mark.parametrize("val", [0.87, 0.85, 0.89])  # gaps 0.03, 0.05 (edge), 0.01 (edge)
def test_gap_within_band_changes_nothing(val):
    dd = DynamicDropout()
    assert dd.decide(0.90, val, RATES) is None
    assert dd.num_changes == 0 and dd.rates == RATES
    assert "within" in dd.last_reason


def test_rates_clamped_to_bounds():
    dd = DynamicDropout(min_rate=0.05, max_rate=0.4)
    assert dd.decide(0.99, 0.5, [0.1, 0.2, 0.38]) == pytest.approx([0.15, 0.25, 0.4])
    assert dd.decide(0.5, 0.6, [0.07, 0.2, 0.3]) == pytest.approx([0.05, 0.15, 0.25])


@pytest.mark.parametrize(
    "rates, train, val, bound",
    [([0.5, 0.5, 0.5], 0.99, 0.5, "max_rate"), ([0.0, 0.0, 0.0], 0.5, 0.6, "min_rate")],
)
def test_none_when_already_at_bound(rates, train, val, bound):
    dd = DynamicDropout(base_rates=rates)
    assert dd.decide(train, val, rates) is None
    assert dd.num_changes == 0 and f"already at {bound}" in dd.last_reason


def test_partly_at_bound_still_moves_the_others():
    dd = DynamicDropout()
    assert dd.decide(0.99, 0.5, [0.5, 0.45, 0.5]) == pytest.approx([0.5, 0.5, 0.5])


def test_repeated_steps_land_exactly_on_bounds():
    # 0.1 + 0.05 * k accumulates float error without rounding; the bound must still be hit.
    dd = DynamicDropout()
    rates = RATES
    for _ in range(20):
        rates = dd.decide(1.0, 0.0, rates) or rates
    assert rates == [0.5, 0.5, 0.5] and dd.num_changes == 8
    assert dd.decide(1.0, 0.0, rates) is None


def test_loss_signal_uses_val_minus_train():
    dd = DynamicDropout(signal="loss", overfit_gap=0.1, underfit_gap=0.0)
    assert dd.decide(train_value=0.3, val_value=0.6, rates=RATES) == pytest.approx(
        [0.15, 0.25, 0.35]
    )
    assert dd.decide(train_value=0.6, val_value=0.5, rates=RATES) == pytest.approx(
        [0.05, 0.15, 0.25]
    )
    # The same numbers read as accuracies mean the opposite.
    acc = DynamicDropout(signal="acc", overfit_gap=0.1, underfit_gap=0.0)
    assert acc.decide(0.3, 0.6, RATES) == pytest.approx([0.05, 0.15, 0.25])


def test_non_finite_gap_changes_nothing():
    dd = DynamicDropout()
    assert dd.decide(math.nan, 0.5, RATES) is None
    assert "not finite" in dd.last_reason


def _dropout_ps(model: BasicCNNModel, block: int) -> list[float]:
    return [m.p for m in model.blocks[block - 1].modules() if isinstance(m, nn.Dropout2d)]


def test_apply_rates_sets_model_dropout():
    model = BasicCNNModel(width=0.125, num_classes=3)
    dd = DynamicDropout()
    new = dd.decide(0.9, 0.7, model.dropout_rates())
    apply_rates(model, new)
    assert model.dropout_rates() == pytest.approx([0.15, 0.25, 0.35])
    assert _dropout_ps(model, 3) == pytest.approx([0.35] * 3)  # every layer, frozen block too
    with pytest.raises(ValueError, match="3 rates"):
        apply_rates(model, [0.1, 0.2])


def test_state_round_trip():
    dd = DynamicDropout()
    dd.decide(0.9, 0.7, RATES)
    other = DynamicDropout()
    other.load_state_dict(dd.state_dict())
    assert other.state_dict() == dd.state_dict()
    assert other.rates == pytest.approx([0.15, 0.25, 0.35]) and other.num_changes == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_rate": -0.1}, r"min_rate=-0.1 is invalid; allowed: a number >= 0"),
        ({"max_rate": 1.0}, r"max_rate=1.0 is invalid; allowed: a number in \[min_rate=0.0, 1\)"),
        ({"min_rate": 0.3, "max_rate": 0.2, "base_rates": (0.3,) * 3}, "max_rate=0.2"),
        ({"step": 0}, "step=0 is invalid; allowed: a number > 0"),
        ({"underfit_gap": 0.1}, r"underfit_gap=0.1 is invalid; allowed: a number <= overfit_gap"),
        ({"overfit_gap": math.inf}, "overfit_gap=inf is invalid"),
        ({"signal": "f1"}, "signal='f1' is invalid; allowed: 'acc' | 'loss'"),
        ({"base_rates": ()}, r"base_rates=\(\) is invalid; allowed: one or more numbers"),
        ({"base_rates": (0.1, 0.2, 0.6)}, r"allowed: 3 numbers in \[min_rate=0.0, max_rate=0.5\]"),
    ],
)
def test_constructor_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicDropout(**kwargs)


def test_decide_checks_rate_count():
    with pytest.raises(ValueError, match="allowed: 3 rates"):
        DynamicDropout().decide(0.9, 0.7, [0.1, 0.2])
