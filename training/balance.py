"""Class balance: balanced sampling, a double-correction check and adaptive per-class penalties.

- :func:`sample_weights` and :func:`make_balanced_sampler`: draw training images with
  probability proportional to their class weight (inverse frequency, or the effective number of
  samples of Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019),
  so that classes are balanced in expectation.
- :func:`double_correction_warning`: a class-weighted loss on top of balanced sampling corrects
  the imbalance twice and over-favours the rare classes; this says so.
- :class:`ClassPenalty`: per-class loss weights adjusted once per epoch from each class's
  train-validation accuracy gap and validation recall shortfall, smoothed by an exponential
  moving average. It follows the idea of re-weighting the loss by per-class performance rather
  than by frequency alone (cf. Cui et al. 2019; Lin et al., "Focal Loss for Dense Object
  Detection", ICCV 2017, does the same per sample).
- :func:`per_class_accuracy`: accuracy of each class (its recall) from logits or predictions.

Public API:
    sample_weights, make_balanced_sampler, double_correction_warning, ClassPenalty,
    moved_classes, per_class_accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

import losses

# --------------------------------------------------------------------------- balanced sampling


def _check_labels(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or len(array) == 0 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"labels of shape {array.shape} and dtype {array.dtype} are invalid; "
            "allowed: a non-empty 1-d array of integer class indices"
        )
    if array.min() < 0:
        raise ValueError(f"labels contain {array.min()}; allowed: class indices >= 0")
    return array.astype(np.int64)


def sample_weights(
    labels: np.ndarray | Sequence[int], class_weights: torch.Tensor | Sequence[float]
) -> torch.Tensor:
    """Per-sample weights (N,) for ``WeightedRandomSampler``: each sample gets its class weight.

    With inverse-frequency class weights every class carries the same total weight, so the
    sampler draws the classes equally often in expectation.

    Args:
        labels: class index of every training sample, shape (N,).
        class_weights: weight of every class, shape (C,), non-negative, C > max(labels).
    """
    array = _check_labels(labels)
    cw = torch.as_tensor(class_weights, dtype=torch.float64).flatten()
    if len(cw) <= array.max():
        raise ValueError(
            f"class_weights has {len(cw)} entries but labels go up to {array.max()}; "
            f"allowed: at least {array.max() + 1} weights"
        )
    if not torch.isfinite(cw).all() or (cw < 0).any():
        raise ValueError(f"class_weights={cw.tolist()} is invalid; allowed: finite numbers >= 0")
    weights = cw[torch.from_numpy(array)]  # (N,)
    if weights.sum() <= 0:
        raise ValueError("every sample has weight 0; the sampler would have nothing to draw")
    return weights


def make_balanced_sampler(
    labels: np.ndarray | Sequence[int],
    scheme: str = "inverse",
    beta: float = 0.999,
    generator: torch.Generator | None = None,
    num_samples: int | None = None,
) -> WeightedRandomSampler:
    """A sampler that draws training samples with replacement, weighted by their class.

    ``scheme="inverse"`` balances the classes exactly in expectation; ``"effective"`` (Cui et al.
    2019) sits between the natural distribution (beta=0) and inverse frequency (beta -> 1).

    Args:
        labels: class index of every training sample, shape (N,).
        scheme: ``"inverse"``, ``"effective"`` or ``"none"`` (uniform over samples), as in
            :func:`losses.class_weights`.
        beta: effective-number hyper-parameter in [0, 1).
        generator: random generator of the draws; pass a seeded one for reproducible epochs.
        num_samples: draws per epoch, > 0; ``None`` keeps the epoch length at N.
    """
    array = _check_labels(labels)
    if num_samples is None:
        num_samples = len(array)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"num_samples={num_samples!r} is invalid; allowed: an int > 0 or None")
    counts = np.bincount(array)
    weights = sample_weights(array, losses.class_weights(counts.tolist(), scheme, beta))
    return WeightedRandomSampler(weights, num_samples, replacement=True, generator=generator)


def double_correction_warning(loss_weighting: str, balanced_sampling: bool) -> str | None:
    """A warning when a class-weighted loss and balanced sampling are both on, else ``None``.

    Balanced sampling already shows the model every class about equally often; weighting the
    loss by class as well multiplies the rare classes' influence a second time (about 1/n_c^2
    instead of 1/n_c), which over-predicts them.

    Args:
        loss_weighting: the loss's class-weight scheme, one of ``losses.WEIGHT_SCHEMES``.
        balanced_sampling: whether training batches are drawn by :func:`make_balanced_sampler`.
    """
    if loss_weighting not in losses.WEIGHT_SCHEMES:
        allowed = " | ".join(map(repr, losses.WEIGHT_SCHEMES))
        raise ValueError(f"loss_weighting={loss_weighting!r} is invalid; allowed: {allowed}")
    if loss_weighting == "none" or not balanced_sampling:
        return None
    return (
        f"class imbalance is corrected twice: the loss is weighted by class "
        f"({loss_weighting!r}) and batches are drawn with balanced sampling; rare classes will "
        f"be over-weighted. Use one of the two (loss weighting 'none' or balanced_sampling off)."
    )


# --------------------------------------------------------------------------- per-class metrics


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


# --------------------------------------------------------------------------- adaptive penalty


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
