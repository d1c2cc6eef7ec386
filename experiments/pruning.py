"""The training callback that reports each epoch's validation metric to an Optuna trial and
stops the run when the trial's pruner says so.

It lives in the experiments package because it knows Optuna; the training package only
defines the events (``training.engine.events``) and never imports experiments.

Public API:
    TrialPruning.
"""

from __future__ import annotations

import math
from typing import Any

from training.engine.events import Callback, StopTraining


class TrialPruning(Callback):
    """Report ``metric`` after every validation (``trial.report(value, epoch)``) and, when
    ``trial.should_prune()``, end the run like early stopping does: at the end of the deciding
    epoch, after its checkpoints are written, by raising ``StopTraining``; the trainer then
    runs its end phase and the run folder is complete (``stopped`` names the pruning).

    Args:
        trial: the Optuna trial (anything with ``report`` and ``should_prune``).
        metric: the validation metric, a key of the epoch's metrics (``val_acc``).
        maximize: whether higher is better (for :attr:`best`).
    """

    name = "trial_pruning"

    def __init__(self, trial: Any, metric: str, maximize: bool) -> None:
        self.trial = trial
        self.metric = metric
        self.maximize = maximize
        self.values: dict[int, float] = {}
        self.pruned_at: int | None = None
        self.reason = ""

    @property
    def best(self) -> float | None:
        """The best finite value reported, or None when there was none."""
        finite = [v for v in self.values.values() if math.isfinite(v)]
        if not finite:
            return None
        return max(finite) if self.maximize else min(finite)

    def on_validation_end(self, trainer: Any, metrics: dict) -> None:
        epoch = int(metrics["epoch"])
        value = float(metrics[self.metric])
        self.values[epoch] = value
        if not math.isfinite(value):
            return  # a NaN epoch says nothing a pruner can compare
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            self.reason = (
                f"pruned: {self.metric} {value:.4g} at epoch {epoch} is worse than the "
                "other trials' at this epoch"
            )
            metrics["pruned"] = self.reason
            trainer.notify("stop", f"trial {self.trial.number} pruned", [self.reason])

    def on_epoch_end(self, trainer: Any, metrics: dict) -> None:
        # After last.pt and the logs of the deciding epoch are written; this callback comes
        # last (build_trainer puts extra callbacks after its own).
        if self.pruned_at is not None:
            raise StopTraining(self.reason)
