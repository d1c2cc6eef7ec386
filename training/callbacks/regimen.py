"""The regimen: which feature callbacks a config switches on, and in what order.

Each feature lives in its own module of this package, its decision unit (a plain class with its
own tests) beside the thin callback that feeds it the epoch's
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

from collections.abc import Collection
from typing import Any

from losses import WeightedCrossEntropy
from training.callbacks.class_penalty import ClassPenalty, ClassPenaltyControl
from training.callbacks.dropout import DropoutControl, DynamicDropout
from training.callbacks.early_stop import EarlyStop, EarlyStopping
from training.callbacks.plateau import PlateauCut
from training.callbacks.rollback import Rollback, RollbackPolicy
from training.callbacks.swa import StochasticWeightAveraging
from training.callbacks.temperature import TemperatureScaling
from training.callbacks.unfreeze import Unfreeze, UnfreezeSchedule
from training.config.plan import stage_plan
from training.config.schema import TrainConfig, unfreezes
from training.engine.events import Callback
from training.engine.monitor import monitor_mode


def regimen_callbacks(
    cfg: TrainConfig,
    criterion: WeightedCrossEntropy,
    mixup: Any,
    capabilities: Collection[str] = frozenset({"dropout"}),
) -> list[Callback]:
    """The regimen's callbacks that ``cfg`` switches on, in the order they must run.

    ``capabilities`` are the model's (:mod:`models.staged`): dynamic dropout needs ``dropout``.
    """
    monitor, mode = cfg.run.monitor, monitor_mode(cfg.run.monitor)
    s, r, b = cfg.safety, cfg.regularize, cfg.balance
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
    if unfreezes(cfg):
        callbacks.append(Unfreeze(unfreeze, cfg.unfreeze.head_blend_epochs))
    if r.dynamic_dropout and "dropout" in capabilities:
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
    last = _unfreeze_schedule(cfg).final_activation_epoch() if unfreezes(cfg) else 0
    return max(last, cfg.safety.swa_start_epoch if cfg.safety.swa else 0)


def _unfreeze_schedule(cfg: TrainConfig) -> UnfreezeSchedule:
    u, plan = cfg.unfreeze, stage_plan(cfg)
    # Entry i of activate_at is depth plan.first + i; a run that starts deeper skips the
    # entries it passed.
    depths = range(plan.first, len(plan.names) + 1)
    return UnfreezeSchedule(
        activate_at={d: int(e) for d, e in zip(depths, u.activate_at, strict=False)},
        plateau_patience=u.plateau_patience or None,
        min_gap=u.min_gap,
        mode=monitor_mode(cfg.run.monitor),
        lr_mult={d: m for d, m in zip(depths, u.lr_mult, strict=False)},
        old_group_decay=u.old_group_decay,
        warmup_epochs=u.warmup_epochs,
        monitor=cfg.run.monitor,
        num_stages=len(plan.names),
        first_depth=plan.first,
    )
