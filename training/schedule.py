"""Learning-rate schedules as pure functions of the optimizer step, and an object to apply them.

The loop owns the step count (the stepper increments it once per optimizer step, so gradient
accumulation does not stretch the schedule); the schedule only maps a step to a factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup from ~0 to 1 over ``warmup_steps``, then cosine decay to ``min_ratio``.

    Args:
        step: optimizer steps taken so far (0 before the first step).
        warmup_steps: length of the warmup; 0 starts at the peak.
        total_steps: step at which the cosine reaches ``min_ratio``; later steps stay there.
        min_ratio: floor as a fraction of the peak learning rate, in [0, 1].
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRSchedule:
    """Sets every parameter group's lr to ``group["base_lr"] * factor(step)``.

    Groups added to the optimizer later (a block activated by progressive unfreezing) follow the
    same schedule from the step they join: a group without ``base_lr`` takes its current ``lr`` as
    its base. This is what OneCycleLR and ReduceLROnPlateau do not do for late groups.

    Args:
        optimizer: the optimizer whose groups it drives.
        factor: a pure function of the optimizer step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[int], float]) -> None:
        self.optimizer = optimizer
        self.factor = factor
        self.last_step = 0
        self.apply()

    def apply(self) -> None:
        f = self.factor(self.last_step)
        for group in self.optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
            group["lr"] = group["base_lr"] * f

    def step(self) -> None:
        self.last_step += 1
        self.apply()

    def lrs(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self.apply()
