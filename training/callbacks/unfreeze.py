"""When to activate the next block of the progressive-unfreezing CNN, and at what learning rate.

:class:`UnfreezeSchedule` is a plain decision object: a callback calls ``decide`` once per
epoch, after validation, with that epoch's monitored metric, and activates the block it returns
(``trainer.activate_block(k)``). Calling it before the epoch's checkpoint is
written (``on_validation_end``) keeps the saved model and the saved schedule state in step.

Epoch convention: ``decide(epoch, ...)`` runs at the end of epoch ``epoch`` (1-based); a block
returned there trains from epoch ``epoch + 1``. Block 1 counts as activated at epoch 0.

Public API:
    UnfreezeSchedule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from training.engine.checks import is_int, is_real
from training.engine.events import Callback

WARMUP_START = 0.1  # a new group's lr factor at the moment it joins, when warmup is on


def _invalid(where: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"UnfreezeSchedule.{where}={value!r} is invalid; allowed: {allowed}")


def _as_schedule(activate_at: Mapping[int, int] | Sequence[tuple[int, int]]) -> dict[int, int]:
    allowed = "a dict block -> epoch or a sequence of (block, epoch) with int blocks"
    try:
        pairs = list(activate_at.items() if isinstance(activate_at, Mapping) else activate_at)
        schedule = {block: epoch for block, epoch in pairs}
    except (TypeError, ValueError):
        raise _invalid("activate_at", activate_at, allowed) from None
    if not all(is_int(block) for block in schedule):
        raise _invalid("activate_at", activate_at, allowed)
    if len(schedule) != len(pairs):
        raise _invalid("activate_at", activate_at, "each block at most once")
    return dict(sorted(schedule.items()))


class UnfreezeSchedule:
    """Activates blocks 2 and 3 at scheduled epochs, or earlier when the metric plateaus.

    Progressive unfreezing as in Howard & Ruder 2018 ("Universal Language Model Fine-tuning",
    ULMFiT): the network grows one block at a time, and older layers can get smaller learning
    rates than the newest one (their discriminative fine-tuning, here ``old_group_decay``). A
    block is activated at its scheduled epoch at the latest; a plateau of ``plateau_patience``
    epochs brings it forward, because training more of a network that has stopped improving wastes
    epochs. Two activations are always at least ``min_gap`` epochs apart, so each block gets time
    to settle before the next one joins.

    Args:
        activate_at: block -> epoch at whose end it activates, as a dict or (block, epoch) pairs.
            Blocks must be 2, 3, ... without holes; epochs must grow by at least ``min_gap``, the
            first at least ``min_gap``. Blocks not listed are never activated.
        plateau_patience: epochs without improvement that bring the next activation forward;
            None turns the plateau rule off.
        min_gap: least number of epochs between two activations (and before the first); >= 1.
        mode: ``"max"`` when a higher metric is better, ``"min"`` for a loss.
        lr_mult: learning-rate multiplier of each new block's parameter group; blocks not listed
            get 1.
        old_group_decay: multiplier, in (0, 1], applied to the older groups' rates at each
            activation; < 1 gives discriminative rates.
        warmup_epochs: a new group's rate rises linearly from 0.1x to 1x over this many epochs;
            0 turns warmup off.
        monitor: name of the metric, used in ``last_reason`` only.
        num_stages: the model's stage count, the deepest depth there is.
        first_depth: the first depth that joins (the run starts one below it: 2 for a network
            that grows from stage 1, 1 for one that thaws from the head alone).

    "Block k" here is depth k: k stages trainable, whichever direction they join in.
    """

    def __init__(
        self,
        activate_at: Mapping[int, int] | Sequence[tuple[int, int]] | None = None,
        plateau_patience: int | None = 5,
        min_gap: int = 5,
        mode: Literal["max", "min"] = "max",
        lr_mult: Mapping[int, float] | None = None,
        old_group_decay: float = 1.0,
        warmup_epochs: float = 0.0,
        monitor: str = "val_acc",
        num_stages: int = 3,
        first_depth: int = 2,
    ) -> None:
        # None stands for the defaults so that no mutable default is shared between instances.
        activate_at = {2: 15, 3: 30} if activate_at is None else activate_at
        lr_mult = {2: 1.0, 3: 1.0} if lr_mult is None else lr_mult
        if not is_int(num_stages) or num_stages < 1:
            raise _invalid("num_stages", num_stages, "an int >= 1")
        if not is_int(first_depth) or not 1 <= first_depth <= num_stages + 1:
            raise _invalid("first_depth", first_depth, f"an int in 1..{num_stages + 1}")
        self.num_stages, self.first_depth = num_stages, first_depth
        if plateau_patience is not None and (not is_int(plateau_patience) or plateau_patience < 1):
            raise _invalid("plateau_patience", plateau_patience, "None or an int >= 1")
        if not is_int(min_gap) or min_gap < 1:
            raise _invalid("min_gap", min_gap, "an int >= 1")
        if mode not in ("max", "min"):
            raise _invalid("mode", mode, "'max' | 'min'")
        if not is_real(old_group_decay) or not 0 < old_group_decay <= 1:
            raise _invalid("old_group_decay", old_group_decay, "a float in (0, 1]")
        if not is_real(warmup_epochs) or warmup_epochs < 0:
            raise _invalid("warmup_epochs", warmup_epochs, "a finite float >= 0")
        self.activate_at = _as_schedule(activate_at)
        self.plateau_patience = plateau_patience
        self.min_gap = min_gap
        self.mode = mode
        self.lr_mult = self._check_lr_mult(lr_mult)
        self.old_group_decay = float(old_group_decay)
        self.warmup_epochs = float(warmup_epochs)
        self.monitor = monitor
        self._check_schedule()
        self.last_activation_epoch = 0
        self.wait = 0  # epochs since the metric last improved (or since the last activation)
        self.best: float | None = None
        self.last_reason = ""

    def _check_schedule(self) -> None:
        blocks = list(self.activate_at)
        first, last = self.first_depth, self.num_stages
        expected = list(range(first, first + len(blocks)))
        if blocks != expected or len(blocks) > last - first + 1:
            allowed = f"blocks {first}..k without holes, k <= {last}"
            raise _invalid("activate_at", self.activate_at, allowed)
        previous = 0
        for block, epoch in self.activate_at.items():
            if not is_int(epoch) or epoch < previous + self.min_gap:
                allowed = f"an int >= {previous + self.min_gap} (min_gap={self.min_gap} after "
                allowed += "the start)" if previous == 0 else f"block {block - 1} at {previous})"
                raise _invalid(f"activate_at[{block}]", epoch, allowed)
            previous = epoch

    def _check_lr_mult(self, lr_mult: Mapping[int, float]) -> dict[int, float]:
        if not isinstance(lr_mult, Mapping):
            raise _invalid("lr_mult", lr_mult, "a dict block -> multiplier")
        for block, mult in lr_mult.items():
            first, last = self.first_depth, self.num_stages
            if not is_int(block) or not first <= block <= last:
                raise _invalid("lr_mult key", block, f"a block in {first}..{last}")
            if not is_real(mult) or mult <= 0:
                raise _invalid(f"lr_mult[{block}]", mult, "a finite float > 0")
        return {block: float(mult) for block, mult in sorted(lr_mult.items())}

    # ----------------------------------------------------------------- decisions

    def decide(self, epoch: int, metric: float, active_blocks: int) -> int | None:
        """The block to activate at the end of ``epoch``, or None; at most one per call.

        ``metric`` is the epoch's monitored value and ``active_blocks`` how many blocks the model
        runs now. Returning a block records the activation (``last_activation_epoch``,
        ``last_reason``), so the caller must activate it.
        """
        if (
            not is_int(active_blocks)
            or not self.first_depth - 1 <= active_blocks <= self.num_stages
        ):
            raise _invalid(
                "decide: active_blocks",
                active_blocks,
                f"an int in {self.first_depth - 1}..{self.num_stages}",
            )
        self._track(metric)
        block = active_blocks + 1
        scheduled = self.activate_at.get(block)
        # The gap rule also holds for scheduled epochs; _check_schedule makes it a no-op there
        # unless epochs were skipped.
        if scheduled is None or epoch - self.last_activation_epoch < self.min_gap:
            return None
        if epoch >= scheduled:
            return self._activate(block, epoch, f"scheduled at epoch {scheduled}")
        if self.plateau_patience is not None and self.wait >= self.plateau_patience:
            return self._activate(block, epoch, f"{self.monitor} plateaued for {self.wait} epochs")
        return None

    def _track(self, metric: float) -> None:
        # A NaN never becomes the best: every later comparison with it would be False.
        better = math.isfinite(metric) and (
            self.best is None or (metric > self.best if self.mode == "max" else metric < self.best)
        )
        if better:
            self.best, self.wait = float(metric), 0
        else:
            self.wait += 1

    def _activate(self, block: int, epoch: int, reason: str) -> int:
        self.last_activation_epoch = epoch
        self.last_reason = f"block {block}: {reason}"
        # The new block gets a full plateau period; the best is kept, as the metric is the same.
        self.wait = 0
        return block

    def final_activation_epoch(self) -> int:
        """Latest epoch at whose end a block activates (0 without a schedule).

        Activations only come earlier than scheduled, never later, so early stopping and weight
        averaging can wait for this epoch to be sure that every block is in.
        """
        return max(self.activate_at.values(), default=0)

    # ----------------------------------------------------------------- learning rates

    def group_lr_factor(self, block: int, epochs_since_activation: float) -> float:
        """Multiplier of block ``block``'s group lr: ``lr_mult`` times its warmup factor.

        The warmup factor rises linearly from 0.1 at activation to 1 after ``warmup_epochs``
        (fractions of an epoch allowed, for per-step use); it is 1 when warmup is off.
        """
        if not is_int(block) or not 1 <= block <= self.num_stages:
            raise _invalid("group_lr_factor: block", block, f"an int in 1..{self.num_stages}")
        if not is_real(epochs_since_activation) or epochs_since_activation < 0:
            raise _invalid(
                "group_lr_factor: epochs_since_activation", epochs_since_activation, "a float >= 0"
            )
        mult = self.lr_mult.get(block, 1.0)
        if self.warmup_epochs == 0:
            return mult
        progress = min(1.0, epochs_since_activation / self.warmup_epochs)
        return mult * (WARMUP_START + (1.0 - WARMUP_START) * progress)

    def old_group_factor(self, block: int, active_blocks: int) -> float:
        """Cumulative ``old_group_decay`` of block ``block``'s group once ``active_blocks`` run.

        Each activation after ``block``'s own multiplies its rate by the decay once.
        """
        if (
            not is_int(active_blocks)
            or not self.first_depth - 1 <= active_blocks <= self.num_stages
        ):
            raise _invalid(
                "old_group_factor: active_blocks", active_blocks, f"1..{self.num_stages}"
            )
        if not is_int(block) or not 1 <= block <= active_blocks:
            raise _invalid("old_group_factor: block", block, f"an int in 1..{active_blocks}")
        return self.old_group_decay ** (active_blocks - block)

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {
            "last_activation_epoch": self.last_activation_epoch,
            "wait": self.wait,
            "best": self.best,
            "last_reason": self.last_reason,
        }

    def load_state_dict(self, state: dict) -> None:
        self.last_activation_epoch = int(state["last_activation_epoch"])
        self.wait = int(state["wait"])
        self.best = None if state["best"] is None else float(state["best"])
        self.last_reason = str(state["last_reason"])


class Unfreeze(Callback):
    """Unfreezes the next stage when :class:`UnfreezeSchedule` says so; with a model that blends
    heads, the classifier's input fades from the previous depth's features to the new one's over
    ``head_blend_epochs`` (0: at once)."""

    name = "unfreeze"

    def __init__(self, schedule: UnfreezeSchedule, head_blend_epochs: float = 0.0) -> None:
        self.schedule = schedule
        self.head_blend_epochs = head_blend_epochs

    def on_validation_end(self, trainer: Any, metrics: dict) -> None:
        metric = float(metrics[trainer.config.run.monitor])
        depth = self.schedule.decide(metrics["epoch"], metric, trainer.depth)
        if depth is None:
            return
        s = self.schedule
        trainer.unfreeze_to(
            depth,
            lr_mult=s.lr_mult.get(depth, 1.0),
            warmup_epochs=s.warmup_epochs,
            old_group_decay=s.old_group_decay,
            head_blend_epochs=self.head_blend_epochs,
            # The banner's title names the stage already.
            reason=s.last_reason.removeprefix(f"block {depth}: "),
        )
        metrics["unfreeze"] = s.last_reason

    def state_dict(self) -> dict:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state)
