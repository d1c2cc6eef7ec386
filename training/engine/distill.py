"""Knowledge distillation (Hinton, Vinyals & Dean 2015): a trained teacher's softened
predictions as a second training signal for the student.

The loss of a batch becomes::

    (1 - alpha) * base_loss + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

with the KL divergence averaged over the batch (``batchmean``). The T^2 keeps the gradient of the
distillation term on the scale of the base loss's when T changes (the softened gradients shrink
as 1/T^2). An ensemble teacher (several run folders) gives the mean of its members' logits.

The teacher runs on the fly, on exactly the batch the student sees: with random augmentation
(drawn afresh every epoch) and Mixup (a new partner and mixing weight per batch) no two epochs
show the model the same inputs, so teacher logits cannot be computed once and cached per image or
per epoch. It runs in eval mode (no dropout or noise, running BatchNorm statistics), frozen and
under ``torch.no_grad()``, inside the student's autocast; being deterministic on the CPU, a
resumed run gets the same teacher logits, and resume stays bit-exact.

This lives in ``training/engine`` beside :mod:`training.engine.mixup` rather than among the
callbacks: like Mixup it is called by the batch loop itself (``loss = distill(x, logits,
loss)``), which no event hook can do. It is also a :class:`Callback` only to add the epoch's
``kd_loss`` (the mean distillation term) to the metrics and keep that sum across a resume.
The teachers are rebuilt from their run folders by :mod:`training.evaluation.teachers`.

Public API:
    Distillation, Teacher, kd_term, distill_loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn

from training.engine.events import Callback


def kd_term(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch.

    Computed in float32 whatever the autocast: the softmax of logits divided by T is where half
    precision loses most.
    """
    t = float(temperature)
    log_p_student = F.log_softmax(student.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher.float() / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


def distill_loss(
    base: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """(1 - alpha) * ``base`` + alpha * :func:`kd_term`."""
    return (1.0 - alpha) * base + alpha * kd_term(student, teacher, temperature)


@dataclass
class Teacher:
    """One trained run used as (a member of) the teacher.

    ``scale``/``shift``: the student's normalised batch ``x`` becomes the teacher's as
    ``x * scale + shift`` (per channel), or ``None`` when both were trained with the same
    mean/std.
    """

    run_dir: Path
    weights: str
    model: nn.Module
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            x = x * self.scale + self.shift
        return self.model(x)


class Distillation(Callback):
    """The distillation loss of a batch, with the teacher's logits computed on that batch.

    Args:
        teachers: one or more :class:`Teacher` (several: an ensemble, their logits averaged).
        temperature: the softmax temperature T (> 0).
        alpha: weight of the distillation term, in [0, 1].
    """

    name = "distill"

    def __init__(self, teachers: Sequence[Teacher], temperature: float, alpha: float) -> None:
        if not teachers:
            raise ValueError("Distillation needs at least one teacher")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} is invalid; allowed: a number > 0")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha={alpha!r} is invalid; allowed: a number in [0, 1]")
        self.teachers = list(teachers)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        # The epoch's sum of the distillation term, kept on the device (no sync per batch).
        self._epoch = 0
        self._sum: torch.Tensor | float = 0.0
        self._seen = 0

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of the teachers' logits on ``x`` (B, C, H, W) -> (B, num_classes)."""
        total = None
        for teacher in self.teachers:
            logits = teacher(x).float()
            total = logits if total is None else total + logits
        return total / len(self.teachers)

    def __call__(self, x: torch.Tensor, logits: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """The batch's loss with distillation, from its input ``x`` (as the student saw it, mixed
        under Mixup), the student's ``logits`` and the base ``loss``."""
        kd = kd_term(logits, self.teacher_logits(x), self.temperature)
        self._sum = self._sum + kd.detach() * len(x)
        self._seen += len(x)
        return (1.0 - self.alpha) * loss + self.alpha * kd

    # ----------------------------------------------------------------- the kd_loss metric

    def on_fit_start(self, trainer) -> None:
        # A resumed epoch's sum so far is rank 0's (it alone saves); the others start from 0.
        if not trainer.world.is_main:
            self._sum, self._seen = 0.0, 0

    def on_epoch_start(self, trainer, epoch: int) -> None:
        if epoch != self._epoch:  # a resumed epoch keeps the sum of its batches before the stop
            self._epoch, self._sum, self._seen = epoch, 0.0, 0

    def on_validation_end(self, trainer, metrics: dict) -> None:
        total, seen = trainer.sum_over_processes([float(self._sum), self._seen])
        metrics["kd_loss"] = total / max(1, seen)

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "sum": float(self._sum), "seen": self._seen}

    def load_state_dict(self, state: dict) -> None:
        self._epoch = int(state.get("epoch", 0))
        self._sum = float(state.get("sum", 0.0))
        self._seen = int(state.get("seen", 0))
