"""Early stopping: end the run once the monitored metric stalls.

:class:`EarlyStopping` is the plain decision object, testable from a list of metrics;
:class:`EarlyStop` is the callback that raises ``StopTraining`` when it says so.

Public API:
    EarlyStopping, EarlyStop.
"""

from __future__ import annotations

import math
from typing import Any

from training.engine.checks import check_int_at_least, check_mode, invalid, is_real
from training.engine.events import Callback, StopTraining
from training.engine.monitor import Mode, worsening


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
        check_int_at_least("EarlyStopping.patience", patience, 1)
        if not is_real(min_delta) or min_delta < 0:
            raise invalid("EarlyStopping.min_delta", min_delta, "a finite float >= 0")
        check_mode("EarlyStopping.mode", mode)
        check_int_at_least("EarlyStopping.not_before_epoch", not_before_epoch, 0)
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
        return -worsening(metric, self.best, self.mode) > self.min_delta

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


class EarlyStop(Callback):
    """Stops the run after ``patience`` epochs without improvement (never before the last
    scheduled activation, nor before SWA starts: :func:`earliest_stop_epoch`; the count
    restarts when a block activates).

    The decision is taken at the end of an epoch and carried out at the start of the next, so
    the deciding epoch is logged and checkpointed like any other (and a run resumed from it
    stops at once).
    """

    name = "early_stop"

    def __init__(self, stopper: EarlyStopping) -> None:
        self.stopper = stopper
        self.stop_reason = ""
        self.stage: int | None = None

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        if self.stop_reason:  # a run resumed after it had stopped
            raise StopTraining(f"early stop: {self.stop_reason}")

    def on_validation_end(self, trainer: Any, metrics: dict) -> None:
        if trainer.depth != self.stage:
            # A new stage gets a full patience: its first epochs dip while the block settles.
            self.stage = trainer.depth
            self.stopper.wait = 0
        metric = float(metrics[trainer.config.run.monitor])
        if self.stopper.update(metrics["epoch"], metric):
            self.stop_reason = self.stopper.reason
            metrics["early_stop"] = self.stop_reason
            trainer.notify("stop", "early stopping", [self.stop_reason])

    def state_dict(self) -> dict:
        return {**self.stopper.state_dict(), "stop_reason": self.stop_reason, "stage": self.stage}

    def load_state_dict(self, state: dict) -> None:
        self.stopper.load_state_dict(state)
        self.stop_reason = str(state.get("stop_reason", ""))
        self.stage = state.get("stage")
