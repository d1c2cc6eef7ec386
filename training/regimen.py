"""The regimen's features as thin callbacks: each turns a decision unit's answer into an action.

The decisions themselves live in small units with their own tests (:mod:`training.unfreeze`,
:mod:`training.safety`, :mod:`training.dropout_control`, :mod:`training.balance`,
:mod:`training.schedule`, :mod:`training.calibration`). The callbacks here feed them the epoch's
metrics at ``on_validation_end`` (before ``last.pt`` is written, so a resumed run continues from
the decided state), carry out what they decide on the trainer, record it in the epoch's metrics
(``metrics.jsonl``) and report it through :meth:`Trainer.notify`. The console shows a banner only
for a decision a user should see (a stage change, a rollback, SWA starting and ending, an early
stop, a dropout move, a class-penalty drift past :attr:`ClassPenalty.notable_move`) and for
warnings; the plateau cut and the calibration are notices with ``banner=False``: the logs keep
them, the epoch line shows the lr and the closing summary the temperatures.

Order matters and is fixed by :func:`regimen_callbacks`: rollback first (a rolled-back epoch's
metrics say nothing about the restored weights, so later decisions of that epoch skip), then the
plateau cut, unfreezing, dropout, class penalty, SWA and early stopping; at the end of the run
SWA is finalised before temperature scaling, which calibrates best.pt and swa.pt.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, update_bn

from losses import WeightedCrossEntropy
from training.balance import ClassPenalty, moved_classes
from training.calibration import calibration_report, choose_temperature
from training.checkpoint import copy_checkpoint, load_checkpoint, restore_model, save_checkpoint
from training.config import TrainConfig
from training.dropout_control import DynamicDropout, apply_rates
from training.evaluate import predict
from training.events import Callback, StopTraining
from training.safety import EarlyStopping, RollbackPolicy
from training.trainer import LOWER_IS_BETTER
from training.tta import resolve_tta
from training.unfreeze import UnfreezeSchedule


def _mode(monitor: str) -> str:
    return "min" if monitor in LOWER_IS_BETTER else "max"


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
        if not math.isfinite(metric):
            return False
        if self.best is None:
            return True
        return metric < self.best if self.policy.mode == "min" else metric > self.best

    def on_validation_end(self, trainer: Any, metrics: dict) -> None:
        self._improved = False
        if trainer.model.active_blocks != self.stage:
            self.stage = trainer.model.active_blocks
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


class PlateauCut(Callback):
    """Feeds the staged schedule's reduce-on-plateau state and reports its cuts."""

    name = "lr_plateau"

    def on_validation_end(self, trainer: Any, metrics: dict) -> None:
        plateau = trainer.schedule.plateau
        if plateau is None or trainer.rolled_back:
            return
        monitor = trainer.config.run.monitor
        if plateau.update(metrics["epoch"], float(metrics[monitor]), _mode(monitor)):
            trainer.schedule.apply()
            metrics["lr_plateau_scale"] = plateau.scale
            trainer.notify(
                "schedule",
                "learning rate reduced on plateau",
                [
                    f"{monitor} did not improve for {plateau.sched.plateau_patience} epochs",
                    f"plateau scale now {plateau.scale:g}; lr {trainer.schedule.lrs()[0]:.2e}",
                ],
                banner=False,  # the epoch line's lr shows it
            )


class Unfreeze(Callback):
    """Activates the next block when :class:`UnfreezeSchedule` says so; the classifier's input
    fades from the previous head to the new one over ``head_blend_epochs`` (0: at once)."""

    name = "unfreeze"

    def __init__(self, schedule: UnfreezeSchedule, head_blend_epochs: float = 0.0) -> None:
        self.schedule = schedule
        self.head_blend_epochs = head_blend_epochs

    def on_validation_end(self, trainer: Any, metrics: dict) -> None:
        active = trainer.model.active_blocks
        metric = float(metrics[trainer.config.run.monitor])
        block = self.schedule.decide(metrics["epoch"], metric, active)
        if block is None:
            return
        s = self.schedule
        trainer.activate_block(
            block,
            lr_mult=s.lr_mult.get(block, 1.0),
            warmup_epochs=s.warmup_epochs,
            old_group_decay=s.old_group_decay,
            head_blend_epochs=self.head_blend_epochs,
            # The banner's title names the block already.
            reason=s.last_reason.removeprefix(f"block {block}: "),
        )
        metrics["unfreeze"] = s.last_reason

    def state_dict(self) -> dict:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state)


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


class ClassPenaltyControl(Callback):
    """Updates per-class loss weights from each class's train-val gap and validation recall.

    The weights are logged every epoch (``class_penalty``); a banner comes only when a class's
    weight has drifted more than :attr:`ClassPenalty.notable_move` (more than a single epoch can
    move it from rest) since the last banner, or since the start for the first: the small moves
    of every epoch stay in the log.
    """

    name = "class_penalty"

    def __init__(self, penalty: ClassPenalty, criterion: WeightedCrossEntropy) -> None:
        self.penalty = penalty
        self.criterion = criterion
        self.announced: list[float] = penalty.weights.tolist()
        self.announced_epoch = 0

    def on_validation_end(self, trainer: Any, metrics: dict) -> None:
        if trainer.rolled_back:
            return
        recall = metrics["val_recall_per_class"]
        weights = self.penalty.update(metrics["train_acc_per_class"], recall, recall).tolist()
        self.criterion.set_penalty(self.penalty.weights)
        metrics["class_penalty"] = [round(w, 4) for w in weights]
        moved = moved_classes(weights, self.announced, self.penalty.notable_move)
        if not moved:
            return
        names = trainer.cache.class_names
        moves = ", ".join(f"{names[c]} {self.announced[c]:.2f} -> {weights[c]:.2f}" for c in moved)
        since = f"epoch {self.announced_epoch}" if self.announced_epoch else "the start"
        trainer.notify("balance", "class penalty", [f"{moves} since {since}"])
        self.announced, self.announced_epoch = weights, int(metrics["epoch"])

    def state_dict(self) -> dict:
        state = self.penalty.state_dict()
        return {**state, "announced": self.announced, "announced_epoch": self.announced_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.penalty.load_state_dict(state)
        self.criterion.set_penalty(self.penalty.weights)
        # A checkpoint from before announcements were tracked: count drift from here on.
        self.announced = list(state.get("announced", self.penalty.weights.tolist()))
        self.announced_epoch = int(state.get("announced_epoch", 0))


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
        if trainer.model.active_blocks != self.stage:
            # A new stage gets a full patience: its first epochs dip while the block settles.
            self.stage = trainer.model.active_blocks
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


class StochasticWeightAveraging(Callback):
    """SWA (Izmailov et al. 2018) with :class:`torch.optim.swa_utils.AveragedModel`.

    From ``start_epoch`` on, each epoch's final weights enter the average. At the end of a run
    that was not interrupted, the BatchNorm statistics of the average are recomputed with
    :func:`~torch.optim.swa_utils.update_bn` on the training data and the weights are saved as
    ``checkpoints/swa.pt``. The average is part of the checkpoint, so a resumed run continues it.
    """

    name = "swa"

    def __init__(self, start_epoch: int) -> None:
        self.start_epoch = start_epoch
        self.averaged: AveragedModel | None = None
        self._pending: dict | None = None

    def _ensure(self, trainer: Any) -> AveragedModel:
        if self.averaged is None:
            self.averaged = AveragedModel(trainer.model, use_buffers=False)
            if self._pending is not None:
                self.averaged.load_state_dict(self._pending)
                self._pending = None
        return self.averaged

    def on_fit_start(self, trainer: Any) -> None:
        if self._pending is not None:
            self._ensure(trainer)

    @property
    def n_averaged(self) -> int:
        return 0 if self.averaged is None else int(self.averaged.n_averaged)

    def on_validation_end(self, trainer: Any, metrics: dict) -> None:
        if metrics["epoch"] < self.start_epoch:
            return
        averaged = self._ensure(trainer)
        averaged.update_parameters(trainer.model)
        metrics["swa_models"] = self.n_averaged
        if self.n_averaged == 1:
            first = f"the weights of epoch {metrics['epoch']} and every later epoch are averaged"
            trainer.notify("swa", "SWA started", [first])

    def on_fit_end(self, trainer: Any, summary: dict) -> None:
        if trainer.stopped == "interrupted" or not trainer.is_main:
            return
        if self.n_averaged == 0:
            summary["swa"] = {"models": 0, "note": "no epoch reached swa_start_epoch"}
            ended = f"the run ended before epoch {self.start_epoch}"
            trainer.notify("swa", "no weights averaged", [ended])
            return
        averaged = self._ensure(trainer)
        # Frozen blocks are averaged too (their weights do not change); the activations
        # (active_blocks, head mix, dropout) are the live model's, not those of the epoch the
        # average began (or of a resumed run's start): update_bn must see what swa.pt will run.
        live, module = trainer.model, averaged.module
        module.load_state_dict({**live.state_dict(), **module.state_dict()})
        module.freeze_blocks_until(live.active_blocks)
        module.set_head_mix(live.head_mix)
        for block, rate in enumerate(live.dropout_rates(), start=1):
            module.set_dropout(block, rate)
        self._update_bn(trainer, module)
        path = trainer.save_weights(
            "swa.pt", averaged.module.state_dict(), swa={"models": self.n_averaged}
        )
        summary["swa"] = {"models": self.n_averaged, "file": str(path)}
        summary["files"]["swa"] = str(path)
        trainer.notify(
            "swa",
            f"SWA finished: {self.n_averaged} epochs averaged",
            [f"BatchNorm statistics recomputed on the training data; saved {path.name}"],
        )

    @staticmethod
    def _update_bn(trainer: Any, module: Any) -> None:
        """Recompute ``module``'s BatchNorm statistics on the training data, reproducibly.

        The pass draws its batches, augmentation and dropout from seeds of the run (the data
        seeded as for the last epoch), not from whatever state the run ended in, so a resumed
        end phase gives the same statistics as an uninterrupted one; the run's own random
        state is left as it was. A Ctrl-C stops it between batches.
        """
        devices = [trainer.device] if trainer.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(trainer.config.run.seed)
            trainer.seed_epoch(int(trainer.history[-1]["epoch"]))
            batches = _until_interrupted(trainer.loaders["train"], trainer)
            update_bn(batches, module, device=trainer.device)

    def state_dict(self) -> dict:
        return {"averaged": None if self.averaged is None else self.averaged.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.averaged = None
        self._pending = state.get("averaged")


def _until_interrupted(batches: Iterable, trainer: Any) -> Iterator:
    """``batches``, stopping with :class:`~training.trainer.Interrupted` after a Ctrl-C."""
    for batch in batches:
        trainer.check_interrupt()
        yield batch


class TemperatureScaling(Callback):
    """Fits one temperature per weights file (best.pt, swa.pt) on the validation set at the end
    (Guo et al. 2017) and stores it, with NLL and ECE before and after, in that file.

    Args:
        tta: test-time augmentation mode (``training.tta``) of the validation logits the
            temperature is fitted on; the resolved mode is stored as ``"temperature_tta"``.
    """

    name = "temperature"

    def __init__(self, tta: str = "none") -> None:
        resolve_tta(tta, 3)  # an unknown mode fails here, before training
        self.tta = tta

    def on_fit_end(self, trainer: Any, summary: dict) -> None:
        if trainer.stopped == "interrupted" or not trainer.is_main:
            return
        results = {}
        for name in ("best", "swa"):
            path = trainer.checkpoint_dir / f"{name}.pt"
            if path.exists():
                trainer.check_interrupt()  # each file is rewritten whole or not at all
                results[name] = self._calibrate(trainer, path)
        mode = resolve_tta(self.tta, trainer.model.config.in_channels)
        summary["calibration"] = {name: {**r, "tta": mode} for name, r in results.items()}
        lines = [
            f"{name}: T={r['temperature']:.3f}  NLL {r['nll_before']:.4f} -> {r['nll_after']:.4f}"
            f"  ECE {100 * r['ece_before']:.2f}% -> {100 * r['ece_after']:.2f}%"
            for name, r in results.items()
        ]
        where = "validation set" if mode == "none" else f"validation set, tta={mode}"
        # A result, not a decision: the closing summary shows it.
        trainer.notify("calibration", f"temperature scaling ({where})", lines, banner=False)
        kept = [f"{name}: {r['reason']}" for name, r in results.items() if r.get("reason")]
        if kept:
            trainer.notify(
                "warning",
                "temperature kept at 1; the validation split may leak into training",
                kept,
            )

    def _calibrate(self, trainer: Any, path) -> dict:
        ckpt = load_checkpoint(path)
        model = copy.deepcopy(trainer.model)
        restore_model(model, ckpt)
        mode = resolve_tta(self.tta, model.config.in_channels)
        logits, labels = predict(
            model, trainer.loaders["val"], trainer.device, trainer.amp_dtype, tta=mode
        )
        fit = choose_temperature(logits, labels)
        report = calibration_report(logits, labels, fit.temperature)
        result: dict = {k: float(v) for k, v in report.items()}
        ckpt["temperature"] = float(fit.temperature)
        ckpt["temperature_tta"] = mode
        ckpt.pop("temperature_reason", None)
        if fit.reason is not None:  # test.py shows why this file's T is 1
            result["reason"] = ckpt["temperature_reason"] = fit.reason
        ckpt["calibration"] = result
        save_checkpoint(ckpt, path)
        return result


def regimen_callbacks(
    cfg: TrainConfig, criterion: WeightedCrossEntropy, mixup: Any
) -> list[Callback]:
    """The regimen's callbacks that ``cfg`` switches on, in the order they must run."""
    monitor, mode = cfg.run.monitor, _mode(cfg.run.monitor)
    s, u, r, b = cfg.safety, cfg.unfreeze, cfg.regularize, cfg.balance
    callbacks: list[Callback] = []
    if s.rollback:
        policy = RollbackPolicy(
            threshold=s.rollback_threshold,
            max_rollbacks=s.max_rollbacks,
            lr_cut=s.rollback_lr_cut,
            mode=mode,
            monitor=monitor,
            patience=s.rollback_patience,
        )
        callbacks.append(Rollback(policy))
    if cfg.schedule.kind == "staged":
        callbacks.append(PlateauCut())
    unfreeze = _unfreeze_schedule(cfg)
    if u.enabled:
        callbacks.append(Unfreeze(unfreeze, cfg.unfreeze.head_blend_epochs))
    if r.dynamic_dropout:
        control = DynamicDropout(
            base_rates=[min(max(p, r.dropout_min), r.dropout_max) for p in cfg.model.dropout],
            min_rate=r.dropout_min,
            max_rate=r.dropout_max,
            step=r.dropout_step,
            overfit_gap=r.overfit_gap,
            underfit_gap=r.underfit_gap,
            signal=r.dropout_signal,
        )
        callbacks.append(DropoutControl(control, mixup))
    if b.penalty:
        penalty = ClassPenalty(
            criterion.base.numel(),
            momentum=b.penalty_momentum,
            strength=b.penalty_strength,
            min_weight=b.penalty_min,
            max_weight=b.penalty_max,
        )
        callbacks.append(ClassPenaltyControl(penalty, criterion))
    if s.swa:
        callbacks.append(StochasticWeightAveraging(s.swa_start_epoch))
    if s.early_stop:
        stopper = EarlyStopping(
            patience=s.patience,
            min_delta=s.min_delta,
            mode=mode,
            not_before_epoch=earliest_stop_epoch(cfg),
            monitor=monitor,
        )
        callbacks.append(EarlyStop(stopper))
    if s.temperature:
        callbacks.append(TemperatureScaling(tta=cfg.run.tta))
    return callbacks


def earliest_stop_epoch(cfg: TrainConfig) -> int:
    """The last epoch at which early stopping may not yet end the run.

    Not before the last scheduled activation (every block must have joined), and with SWA on
    not before ``safety.swa_start_epoch``: validation accuracy swings most while the rate is
    high, so a patience can run out in the middle of the schedule, and a run stopped there
    would end with no weight average at all (no ``swa.pt`` for ``test.py`` to compare).
    """
    last = _unfreeze_schedule(cfg).final_activation_epoch() if cfg.unfreeze.enabled else 0
    return max(last, cfg.safety.swa_start_epoch if cfg.safety.swa else 0)


def _unfreeze_schedule(cfg: TrainConfig) -> UnfreezeSchedule:
    u = cfg.unfreeze
    # activate_at lists blocks 2 and 3; a run that starts deeper skips the entries it passed.
    return UnfreezeSchedule(
        activate_at={2 + i: int(e) for i, e in enumerate(u.activate_at)},
        plateau_patience=u.plateau_patience or None,
        min_gap=u.min_gap,
        mode=_mode(cfg.run.monitor),
        lr_mult={block: m for block, m in zip((2, 3), u.lr_mult, strict=True)},
        old_group_decay=u.old_group_decay,
        warmup_epochs=u.warmup_epochs,
        monitor=cfg.run.monitor,
    )


__all__ = [
    "ClassPenaltyControl",
    "DropoutControl",
    "EarlyStop",
    "PlateauCut",
    "Rollback",
    "StochasticWeightAveraging",
    "TemperatureScaling",
    "Unfreeze",
    "earliest_stop_epoch",
    "regimen_callbacks",
]
