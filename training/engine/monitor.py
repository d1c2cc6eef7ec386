"""Which way a monitored metric improves: the one definition every feature uses.

A run monitors ``run.monitor`` (``val_acc``, ``val_macro_f1`` or ``val_loss``); the best
checkpoint, rollback, early stopping, the plateau triggers and the console's colouring all ask
:func:`monitor_mode` or :func:`is_better` rather than deciding on their own.

Public API:
    Mode, MODES, monitor_mode, is_better, worsening.
"""

from __future__ import annotations

from typing import Literal

Mode = Literal["max", "min"]
MODES: tuple[str, ...] = ("max", "min")


def monitor_mode(monitor: str) -> Mode:
    """``"min"`` for a loss (lower is better), ``"max"`` for every other metric."""
    return "min" if monitor.endswith("loss") else "max"


def is_better(value: float, best: float | None, mode: str) -> bool:
    """Whether ``value`` improves on ``best`` (any value improves on ``None``)."""
    return best is None or (value < best if mode == "min" else value > best)


def worsening(metric: float, best: float, mode: str) -> float:
    """How far ``metric`` is on the bad side of ``best`` (negative when it is better)."""
    return best - metric if mode == "max" else metric - best
