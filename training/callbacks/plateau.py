"""The reduce-on-plateau cut of the staged learning-rate schedule, as a callback."""

from __future__ import annotations

from typing import Any

from training.engine.events import Callback
from training.engine.monitor import monitor_mode


class PlateauCut(Callback):
    """Feeds the staged schedule's reduce-on-plateau state and reports its cuts."""

    name = "lr_plateau"

    def on_validation_end(self, trainer: Any, metrics: dict) -> None:
        plateau = trainer.schedule.plateau
        if plateau is None or trainer.rolled_back:
            return
        monitor = trainer.config.run.monitor
        if plateau.update(metrics["epoch"], float(metrics[monitor]), monitor_mode(monitor)):
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
