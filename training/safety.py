"""Run safety decisions: roll back to the best weights after a collapse, and stop early.

Both classes are plain decision objects. A callback calls them once per epoch, after validation,
with that epoch's numbers, and carries out what they decide (restore weights, cut the learning
rate, raise ``StopTraining``); nothing here touches a model or an optimizer, so every rule can be
tested from a list of metrics.

Public API:
    RollbackDecision, RollbackPolicy, EarlyStopping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from training.checks import is_int, is_real

Mode = Literal["max", "min"]
MODES: tuple[str, ...] = ("max", "min")
NON_FINITE = "non-finite"  # prefix of the reasons for a diverged run


# --------------------------------------------------------------------------- validation helpers


def _invalid(where: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{where}={value!r} is invalid; allowed: {allowed}")


def _check_mode(where: str, mode: object) -> None:
    if mode not in MODES:
        raise _invalid(where, mode, " | ".join(repr(m) for m in MODES))


def _check_int_at_least(where: str, value: object, minimum: int) -> None:
    if not is_int(value) or value < minimum:
        raise _invalid(where, value, f"an int >= {minimum}")


def _worsening(metric: float, best: float, mode: str) -> float:
    """How far ``metric`` is on the bad side of ``best`` (negative when it is better)."""
    return best - metric if mode == "max" else metric - best


# --------------------------------------------------------------------------- rollback


@dataclass(frozen=True)
class RollbackDecision:
    """What :meth:`RollbackPolicy.decide` asks the caller to do.

    Attributes:
        kind: ``"rollback"``: restore the best weights and cut the learning rate;
            ``"wait"``: the metric is past the threshold, but not yet for ``patience`` epochs in
            a row (nothing to do but report it);
            ``"exhausted"``: a rollback was due but the limit is spent (said once; warn or stop);
            ``"abort"``: the loss or metric is NaN/inf and no rollback can repair it (no best
            weights yet, or the limit was already reported): stop with an error.
        reason: one line for the console, e.g. ``"non-finite loss (nan)"`` or the drop's size.
        epoch: the epoch that triggered the decision.
        count: rollbacks performed once this decision is recorded.
        restore: whether to load the best weights; True for ``"rollback"`` only.
        lr_factor: multiplier for the current learning rates (``lr_cut`` for a rollback, else 1).
        total_lr_factor: ``lr_cut ** count``: the multiplier relative to the rates before any
            rollback, for a caller whose restore also brings back the older optimizer state.
    """

    kind: Literal["rollback", "wait", "exhausted", "abort"]
    reason: str
    epoch: int
    count: int
    restore: bool
    lr_factor: float
    total_lr_factor: float

    @property
    def fatal(self) -> bool:
        """True when training cannot usefully go on: a non-finite value that was not repaired."""
        return not self.restore and self.reason.startswith(NON_FINITE)


class RollbackPolicy:
    """Decides when to go back to the best weights after training falls apart.

    A rollback is due when the epoch's training loss, the monitored validation metric or any
    weight or buffer of the model (``nonfinite`` names them) is NaN/inf, or when the metric has
    been worse than the best so far by more than ``threshold`` for ``patience`` epochs in a row
    (a swing that recovers the next epoch is left alone). Each
    rollback multiplies the learning rate by ``lr_cut``, the usual remedy for a divergence caused
    by too large a step. Restarting from an earlier checkpoint after a loss spike follows
    Chowdhery et al. 2022 ("PaLM", Sec. 5.1, training instability).

    Args:
        threshold: allowed worsening before a rollback; > 0. Absolute by default (0.05 is five
            accuracy points), a fraction of ``|best|`` when ``relative``.
        max_rollbacks: rollbacks allowed in a run; >= 0. After that one ``"exhausted"`` decision
            is returned and metric drops are ignored.
        lr_cut: learning-rate multiplier per rollback, in (0, 1].
        mode: ``"max"`` when a higher metric is better (accuracy), ``"min"`` for a loss.
        relative: read ``threshold`` as a fraction of the best value.
        monitor: name of the metric, used in the reasons only.
        patience: epochs in a row the metric must stay past the threshold before a rollback;
            >= 1. A non-finite value does not wait.
    """

    def __init__(
        self,
        threshold: float = 0.05,
        max_rollbacks: int = 3,
        lr_cut: float = 0.5,
        mode: Mode = "max",
        relative: bool = False,
        monitor: str = "val_acc",
        patience: int = 1,
    ) -> None:
        if not is_real(threshold) or threshold <= 0:
            raise _invalid("RollbackPolicy.threshold", threshold, "a finite float > 0")
        _check_int_at_least("RollbackPolicy.max_rollbacks", max_rollbacks, 0)
        if not is_real(lr_cut) or not 0 < lr_cut <= 1:
            raise _invalid("RollbackPolicy.lr_cut", lr_cut, "a float in (0, 1]")
        _check_mode("RollbackPolicy.mode", mode)
        if not isinstance(relative, bool):
            raise _invalid("RollbackPolicy.relative", relative, "True | False")
        _check_int_at_least("RollbackPolicy.patience", patience, 1)
        self.threshold = float(threshold)
        self.max_rollbacks = max_rollbacks
        self.lr_cut = float(lr_cut)
        self.mode = mode
        self.relative = relative
        self.monitor = monitor
        self.patience = patience
        self.count = 0
        self.streak = 0  # epochs in a row past the threshold
        self.exhausted_reported = False
        self.history: list[tuple[int, str]] = []

    def decide(
        self,
        epoch: int,
        metric: float,
        loss: float,
        best: float | None,
        nonfinite: Sequence[str] = (),
    ) -> RollbackDecision | None:
        """The action for an epoch that ended with ``metric`` and training ``loss``, or None.

        ``nonfinite`` names the model's tensors holding NaN/inf: BatchNorm running variances can
        overflow while the loss (batch statistics) and the metric (a constant output) stay
        finite, and such a state is diverged all the same. ``best`` is the best monitored value
        so far (None before the first); the caller keeps it, since it also decides which weights
        are saved as the best. Call it once per epoch: it
        counts the epochs in a row past the threshold (the only state it changes). Pass the
        decision to :meth:`record` once it has been carried out.
        """
        cause = self._cause(metric, loss, best, nonfinite)
        if cause is None:
            self.streak = 0
            return None
        diverged = cause.startswith(NON_FINITE)
        if diverged and best is None:
            # Nothing to go back to: the first epochs already diverged.
            return self._decision("abort", f"{cause}; no best weights to restore yet", epoch)
        ignored = self.count >= self.max_rollbacks and self.exhausted_reported
        if not diverged and not ignored:
            self.streak += 1
            if self.streak < self.patience:
                wait = f"{cause}; epoch {self.streak} of {self.patience} before a rollback"
                return self._decision("wait", wait, epoch)
        if self.count < self.max_rollbacks:
            return self._decision("rollback", cause, epoch)
        if not self.exhausted_reported:
            limit = f"rollback limit {self.max_rollbacks} reached"
            return self._decision("exhausted", f"{cause}; {limit}", epoch)
        if diverged:
            # Drops are ignored after the limit, but a diverged run must not go on silently.
            return self._decision("abort", f"{cause}; rollbacks exhausted", epoch)
        return None

    def record(self, decision: RollbackDecision) -> None:
        """Note that ``decision`` was carried out: count a rollback, remember the exhaustion.

        A ``"wait"`` is not an action and is not kept in :attr:`history`.
        """
        if decision.kind == "wait":
            return
        if decision.kind == "rollback":
            self.count += 1
            self.streak = 0
        elif decision.kind == "exhausted":
            self.exhausted_reported = True
        self.history.append((decision.epoch, f"{decision.kind}: {decision.reason}"))

    def _cause(
        self, metric: float, loss: float, best: float | None, nonfinite: Sequence[str] = ()
    ) -> str | None:
        if not math.isfinite(loss):
            return f"{NON_FINITE} loss ({loss})"
        if not math.isfinite(metric):
            return f"{NON_FINITE} {self.monitor} ({metric})"
        if nonfinite:
            more = f" and {len(nonfinite) - 1} more" if len(nonfinite) > 1 else ""
            return f"{NON_FINITE} weights or statistics ({nonfinite[0]}{more})"
        if best is None:
            return None
        drop = _worsening(metric, best, self.mode)
        limit = self.threshold * abs(best) if self.relative else self.threshold
        if drop <= limit:
            return None
        side = "below" if self.mode == "max" else "above"
        return (
            f"{self.monitor} {metric:.4g} is {drop:.4g} {side} best {best:.4g} (limit {limit:.4g})"
        )

    def _decision(self, kind: str, reason: str, epoch: int) -> RollbackDecision:
        rollback = kind == "rollback"
        count = self.count + 1 if rollback else self.count
        return RollbackDecision(
            kind=kind,
            reason=reason,
            epoch=epoch,
            count=count,
            restore=rollback,
            lr_factor=self.lr_cut if rollback else 1.0,
            total_lr_factor=self.lr_cut**count,
        )

    def state_dict(self) -> dict:
        return {
            "count": self.count,
            "exhausted_reported": self.exhausted_reported,
            "streak": self.streak,
            "history": [list(entry) for entry in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.exhausted_reported = bool(state["exhausted_reported"])
        self.streak = int(state.get("streak", 0))  # absent from states saved before patience
        self.history = [(int(epoch), str(reason)) for epoch, reason in state["history"]]


# --------------------------------------------------------------------------- early stopping


class EarlyStopping:
    """Stops when the monitored metric has not improved for ``patience`` epochs.

    Early stopping as in Prechelt 1998, "Early Stopping - But When?": keep the best weights and
    stop once the validation metric stalls. With progressive unfreezing the metric often stalls
    just before a block activates, so no stop happens at or before ``not_before_epoch`` (set it
    to the schedule's last activation); epochs without improvement are still counted there.

    Args:
        patience: epochs without improvement that end the run; >= 1.
        min_delta: an improvement must exceed this margin; >= 0.
        mode: ``"max"`` when higher is better, ``"min"`` when lower is better.
        not_before_epoch: no stop at epochs <= this one; >= 0.
        monitor: name of the metric, used in ``reason`` only.
    """

    def __init__(
        self,
        patience: int = 10,
        min_delta: float = 0.0,
        mode: Mode = "max",
        not_before_epoch: int = 0,
        monitor: str = "val_acc",
    ) -> None:
        _check_int_at_least("EarlyStopping.patience", patience, 1)
        if not is_real(min_delta) or min_delta < 0:
            raise _invalid("EarlyStopping.min_delta", min_delta, "a finite float >= 0")
        _check_mode("EarlyStopping.mode", mode)
        _check_int_at_least("EarlyStopping.not_before_epoch", not_before_epoch, 0)
        self.patience = patience
        self.min_delta = float(min_delta)
        self.mode = mode
        self.not_before_epoch = not_before_epoch
        self.monitor = monitor
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0
        self.reason = ""

    def update(self, epoch: int, metric: float) -> bool:
        """Count the epoch's ``metric``; True when training should stop now."""
        if self._improved(metric):
            self.best, self.best_epoch, self.wait = float(metric), epoch, 0
        else:
            self.wait += 1
        if self.wait < self.patience or epoch <= self.not_before_epoch:
            return False
        self.reason = (
            f"{self.monitor} has not improved by more than {self.min_delta:g} for {self.wait} "
            f"epochs (best {self._best_text()} at epoch {self.best_epoch})"
        )
        return True

    def _improved(self, metric: float) -> bool:
        # A NaN never becomes the best: every later comparison with it would be False.
        if not math.isfinite(metric):
            return False
        if self.best is None:
            return True
        return -_worsening(metric, self.best, self.mode) > self.min_delta

    def _best_text(self) -> str:
        return "none" if self.best is None else f"{self.best:.4g}"

    def state_dict(self) -> dict:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "reason": self.reason,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best = None if state["best"] is None else float(state["best"])
        self.best_epoch = None if state["best_epoch"] is None else int(state["best_epoch"])
        self.wait = int(state["wait"])
        self.reason = str(state["reason"])
