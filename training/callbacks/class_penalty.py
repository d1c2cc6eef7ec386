"""Adaptive per-class loss penalties, and the callback that moves them once per epoch.

- :class:`ClassPenalty`: per-class loss weights adjusted once per epoch from each class's
  train-validation accuracy gap and validation recall shortfall, smoothed by an exponential
  moving average. It follows the idea of re-weighting the loss by per-class performance rather
  than by frequency alone (cf. Cui et al., "Class-Balanced Loss Based on Effective Number of
  Samples", CVPR 2019; Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, does the
  same per sample).
- :func:`per_class_accuracy`: accuracy of each class (its recall) from logits or predictions.
- :class:`ClassPenaltyControl`: the callback that feeds it and writes the weights into the loss.

Public API:
    ClassPenalty, moved_classes, per_class_accuracy, ClassPenaltyControl.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from losses import WeightedCrossEntropy
from training.engine.events import Callback


def per_class_accuracy(
    logits_or_preds: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> list[float]:
    """Accuracy within each class: correct predictions among the samples of that class.

    This is the per-class recall. A class with no samples has no accuracy of its own; it gets the
    mean accuracy of the classes present (1.0 when none is), so that it neither looks overfit
    nor under-recalled to :class:`ClassPenalty` and stays NaN-free in logs.

    Args:
        logits_or_preds: logits (N, C) or predicted class indices (N,).
        labels: true class indices (N,).
        num_classes: C, at least 2.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} is invalid; allowed: an int >= 2")
    preds = logits_or_preds.argmax(dim=1) if logits_or_preds.ndim == 2 else logits_or_preds
    preds, labels = preds.detach().long().flatten().cpu(), labels.detach().long().flatten().cpu()
    if preds.shape != labels.shape:
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels; allowed: equal")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels span {labels.min()}..{labels.max()}; allowed: 0..{num_classes - 1}"
        )
    total = torch.bincount(labels, minlength=num_classes)[:num_classes].double()  # (C,)
    correct = torch.bincount(labels[preds == labels], minlength=num_classes)[:num_classes]
    present = total > 0
    acc = torch.zeros(num_classes, dtype=torch.float64)
    acc[present] = correct[present].double() / total[present]
    fill = acc[present].mean().item() if present.any() else 1.0
    acc[~present] = fill
    return acc.tolist()


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _invalid(name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"ClassPenalty {name}={value!r} is invalid; allowed: {allowed}")


class ClassPenalty:
    """Per-class loss weights that grow for classes that overfit or are poorly recalled.

    Each :meth:`update` (once per epoch) computes, for every class c,

    - ``gap_c = max(0, train_acc_c - val_acc_c)``: only overfitting counts, a class that does
      better on validation than on train is not rewarded;
    - ``shortfall_c = max(0, 1 - recall_c / mean(recall))``: how far the class's validation
      recall falls short of the mean recall, relative to it (0 for classes at or above the
      mean; 0 for all when ``use_recall`` is off, no recall is given or the mean is 0);
    - ``raw_c = 1 + strength * (gap_c + shortfall_c)``.

    Then, in this order: (1) exponential moving average with the previous weights,
    ``w = momentum * w_prev + (1 - momentum) * raw``, so one noisy epoch moves the weights only
    partway; (2) clip to [min_weight, max_weight]; (3) rescale to mean 1, so the overall loss
    scale (and with it the effective learning rate) stays put; (4) clip again, so the bounds
    always hold. The last clip can leave the mean slightly off 1 when a rescaled weight crossed a
    bound; the bounds win because they are the safety limit. Because step (2) comes before (3),
    the bounds limit the ratio between classes: raw (1, 1, 1, 11) clips to (1, 1, 1, 2) and
    rescales to (0.8, 0.8, 0.8, 1.6), so the top class need not reach ``max_weight`` itself.
    Non-finite inputs of a class (an absent class) count as no gap and no shortfall.

    The weights start at 1 and are meant for ``F.cross_entropy(weight=...)``; they can be
    multiplied with frequency weights (Cui et al. 2019).

    Args:
        num_classes: C, at least 2.
        momentum: weight of the previous weights in the moving average, in [0, 1).
        strength: scale of the penalty, >= 0 (0 keeps every weight at 1).
        min_weight: lower bound, in (0, 1].
        max_weight: upper bound, >= 1.
        use_recall: include the recall shortfall term.
    """

    def __init__(
        self,
        num_classes: int,
        momentum: float = 0.7,
        strength: float = 1.0,
        min_weight: float = 0.5,
        max_weight: float = 2.0,
        use_recall: bool = True,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise _invalid("num_classes", num_classes, "an int >= 2")
        if not _is_real(momentum) or not 0 <= momentum < 1:
            raise _invalid("momentum", momentum, "a number in [0, 1)")
        if not _is_real(strength) or strength < 0:
            raise _invalid("strength", strength, "a number >= 0")
        # Mean 1 must be reachable inside the bounds, hence min <= 1 <= max.
        if not _is_real(min_weight) or not 0 < min_weight <= 1:
            raise _invalid("min_weight", min_weight, "a number in (0, 1]")
        if not _is_real(max_weight) or max_weight < 1:
            raise _invalid("max_weight", max_weight, "a number >= 1")
        if not isinstance(use_recall, bool):
            raise _invalid("use_recall", use_recall, "True | False")
        self.num_classes = num_classes
        self.momentum = float(momentum)
        self.strength = float(strength)
        self.min_weight = float(min_weight)
        self.max_weight = float(max_weight)
        self.use_recall = use_recall
        self._weights = torch.ones(num_classes, dtype=torch.float64)
        self._delta = torch.zeros(num_classes, dtype=torch.float64)
        self.num_updates = 0

    @property
    def weights(self) -> torch.Tensor:
        """Current per-class weights (C,), float32, mean about 1."""
        return self._weights.float()

    def changes(self) -> list[float]:
        """Change of each class's weight made by the last :meth:`update` (zeros before it)."""
        return self._delta.tolist()

    @property
    def notable_move(self) -> float:
        """The largest move one :meth:`update` can make from weights at rest (all 1).

        The extreme epoch: one class with the largest possible estimate, a full train-val gap
        and (with ``use_recall``) no recall, ``1 + strength * 2``, the others with none. The
        moving average takes ``1 - momentum`` of that step, the bounds clip it, and the rescaling
        to mean 1 hands part of it back to the other classes. From weights at rest, then, a
        drift past this is never one epoch's noise, however extreme: it took several epochs
        pushing the same way. From weights already far from 1 one epoch can move further (a
        class falling back from a high weight), so the bound is a scale for what counts as a
        notable move, not a proof. The figure follows from the penalty's own settings and the
        class count, not from any dataset: 0.49 for 8 classes, 0.33 for 3, 0.23 for 2 with the
        defaults. (With ``momentum`` 0 every epoch replaces the weights outright, so no drift
        ever exceeds it: no move is a trend there.)
        """
        top = 1.0 + self.strength * (2.0 if self.use_recall else 1.0)
        smoothed = min(self.max_weight, self.momentum + (1.0 - self.momentum) * top)
        c = self.num_classes
        return min(self.max_weight, smoothed * c / (smoothed + c - 1)) - 1.0

    def _vector(self, name: str, values: Sequence[float]) -> torch.Tensor:
        vector = torch.as_tensor(list(values), dtype=torch.float64)
        if vector.shape != (self.num_classes,):
            raise ValueError(
                f"{name} has {len(vector)} entries; allowed: one per class ({self.num_classes})"
            )
        return vector

    def raw_weights(
        self,
        train_acc_per_class: Sequence[float],
        val_acc_per_class: Sequence[float],
        val_recall_per_class: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """``1 + strength * (gap + shortfall)`` per class (C,), before smoothing and bounds."""
        train = self._vector("train_acc_per_class", train_acc_per_class)
        val = self._vector("val_acc_per_class", val_acc_per_class)
        gap = torch.nan_to_num((train - val).clamp_min(0.0), nan=0.0, posinf=0.0, neginf=0.0)
        shortfall = torch.zeros_like(gap)
        if self.use_recall and val_recall_per_class is not None:
            shortfall = self._shortfall(self._vector("val_recall_per_class", val_recall_per_class))
        return 1.0 + self.strength * (gap + shortfall)

    @staticmethod
    def _shortfall(recall: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(recall)
        mean = recall[finite].mean() if finite.any() else torch.tensor(0.0, dtype=recall.dtype)
        if mean <= 0:
            return torch.zeros_like(recall)
        shortfall = (1.0 - recall / mean).clamp_min(0.0)
        return torch.where(finite, shortfall, torch.zeros_like(shortfall))

    def update(
        self,
        train_acc_per_class: Sequence[float],
        val_acc_per_class: Sequence[float],
        val_recall_per_class: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Move the weights from one epoch's per-class metrics; returns :attr:`weights`.

        Args:
            train_acc_per_class: training accuracy of each class (C,), in [0, 1].
            val_acc_per_class: validation accuracy of each class (C,), in [0, 1].
            val_recall_per_class: validation recall of each class (C,); ``None`` skips the
                recall term.
        """
        raw = self.raw_weights(train_acc_per_class, val_acc_per_class, val_recall_per_class)
        smoothed = self.momentum * self._weights + (1.0 - self.momentum) * raw
        clipped = smoothed.clamp(self.min_weight, self.max_weight)
        new = (clipped / clipped.mean()).clamp(self.min_weight, self.max_weight)
        self._delta = new - self._weights
        self._weights = new
        self.num_updates += 1
        return self.weights

    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": self._weights.tolist(),
            "delta": self._delta.tolist(),
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = torch.as_tensor(state["weights"], dtype=torch.float64)
        if weights.shape != (self.num_classes,):
            raise ValueError(
                f"state has {len(weights)} class weights; this ClassPenalty has {self.num_classes}"
            )
        self._weights = weights
        self._delta = torch.as_tensor(state["delta"], dtype=torch.float64)
        self.num_updates = int(state["num_updates"])


def moved_classes(
    weights: Sequence[float], reference: Sequence[float], threshold: float
) -> list[int]:
    """Classes whose weight is more than ``threshold`` away from ``reference``, largest first.

    Compared with the weights at the last announcement rather than the previous epoch, so a
    weight that jitters back and forth stays quiet and a slow drift is reported once it adds up.

    Args:
        weights: the current per-class weights (C,).
        reference: the weights to compare with (C,).
        threshold: a move must exceed it to count, >= 0 (:attr:`ClassPenalty.notable_move`).
    """
    if len(weights) != len(reference):
        raise ValueError(
            f"{len(weights)} weights against {len(reference)} reference weights; allowed: equal"
        )
    if not _is_real(threshold) or threshold < 0:
        raise ValueError(f"threshold={threshold!r} is invalid; allowed: a number >= 0")
    moves = [abs(float(w) - float(r)) for w, r in zip(weights, reference, strict=True)]
    moved = [c for c, move in enumerate(moves) if move > threshold]
    return sorted(moved, key=lambda c: -moves[c])


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
