"""Dynamic dropout: move the Dropout2d rates of all blocks with the train-validation gap.

A widening generalisation gap is the usual sign of overfitting, and dropout (Srivastava et al.,
"Dropout: A Simple Way to Prevent Neural Networks from Overfitting", JMLR 2014; spatial dropout
as ``Dropout2d``: Tompson et al., "Efficient Object Localization Using Convolutional Networks",
CVPR 2015) is the regulariser that is cheapest to turn up or down during a run. The decision
lives in :class:`DynamicDropout`, a plain class a callback calls once per epoch;
:func:`apply_rates` writes the result into a staged model that declares the ``dropout``
capability (one rate per stage, :mod:`models.staged`).

Public API:
    DynamicDropout, apply_rates, SIGNALS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from training.engine.events import Callback

SIGNALS: tuple[str, ...] = ("acc", "loss")


# Rates are rounded so that 0.1 + 0.05 + 0.05 - 0.05 lands on 0.15 and equals a bound exactly.
_DECIMALS = 6


# Gaps are rounded before the comparison so that 0.90 - 0.85 (0.05000000000000004 in floats)
# counts as equal to an overfit_gap of 0.05, as it reads.
_GAP_DECIMALS = 9


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _invalid(name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"DynamicDropout {name}={value!r} is invalid; allowed: {allowed}")


class DynamicDropout:
    """Raise the dropout of every block when the model overfits, lower it when it underfits.

    The gap is ``train_acc - val_acc`` for ``signal="acc"`` and ``val_loss - train_loss`` for
    ``signal="loss"``; both grow as the model overfits. Each :meth:`decide` call moves every
    block's rate by at most one ``step``, so a caller that calls it once per epoch changes the
    rates at most once per epoch.

    Args:
        base_rates: rates of blocks 1, 2 and 3 at the start of the run, each in
            [min_rate, max_rate]; kept as :attr:`rates` until the first change.
        min_rate: lower bound of every rate, >= 0.
        max_rate: upper bound of every rate, < 1 (``Dropout2d`` needs p < 1), >= min_rate.
        step: change of a rate per decision, > 0.
        overfit_gap: a gap above this raises the rates.
        underfit_gap: a gap below this lowers the rates; must be <= overfit_gap. Gaps in
            [underfit_gap, overfit_gap] leave the rates alone.
        signal: ``"acc"`` or ``"loss"``.

    Attributes:
        rates: the rates last decided (or ``base_rates``). Dropout rates are not part of the
            model's ``state_dict``, so on resume the caller re-applies these with
            :func:`apply_rates`.
        last_reason: one line saying what the last call decided and why, naming the gap.
        last_gap: the gap seen by the last call (NaN before the first).
        num_changes: how many calls changed the rates.
    """

    def __init__(
        self,
        base_rates: Sequence[float] = (0.1, 0.2, 0.3),
        min_rate: float = 0.0,
        max_rate: float = 0.5,
        step: float = 0.05,
        overfit_gap: float = 0.05,
        underfit_gap: float = 0.01,
        signal: str = "acc",
    ) -> None:
        if not _is_real(min_rate) or min_rate < 0:
            raise _invalid("min_rate", min_rate, "a number >= 0")
        if not _is_real(max_rate) or not min_rate <= max_rate < 1:
            raise _invalid("max_rate", max_rate, f"a number in [min_rate={min_rate}, 1)")
        if not _is_real(step) or step <= 0:
            raise _invalid("step", step, "a number > 0")
        if not _is_real(overfit_gap):
            raise _invalid("overfit_gap", overfit_gap, "a finite number")
        if not _is_real(underfit_gap) or underfit_gap > overfit_gap:
            raise _invalid("underfit_gap", underfit_gap, f"a number <= overfit_gap={overfit_gap}")
        if signal not in SIGNALS:
            raise _invalid("signal", signal, " | ".join(map(repr, SIGNALS)))
        self.min_rate = float(min_rate)
        self.max_rate = float(max_rate)
        self.step = float(step)
        self.overfit_gap = float(overfit_gap)
        self.underfit_gap = float(underfit_gap)
        self.signal = signal
        self.base_rates = self._check_rates("base_rates", base_rates)
        self.rates = list(self.base_rates)
        self.last_reason = "no decision yet"
        self.last_gap = math.nan
        self.num_changes = 0

    def _check_rates(self, name: str, rates: Sequence[float]) -> list[float]:
        count = len(getattr(self, "base_rates", rates)) or "one or more"
        allowed = f"{count} numbers in [min_rate={self.min_rate}, max_rate={self.max_rate}]"
        values = list(rates)
        if not values or len(values) != count or not all(_is_real(r) for r in values):
            raise _invalid(name, rates, allowed)
        if not all(self.min_rate <= r <= self.max_rate for r in values):
            raise _invalid(name, rates, allowed)
        return [float(r) for r in values]

    def gap(self, train_value: float, val_value: float) -> float:
        """The generalisation gap for this signal; positive means the model overfits."""
        if self.signal == "acc":
            return float(train_value) - float(val_value)
        return float(val_value) - float(train_value)

    def decide(
        self, train_value: float, val_value: float, rates: Sequence[float]
    ) -> list[float] | None:
        """New rates of blocks 1..3, or ``None`` when they stay as they are.

        Args:
            train_value: training accuracy (or loss) of the epoch.
            val_value: validation accuracy (or loss) of the epoch.
            rates: the model's current rates of blocks 1, 2 and 3 (``model.dropout_rates()``).
                They may lie outside [min_rate, max_rate] (a config set them); a move brings
                them inside.

        Returns ``None`` inside the dead band, when the gap is not finite (a diverged epoch says
        nothing about overfitting), and when every rate already sits at the bound it would move
        towards.
        """
        current = [float(r) for r in rates]
        if len(current) != len(self.base_rates):
            allowed = f"{len(self.base_rates)} rates"
            raise ValueError(f"rates={list(rates)!r} is invalid; allowed: {allowed}")
        gap = self.last_gap = self.gap(train_value, val_value)
        if not math.isfinite(gap):
            self.last_reason = f"gap {gap} is not finite; rates unchanged"
            return None
        gap = round(gap, _GAP_DECIMALS)
        if gap > self.overfit_gap:
            direction, why = 1.0, f"gap {gap:+.4f} > overfit_gap {self.overfit_gap}"
        elif gap < self.underfit_gap:
            direction, why = -1.0, f"gap {gap:+.4f} < underfit_gap {self.underfit_gap}"
        else:
            self.last_reason = (
                f"gap {gap:+.4f} within [{self.underfit_gap}, {self.overfit_gap}]; rates unchanged"
            )
            return None
        return self._move(current, direction, why)

    def _move(self, current: list[float], direction: float, why: str) -> list[float] | None:
        new = [self._clamp(r + direction * self.step) for r in current]
        if new == [round(r, _DECIMALS) for r in current]:
            bound = "max_rate" if direction > 0 else "min_rate"
            self.last_reason = f"{why}, but rates already at {bound}; unchanged"
            return None
        verb = "raised" if direction > 0 else "lowered"
        self.last_reason = f"{why}: dropout {verb} {_fmt(current)} -> {_fmt(new)}"
        self.rates = new
        self.num_changes += 1
        return new

    def _clamp(self, rate: float) -> float:
        return round(min(self.max_rate, max(self.min_rate, rate)), _DECIMALS)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rates": list(self.rates),
            "num_changes": self.num_changes,
            "last_reason": self.last_reason,
            "last_gap": self.last_gap,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rates = [float(r) for r in state["rates"]]
        self.num_changes = int(state["num_changes"])
        self.last_reason = str(state["last_reason"])
        self.last_gap = float(state["last_gap"])


def _fmt(rates: Sequence[float]) -> str:
    return "[" + ", ".join(f"{r:.3f}" for r in rates) + "]"


def apply_rates(model: Any, rates: Sequence[float]) -> None:
    """Write ``rates`` into stages 1..n with ``model.set_dropout(stage, p)``.

    ``model`` declares the ``dropout`` capability (one rate per stage) and validates each rate.
    Frozen, inactive stages get their rate too, so a stage activated later starts with the
    current rate.
    """
    values = list(rates)
    count = len(model.dropout_rates())
    if len(values) != count:
        raise ValueError(f"rates={values!r} is invalid; allowed: {count} rates")
    for stage, p in enumerate(values, start=1):
        model.set_dropout(stage, p)


class DropoutControl(Callback):
    """Moves the Dropout2d rates from the train-val gap, once per epoch.

    Epochs trained with Mixup are skipped: their training accuracy and loss are measured on
    mixed images, so the gap would read as underfitting whatever the model does.
    """

    name = "dynamic_dropout"

    def __init__(self, control: DynamicDropout, mixup: Any = None) -> None:
        self.control = control
        self.mixup = mixup

    def on_validation_end(self, trainer: Any, metrics: dict) -> None:
        if trainer.rolled_back:
            return
        if self.mixup is not None and self.mixup.active(metrics["epoch"] - 1):
            return
        name = "acc" if self.control.signal == "acc" else "loss"
        rates = self.control.decide(
            metrics[f"train_{name}"], metrics[f"val_{name}"], trainer.model.dropout_rates()
        )
        if rates is None:
            return
        apply_rates(trainer.model, rates)
        metrics["dropout"] = list(rates)
        trainer.notify("dropout", "dropout", [self.control.last_reason])

    def state_dict(self) -> dict:
        return self.control.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.control.load_state_dict(state)
