"""Rollback: restore the stage's best weights after a collapse.

:class:`RollbackPolicy` is a plain decision object: it is called once per epoch, after
validation, with that epoch's numbers, and touches no model or optimizer, so every rule can be
tested from a list of metrics. :class:`Rollback` is the callback that carries out its decision
(restore weights, cut the learning rate, raise ``StopTraining``).

Public API:
    RollbackDecision, RollbackPolicy, Rollback, NON_FINITE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from training.engine.checkpoint import (
    copy_checkpoint,
)
from training.engine.checks import check_int_at_least, check_mode, invalid, is_real
from training.engine.events import Callback, StopTraining
from training.engine.monitor import Mode, is_better, worsening

NON_FINITE = "non-finite"  # prefix of the reasons for a diverged run


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
            raise invalid("RollbackPolicy.threshold", threshold, "a finite float > 0")
        check_int_at_least("RollbackPolicy.max_rollbacks", max_rollbacks, 0)
        if not is_real(lr_cut) or not 0 < lr_cut <= 1:
            raise invalid("RollbackPolicy.lr_cut", lr_cut, "a float in (0, 1]")
        check_mode("RollbackPolicy.mode", mode)
        if not isinstance(relative, bool):
            raise invalid("RollbackPolicy.relative", relative, "True | False")
        check_int_at_least("RollbackPolicy.patience", patience, 1)
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
        drop = worsening(metric, best, self.mode)
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


class Rollback(Callback):
    """Restores the stage's best weights and optimizer state and cuts the lr when the run falls
    apart (a metric drop past the threshold, or a non-finite loss, metric, weight or BatchNorm
    statistic; a non-finite state is never kept as the rollback target).

    The reference is the best epoch of the current stage (since the last block activation), kept
    as ``checkpoints/rollback.pt``: right after an activation the new block is untrained and the
    metric dips below the previous stage's best by design, which is no reason to undo it. A
    divergence in the first epoch of a stage goes back to the previous stage's best.
    """

    name = "rollback"
    FILE = "rollback.pt"

    def __init__(self, policy: RollbackPolicy) -> None:
        self.policy = policy
        self.stage: int | None = None
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.fallback: float | None = None
        self._improved = False

    def _better(self, metric: float) -> bool:
        return math.isfinite(metric) and is_better(metric, self.best, self.policy.mode)

    def on_validation_end(self, trainer: Any, metrics: dict) -> None:
        self._improved = False
        if trainer.depth != self.stage:
            self.stage = trainer.depth
            self.fallback = self.best if self.best is not None else self.fallback
            self.best = None
        metric = float(metrics[trainer.config.run.monitor])
        loss = float(metrics["train_loss"])
        bad = metrics.get("nonfinite_state", [])
        diverged = not (math.isfinite(metric) and math.isfinite(loss)) or bool(bad)
        reference = self.fallback if (diverged and self.best is None) else self.best
        # A non-finite state always yields a decision, so it never becomes rollback.pt.
        decision = self.policy.decide(metrics["epoch"], metric, loss, reference, nonfinite=bad)
        if decision is None:
            if self._better(metric):
                self.best, self.best_epoch, self._improved = metric, metrics["epoch"], True
            return
        self.policy.record(decision)
        metrics["rollback"] = f"{decision.kind}: {decision.reason}"
        if decision.kind == "abort":
            trainer.notify("rollback", "training diverged", [decision.reason])
            raise StopTraining(f"diverged: {decision.reason}")
        if decision.kind == "exhausted":
            trainer.notify("warning", "rollback limit reached", [decision.reason])
            return
        if decision.kind == "wait":
            trainer.notify("warning", "rollback pending", [decision.reason])
            return
        path = trainer.restore_best(decision.lr_factor, trainer.checkpoint_dir / self.FILE)
        trainer.notify(
            "rollback",
            f"ROLLBACK {decision.count}/{self.policy.max_rollbacks}: back to epoch "
            f"{self.best_epoch}",
            [
                decision.reason,
                f"restored weights and optimizer state from {path.name}",
                f"learning rate x{decision.lr_factor:g} (x{decision.total_lr_factor:g} in all)",
            ],
        )

    def on_epoch_end(self, trainer: Any, metrics: dict) -> None:
        # last.pt now holds this epoch's end state: keep a copy while it is the stage's best.
        if self._improved and trainer.is_main:
            ck = trainer.checkpoint_dir
            copy_checkpoint(ck / "last.pt", ck / self.FILE)

    def state_dict(self) -> dict:
        return {
            **self.policy.state_dict(),
            "stage": self.stage,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "fallback": self.fallback,
        }

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state)
        self.stage = state.get("stage")
        self.best = state.get("best")
        self.best_epoch = state.get("best_epoch")
        self.fallback = state.get("fallback")
